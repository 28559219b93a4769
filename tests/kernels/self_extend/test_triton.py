"""The fused SelfExtend Triton kernel against reference.py, under the Triton interpreter (CPU).

Small odd shapes with 16-key tiles so every tile kind runs: far tiles (grouped dot only),
tiles straddling the window edge (both dots, selected per pair), near tiles below and on the
diagonal; both key rotations (the angle-addition table when g divides the tile, per-key
cos/sin otherwise); decode with packed GQA rows and split-KV; padding; softcap; both pairings.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from longfx.kernels.self_extend import reference as R  # noqa: E402
from longfx.kernels.self_extend import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


def _inv_freq(rot_dims):
    return 1.0 / (10000.0 ** (torch.arange(0, rot_dims, 2).float() / rot_dims))


def _inputs(B, H, Hkv, S, Skv, D, dtype, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    keep = None
    if pad:                                   # left padding: batch b drops its first pad·(b+1)
        keep = torch.ones(B, Skv, dtype=torch.bool)
        for b in range(B):
            keep[b, : pad * (b + 1)] = False
    return q, k, v, keep


def _reference(q, k, v, keep, scale, softcap, group, window, inv, style):
    return R.self_extend_attention(q.float(), k.float(), v.float(), keep, scale, softcap,
                                   group, window, inv, style)


def _plain(q, k, v, keep):
    """Causal attention at the true positions (what SelfExtend changes)."""
    return _reference(q, k, v, keep, None, 0.0, 1, 1 << 20, _inv_freq(2), "rotate_half")


CASES = [  # B, H, Hkv, S, Skv, D, rot_dims, group, window, style, pad, softcap, rotation
    (1, 4, 2, 37, 37, 80, 64, 4, 8, "rotate_half", 0, 0.0, "table"),    # GQA, D=80, R=64
    (1, 2, 1, 23, 90, 96, 96, 3, 10, "interleaved", 0, 0.0, "table"),   # g ∤ 16: per key
    (2, 2, 1, 30, 45, 64, 64, 2, 7, "complex", 3, 0.0, "table"),        # padding, chunked
    (1, 2, 2, 33, 33, 32, 32, 8, 5, "rotate_half", 0, 20.0, "table"),   # softcap
    (1, 2, 1, 40, 70, 32, 16, 4, 16, "rotate_half", 0, 0.0, "direct"),  # window = tile
    (1, 2, 1, 21, 50, 16, 16, 5, 1, "interleaved", 2, 0.0, "table"),    # window = 1, D=16
    (1, 2, 1, 19, 52, 32, 32, 16, 6, "rotate_half", 0, 0.0, "table"),   # g = 16 = tile
    (1, 2, 1, 17, 60, 32, 32, 37, 9, "rotate_half", 0, 0.0, "table"),   # g > Skv: gk = 0
    # grouped keys built once per call (the prefill default)
    (1, 4, 2, 37, 37, 80, 64, 4, 8, "rotate_half", 0, 0.0, "precomputed"),
    (2, 2, 1, 30, 45, 64, 64, 2, 7, "complex", 3, 0.0, "precomputed"),
    (1, 2, 2, 33, 33, 32, 32, 8, 5, "rotate_half", 0, 20.0, "precomputed"),
    (1, 2, 1, 21, 50, 16, 16, 5, 1, "interleaved", 2, 0.0, "precomputed"),
    (1, 2, 1, 23, 90, 96, 96, 3, 10, "interleaved", 0, 0.0, "precomputed"),
]


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,rot,group,window,style,pad,softcap,rotation", CASES)
def test_prefill_fp32(B, H, Hkv, S, Skv, D, rot, group, window, style, pad, softcap, rotation):
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, torch.float32, S * 7 + Skv, pad)
    inv = _inv_freq(rot)
    out = T.self_extend_attention(q, k, v, keep, None, softcap, group, window, inv, style,
                                  block_m=16, block_n=16, rotation=rotation,
                                  dense_fallback=False)
    ref = _reference(q, k, v, keep, None, softcap, group, window, inv, style)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) <= TOL[torch.float32]
    if not softcap:
        assert _rel(_plain(q, k, v, keep), ref) > 1e-2       # the far keys matter here


def test_window_straddles_one_tile():
    """Window 5 inside 16-key tiles: in the diagonal tiles p − j crosses the window edge."""
    q, k, v, _ = _inputs(1, 1, 1, 32, 32, 16, torch.float32, 9)
    inv = _inv_freq(16)
    for window in (5, 13, 16, 17):
        out = T.self_extend_attention(q, k, v, None, 0.3, 0.0, 4, window, inv, "rotate_half",
                                      block_m=16, block_n=16, dense_fallback=False)
        ref = _reference(q, k, v, None, 0.3, 0.0, 4, window, inv, "rotate_half")
        assert _rel(out, ref) <= 1e-4, window


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half(dtype):
    q, k, v, keep = _inputs(1, 4, 2, 37, 53, 64, dtype, 3, 2)
    inv = _inv_freq(64)
    out = T.self_extend_attention(q, k, v, keep, None, 0.0, 4, 8, inv, "rotate_half",
                                  block_m=16, block_n=16, dense_fallback=False)
    assert out.dtype == dtype
    ref = _reference(q, k, v, keep, None, 0.0, 4, 8, inv, "rotate_half")
    assert _rel(out, ref) <= TOL[dtype]


DECODE = [  # B, H, Hkv, S, Skv, D, group, window, style, pad, splits, dtype
    (2, 2, 1, 1, 131, 64, 4, 16, "rotate_half", 0, 1, torch.float32),   # one program / kv head
    (2, 4, 2, 1, 131, 64, 8, 16, "interleaved", 3, 3, torch.float32),   # split-KV, padding
    (1, 8, 2, 3, 77, 80, 3, 20, "rotate_half", 0, 4, torch.float32),    # S = 3: 12 rows
    (1, 4, 1, 1, 40, 32, 2, 7, "rotate_half", 0, 16, torch.float32),    # empty splits
    (1, 4, 2, 1, 150, 64, 4, 32, "rotate_half", 2, 3, torch.bfloat16),
    (1, 4, 2, 1, 99, 128, 8, 20, "complex", 0, None, torch.float16),    # default splits
]


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,group,window,style,pad,splits,dtype", DECODE)
def test_decode_split_kv(B, H, Hkv, S, Skv, D, group, window, style, pad, splits, dtype):
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, dtype, Skv + S, pad)
    inv = _inv_freq(D)
    out = T.self_extend_attention(q, k, v, keep, None, 0.0, group, window, inv, style,
                                  block_n=16, num_splits=splits, dense_fallback=False)
    assert out.dtype == dtype
    ref = _reference(q, k, v, keep, None, 0.0, group, window, inv, style)
    assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("S", [1, 17])
def test_every_tile_alignment(S):
    """Window edge and group boundaries at every offset within a 16-key tile."""
    inv = _inv_freq(16)
    for skv in range(40, 56, 3):
        q, k, v, _ = _inputs(1, 1, 1, S, skv, 16, torch.float32, skv)
        for group, window in ((4, 16), (3, 21)):
            out = T.self_extend_attention(q, k, v, None, None, 0.0, group, window, inv,
                                          "rotate_half", block_m=16, block_n=16,
                                          num_splits=2 if S == 1 else 1, dense_fallback=False)
            ref = _reference(q, k, v, None, None, 0.0, group, window, inv, "rotate_half")
            assert _rel(out, ref) <= 1e-4, (skv, group, window)


def test_group_one_is_plain_attention():
    q, k, v, keep = _inputs(1, 2, 1, 20, 44, 32, torch.float32, 5, 1)
    out = T.self_extend_attention(q, k, v, keep, None, 0.0, 1, 6, _inv_freq(32),
                                  "rotate_half", block_m=16, block_n=16, dense_fallback=False)
    assert _rel(out, _plain(q, k, v, keep)) <= 1e-4


def test_fully_masked_rows_are_zero():
    q, k, v, _ = _inputs(1, 2, 1, 20, 20, 16, torch.float32, 2)
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, :8] = False                   # queries 0..7 see only padding
    inv = _inv_freq(16)
    out = T.self_extend_attention(q, k, v, keep, None, 0.0, 2, 4, inv, "rotate_half",
                                  block_m=16, block_n=16, dense_fallback=False)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    assert _rel(out, _reference(q, k, v, keep, None, 0.0, 2, 4, inv, "rotate_half")) <= 1e-4


def test_strided_inputs_and_value_head_dim():
    """q/k/v as transposed [B, S, H, D] views (no copy), v with its own head dim."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 26, 4, 32, generator=g).transpose(1, 2)           # [B, H, S, D] view
    k = torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 40, 2, 48, generator=g).transpose(1, 2)           # Dv = 48
    inv = _inv_freq(32)
    out = T.self_extend_attention(q, k, v, None, None, 0.0, 4, 6, inv, "rotate_half",
                                  block_m=16, block_n=16, dense_fallback=False)
    assert out.shape == (1, 4, 26, 48)
    assert _rel(out, _reference(q, k, v, None, None, 0.0, 4, 6, inv, "rotate_half")) <= 1e-4


def test_default_tiles():
    """The launch's own tile choice (fp32: 32 x 16) and split count."""
    q, k, v, keep = _inputs(1, 2, 1, 45, 61, 64, torch.float32, 11, 2)
    inv = _inv_freq(64)
    out = T.self_extend_attention(q, k, v, keep, None, 0.0, 8, 9, inv, "interleaved",
                                  dense_fallback=False)
    assert _rel(out, _reference(q, k, v, keep, None, 0.0, 8, 9, inv, "interleaved")) <= 1e-4


# --- dense fallback and dispatch ---------------------------------------------------------

def test_dense_fallback_when_the_window_covers_everything(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(T, "_launch", boom)
    q, k, v, _ = _inputs(1, 4, 2, 12, 12, 16, torch.float32, 6)
    inv = _inv_freq(16)
    out = T.self_extend_attention(q, k, v, None, None, 0.0, 4, 12, inv, "rotate_half")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref)
    assert _rel(out, _reference(q, k, v, None, None, 0.0, 4, 12, inv, "rotate_half")) <= 1e-5
    out = T.self_extend_attention(q[:, :, -1:], k, v, None, None, 0.0, 4, 12, inv,
                                  "rotate_half")
    assert _rel(out, _reference(q[:, :, -1:], k, v, None, None, 0.0, 4, 12, inv,
                                "rotate_half")) <= 1e-5


def test_supports():
    q, k, v, keep = _inputs(1, 2, 1, 4, 8, 16, torch.float32, 1)
    assert T.supports(q, k, v, keep, _inv_freq(16))
    assert not T.supports(q, k, v, keep, None)
    assert not T.supports(q, k, v, keep, _inv_freq(32))              # 32 rotated > D = 16
    assert not T.supports(q.double(), k.double(), v.double(), keep, _inv_freq(16))
    with pytest.raises(ValueError, match="rotation"):
        T.self_extend_attention(q, k, v, None, None, 0.0, 2, 3, _inv_freq(16), "rotate_half",
                                rotation="fast", dense_fallback=False)


def test_op_dispatches_to_the_kernel_on_cuda_tensors(monkeypatch):
    """The custom op calls the kernel when the tensors are on CUDA (simulated: the interpreter
    runs on CPU tensors, so ``is_cuda`` is faked through the op's device test)."""
    from longfx.kernels.self_extend import op
    calls = []
    real = T.self_extend_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(T, "self_extend_attention", spy)
    monkeypatch.setattr(op, "_on_gpu", lambda q: True)
    q, k, v, _ = _inputs(1, 2, 1, 9, 30, 16, torch.float32, 8)
    inv = _inv_freq(16)
    out = op.OP(q, k, v, None, 0.25, 0.0, 4, 5, inv, "rotate_half")
    assert calls == [1]
    assert _rel(out, _reference(q, k, v, None, 0.25, 0.0, 4, 5, inv, "rotate_half")) <= 1e-4
    monkeypatch.setattr(op, "_on_gpu", lambda q: False)
    op.OP(q, k, v, None, 0.25, 0.0, 4, 5, inv, "rotate_half")
    assert calls == [1]                                               # CPU: the blocked path
