"""The blocked CPU lowering and the custom op against the dense-mask reference."""
import pytest
import torch

from longfx.kernels.sparse_attention import blocked, op  # noqa: F401 - registers the op
from longfx.kernels.sparse_attention import reference as R


def _rel(a, b):
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))


CASES = [  # B, H, Hkv, S, Skv, D, sink, window, cap, softcap, pad
    (1, 4, 2, 37, 37, 16, 4, 8, 0, 0.0, False),
    (2, 3, 3, 1, 61, 80, 2, 16, 0, 0.0, True),
    (1, 6, 2, 23, 90, 64, 4, 10, 12, 0.0, False),
    (2, 2, 1, 50, 50, 8, 0, 7, 0, 5.0, True),
    (1, 2, 2, 19, 19, 8, 3, 100, 0, 0.0, False),      # window covers: dense fallback
    (1, 2, 1, 5, 33, 8, 0, 0, 0, 0.0, True),          # no window: causal + padding
    (1, 2, 1, 40, 40, 16, 2, 4, 6, 0.0, False),       # prefill with the cap: sinks inside
]                                                      # the first block's window range


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,sink,window,cap,softcap,pad", CASES)
@pytest.mark.parametrize("block", [7, 1024])
def test_blocked_matches_reference(B, H, Hkv, S, Skv, D, sink, window, cap, softcap, pad, block):
    g = torch.Generator().manual_seed(S * 31 + Skv)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, D, generator=g)
    keep = None
    if pad:
        keep = torch.ones(B, Skv, dtype=torch.bool)
        keep[-1, :2] = False
    inv = 10000.0 ** (-torch.arange(0, D // 2, 2).double() / (D // 2)) if cap else None
    args = (keep, D ** -0.5, softcap, sink, window, cap, inv, "rotate_half")
    ref = R.sparse_attention(q, k, v, *args)
    out = blocked.sparse_attention(q, k, v, *args, block=block)
    assert _rel(out, ref) < 1e-5
    assert _rel(torch.ops.longfx.sparse_attention(q, k, v, *args), ref) < 1e-5


def test_bf16_within_budget():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = R.sparse_attention(q.float(), k.float(), v.float(), None, 32 ** -0.5, 0.0, 4, 16)
    out = blocked.sparse_attention(q, k, v, None, 32 ** -0.5, 0.0, 4, 16, 0, None, "rotate_half",
                                   block=16)
    assert _rel(out.float(), ref) < 2e-2


def test_fake_shape_and_compile():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 6)

    def f(q, k, v):
        return torch.ops.longfx.sparse_attention(q, k, v, None, 0.3, 0.0, 1, 3, 0, None,
                                                 "rotate_half")

    out = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    assert out.shape == (1, 2, 4, 6)
    assert _rel(out, R.sparse_attention(q, k, v, None, 0.3, 0.0, 1, 3)) < 1e-5
