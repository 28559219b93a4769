"""SelfExtend attention: the reference against the paper's per-pair positions on raw q/k,
the blocked lowering and the custom op against the reference."""
import pytest
import torch
import torch.nn.functional as F

from longfx.kernels.self_extend import blocked, op  # noqa: F401 - registers the op
from longfx.kernels.self_extend import reference as R
from longfx.kernels.sparse_attention.reference import positions


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _rope(x, pos, inv, style):
    """Rotate x [..., S, D] at integer positions pos [S] (independent of the code under test)."""
    ang = pos.double()[:, None] * inv.double()[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    h = inv.numel()
    if style == "rotate_half":
        x1, x2 = x[..., :h], x[..., h:2 * h]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * h:]), -1)
    x1, x2 = x[..., 0:2 * h:2], x[..., 1:2 * h:2]
    return torch.cat((torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2),
                      x[..., 2 * h:]), -1)


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("S,Skv,group,window", [(12, 12, 2, 4), (3, 29, 4, 5), (1, 40, 3, 7)])
def test_reference_equals_the_papers_positions(style, S, Skv, group, window):
    D, R2 = 16, 12
    inv = 10000.0 ** (-torch.arange(0, R2, 2).double() / R2)
    g = torch.Generator().manual_seed(S + Skv)
    q_raw = torch.randn(1, 4, S, D, generator=g)
    k_raw = torch.randn(1, 2, Skv, D, generator=g)
    v = torch.randn(1, 2, Skv, D, generator=g)
    qp, kp = positions(S, Skv)
    out = R.self_extend_attention(_rope(q_raw, qp, inv, style), _rope(k_raw, kp, inv, style), v,
                                  None, D ** -0.5, 0.0, group, window, inv.float(), style)
    rows = []
    kk, vv = k_raw.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for i, p in enumerate(qp.tolist()):
        sc = []
        for j in range(p + 1):
            if p - j < window:
                qa, ka = p, j
            else:
                qa, ka = p // group + window - window // group, j // group
            qi = _rope(q_raw[:, :, i:i + 1], torch.tensor([qa]), inv, style)
            kj = _rope(kk[:, :, j:j + 1], torch.tensor([ka]), inv, style)
            sc.append((qi * kj).sum(-1)[..., 0] * D ** -0.5)
        rows.append(torch.softmax(torch.stack(sc, -1), -1)[:, :, None] @ vv[:, :, :p + 1])
    assert _rel(out, torch.cat(rows, 2)) < 1e-5


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,group,window,pad,softcap", [
    (1, 4, 2, 37, 37, 16, 4, 8, False, 0.0),
    (2, 3, 3, 1, 61, 80, 8, 16, True, 0.0),
    (1, 2, 1, 23, 90, 64, 2, 10, False, 30.0),
    (1, 2, 2, 9, 9, 8, 4, 100, False, 0.0),          # window covers: dense SDPA
])
@pytest.mark.parametrize("block", [5, 1024])
def test_blocked_and_op_match_reference(B, H, Hkv, S, Skv, D, group, window, pad, softcap, block):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, n, L, D, generator=g) for n, L in ((H, S), (Hkv, Skv), (Hkv, Skv)))
    keep = None
    if pad:
        keep = torch.ones(B, Skv, dtype=torch.bool)
        keep[-1, :3] = False
    inv = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    args = (keep, D ** -0.5, softcap, group, window, inv, "rotate_half")
    ref = R.self_extend_attention(q, k, v, *args)
    assert _rel(blocked.self_extend_attention(q, k, v, *args, block=block), ref) < 1e-5
    assert _rel(torch.ops.longfx.self_extend_attention(q, k, v, *args), ref) < 1e-5


def test_window_covering_everything_is_causal_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    inv = 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    out = R.self_extend_attention(q, k, v, None, None, 0.0, 4, 10, inv)
    assert _rel(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-5


def test_bad_arguments():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="inv_freq"):
        R.self_extend_attention(q, q, q, None, None, 0.0, 2, 2, None)
    with pytest.raises(ValueError, match="group"):
        R.self_extend_attention(q, q, q, None, None, 0.0, 0, 2, torch.ones(2))
