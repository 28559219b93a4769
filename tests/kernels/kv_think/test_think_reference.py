"""The ThinK reference: channel scores equal a naive per-channel loop (GQA query heads stacked),
the kept channels are the top scores in ascending order, a constructed key with loud channels
keeps them, and q · unprune(prune(k)) equals q · k restricted to the kept channels, per
segment."""
import math

import pytest
import torch

from longfx.kernels.kv_think import reference as R


def test_kept_channels():
    assert [R.ThinKConfig(r).kept_channels(64) for r in (0.0, 0.3, 0.5, 0.9, 0.999)] == \
        [64, 45, 32, 7, 1]


def test_scores_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, w, L, D = 2, 6, 2, 5, 23, 12
    q, k = torch.randn(B, H, w, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    want = torch.zeros(B, Hkv, D)
    for b in range(B):
        for j in range(Hkv):
            Q = torch.cat([q[b, h] for h in range(j * 3, j * 3 + 3)])      # [3w, D] stacked
            for c in range(D):
                want[b, j, c] = Q[:, c].norm() * k[b, j, :, c].norm()
    torch.testing.assert_close(R.channel_scores(q, k), want, rtol=1e-5, atol=1e-6)
    # the Frobenius norm of the channel's share of the logits, Q[:, c] K[:, c]^T
    outer = torch.outer(q[0, 0, :, 3], k[0, 0, :, 3]).norm()
    assert math.isclose(float(outer), q[0, 0, :, 3].norm() * k[0, 0, :, 3].norm(), rel_tol=1e-5)


def test_loud_channels_are_kept_sorted():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g) * 0.1
    k[..., [6, 1, 4]] *= 100
    idx = R.keep_channels(R.channel_scores(q, k), 3)
    assert idx.tolist() == [[[1, 4, 6]]]


def test_pruned_logits_equal_the_kept_channels_dot_product():
    g = torch.Generator().manual_seed(2)
    B, Hkv, L, D = 2, 3, 17, 16
    k = torch.randn(B, Hkv, L, D, generator=g)
    q = torch.randn(B, Hkv, D, generator=g)
    # two segments (tokens 0..9, 10..16) with their own channel sets
    ch = torch.stack([torch.randperm(D, generator=g)[:6].sort().values
                      for _ in range(B * Hkv * 2)]).view(B, Hkv, 2, 6)
    seg = torch.tensor([0] * 10 + [1] * 7)
    pruned = torch.cat((R.prune(k[:, :, :10], ch[:, :, 0]), R.prune(k[:, :, 10:], ch[:, :, 1])), 2)
    assert pruned.shape == (B, Hkv, L, 6)
    full = R.unprune(pruned, ch, seg, D)
    logits = (full * q[:, :, None]).sum(-1)                               # [B, Hkv, L]
    for b in range(B):
        for h in range(Hkv):
            for t in range(L):
                c = ch[b, h, seg[t]]
                assert torch.allclose(logits[b, h, t], (q[b, h, c] * k[b, h, t, c]).sum(), atol=1e-6)
                zero = torch.ones(D, dtype=torch.bool)
                zero[c] = False
                assert bool((full[b, h, t, zero] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_every_channel_is_exact(dtype):
    k = torch.randn(1, 2, 9, 8).to(dtype)
    ch = R.keep_channels(R.channel_scores(torch.randn(1, 4, 3, 8), k), 8)
    assert torch.equal(R.unprune(R.prune(k, ch), ch[:, :, None], torch.zeros(9, dtype=torch.long), 8), k)
