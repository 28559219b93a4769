"""The MiniCache reference: SLERP interpolates on the sphere (ends, unit norm, angle t·Ω, the
small-angle limit); a merge keeps retained pairs exact for both layers and merged ones within
the stated error bound; parallel vectors merge losslessly; merging chunk by chunk equals one
merge; the stored bytes of a fully merged pair."""
import math

import pytest
import torch

from longfx.kernels.kv_minicache import reference as R


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_slerp_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    u0, u1 = _unit(torch.randn(50, 8, generator=g)), _unit(torch.randn(50, 8, generator=g))
    torch.testing.assert_close(R.slerp(u0, u1, 0.0), u0, rtol=0, atol=1e-6)
    torch.testing.assert_close(R.slerp(u0, u1, 1.0), u1, rtol=0, atol=1e-6)
    e = R.slerp(u0, u1, 0.3)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(50), rtol=0, atol=1e-5)
    omega = R.angular_distance(u0, u1) * math.pi
    torch.testing.assert_close(R.angular_distance(u0, e) * math.pi, 0.3 * omega, rtol=0, atol=1e-4)
    # (almost) the same direction: the linear limit, still a unit vector between them
    v = _unit(u0 + 1e-8)
    torch.testing.assert_close(R.slerp(u0, v, 0.5), u0, rtol=0, atol=1e-6)


def test_angular_distance_scale():
    a = torch.tensor([[1.0, 0.0]])
    assert R.angular_distance(a, a).item() == 0.0
    assert math.isclose(R.angular_distance(a, torch.tensor([[0.0, 1.0]])).item(), 0.5, abs_tol=1e-6)
    assert math.isclose(R.angular_distance(a, -a).item(), 1.0, abs_tol=1e-6)


def _pair(seed=0, T=40):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, T, 16, generator=g)
    x1 = torch.randn(2, 3, T, 16, generator=g)
    x1[:, :, ::2] = 1.7 * x0[:, :, ::2] + 0.2 * torch.randn(2, 3, T // 2, 16, generator=g)
    return x0, x1


@pytest.mark.parametrize("t,threshold", [(0.5, 0.25), (0.6, 0.15), (0.5, 1.0)])
def test_retained_exact_merged_within_the_bound(t, threshold):
    x0, x1 = _pair()
    m = R.merge(x0, x1, t, threshold)
    d = R.angular_distance(_unit(x0), _unit(x1))
    assert torch.equal(m.keep, d > threshold)
    assert m.extra.shape == (int(m.keep.sum()), 16)
    r0, r1 = R.restore(m, 0), R.restore(m, 1)
    k = m.keep
    assert torch.equal(r0[k], x0[k]) and torch.equal(r1[k], x1[k])
    bound = R.error_bound(t, threshold) + 1e-5
    for r, x in ((r0, x0), (r1, x1)):
        rel = (r - x).norm(dim=-1) / x.norm(dim=-1)
        assert float(rel[~k].max()) <= bound
        torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    if threshold == 1.0:
        assert not k.any()                                       # everything merged


def test_parallel_vectors_merge_losslessly():
    x0 = torch.randn(1, 2, 7, 8)
    m = R.merge(x0, 3.0 * x0, 0.5, 0.0 + 1e-3)
    assert not m.keep.any()
    torch.testing.assert_close(R.restore(m, 0), x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(R.restore(m, 1), 3.0 * x0, rtol=1e-5, atol=1e-6)


def test_chunked_merge_equals_one_merge():
    x0, x1 = _pair(1, T=30)
    whole = R.merge(x0, x1, 0.5, 0.3)
    parts = R.MergedKV.empty(2, 3, 16, torch.float32, "cpu")
    for a, b in ((0, 11), (11, 12), (12, 30)):
        parts = R.concat(parts, R.merge(x0[:, :, a:b], x1[:, :, a:b], 0.5, 0.3))
    for name in R.MergedKV.NAMES:
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name
    assert torch.equal(R.restore(parts, 1), R.restore(whole, 1))


def test_bytes_of_a_fully_merged_pair():
    x0, x1 = _pair(2)
    m = R.merge(x0, x1, 0.5, 1.0)
    B, H, T, D = x0.shape
    assert m.nbytes() == B * H * T * (D * 4 + 2 * 4 + 1)          # one direction, two norms, mask
    assert m.nbytes() < 0.6 * 2 * x0.numel() * 4      # vs two layers: (16·4 + 9) / (2·16·4) = 0.57
