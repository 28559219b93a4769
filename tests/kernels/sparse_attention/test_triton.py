"""The sparse attention Triton kernel against the dense-mask reference, under the Triton
interpreter (CPU).

Small odd shapes (S=37, D=80; decode over Skv=131; chunked prefill 23 over 90 with D=96),
small tiles (16) so every tile kind runs: sinks, masked window edges, unmasked interior,
split-KV with its combine, the fused cap rotation, key padding, softcap, the block table.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from longfx.kernels.sparse_attention import reference as R  # noqa: E402
from longfx.kernels.sparse_attention import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


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


def _inv_freq(rot_dims):
    return 1.0 / (10000.0 ** (torch.arange(0, rot_dims, 2).float() / rot_dims))


def _reference(q, k, v, keep, softcap=0.0, sink=0, window=0, cap=0, inv_freq=None,
               rope_style="rotate_half"):
    return R.sparse_attention(q.float(), k.float(), v.float(), keep, None, softcap, sink,
                              window, cap, inv_freq, rope_style)


CASES = [  # B, H, Hkv, S, Skv, D, sink, window, softcap, pad
    (1, 4, 2, 37, 37, 80, 4, 8, 0.0, 0),          # prefill, GQA 2, D=80 padded to 128
    (1, 2, 1, 23, 90, 96, 4, 10, 0.0, 0),         # chunked prefill, D=96
    (2, 2, 1, 30, 30, 64, 0, 7, 5.0, 3),          # plain sliding window, softcap, left pad
    (1, 2, 2, 19, 19, 32, 3, 100, 0.0, 0),        # window >= Skv
    (1, 2, 1, 21, 50, 16, 2, 1, 0.0, 2),          # window = 1, D=16
    (1, 3, 1, 34, 60, 64, 0, 0, 0.0, 5),          # no window: causal + padding
    (1, 4, 4, 33, 33, 64, 20, 5, 0.0, 0),         # sinks reaching into the window
    (1, 2, 1, 48, 48, 32, 0, 17, 0.0, 0),         # window starts on tile boundaries
    (1, 2, 1, 64, 80, 32, 3, 33, 0.0, 1),         # unmasked interior tiles, boundaries
]


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,sink,window,softcap,pad", CASES)
def test_prefill_fp32(B, H, Hkv, S, Skv, D, sink, window, softcap, pad):
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, torch.float32, S * 7 + Skv, pad)
    out = T.sparse_attention(q, k, v, keep, None, softcap, sink, window, 0, None,
                             "rotate_half", block_m=16, block_n=16, dense_fallback=False)
    ref = _reference(q, k, v, keep, softcap, sink, window)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_prefill_half(dtype, case):
    B, H, Hkv, S, Skv, D, sink, window, softcap, pad = case
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, dtype, 3, pad)
    out = T.sparse_attention(q, k, v, keep, 0.1, softcap, sink, window, 0, None,
                             "rotate_half", block_m=16, block_n=16, dense_fallback=False)
    assert out.dtype == dtype
    ref = R.sparse_attention(q.float(), k.float(), v.float(), keep, 0.1, softcap, sink, window)
    assert _rel(out, ref) <= TOL[dtype]


def test_prefill_default_tiles():
    """The launch's own tile choice (one 64-row fp32 tile over the whole context)."""
    q, k, v, keep = _inputs(1, 2, 1, 45, 45, 64, torch.float32, 11, 2)
    out = T.sparse_attention(q, k, v, keep, None, 0.0, 2, 9, 0, None, "rotate_half",
                             dense_fallback=False)
    assert _rel(out, _reference(q, k, v, keep, 0.0, 2, 9)) <= 1e-4


DECODE = [  # B, H, Hkv, S, Skv, D, sink, window, pad, splits
    (2, 2, 1, 1, 131, 64, 4, 16, 0, 1),           # decode, one program per kv head
    (2, 2, 1, 1, 131, 64, 4, 16, 3, 3),           # split-KV + combine, padding
    (1, 8, 2, 3, 77, 80, 2, 20, 0, 4),            # S = 3 (speculative), G·S = 12 rows
    (1, 4, 1, 1, 40, 64, 4, 64, 0, 16),           # more splits than tiles: empty splits
    (1, 4, 2, 2, 70, 32, 0, 0, 0, 2),             # no window, S = 2 (no dense shortcut)
    (1, 2, 1, 1, 96, 16, 1, 16, 0, 2),            # window starts on a tile boundary
    (1, 2, 1, 1, 17, 16, 20, 4, 0, 1),            # sinks past the query (p = 16)
]


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,sink,window,pad,splits", DECODE)
def test_decode_split_kv(B, H, Hkv, S, Skv, D, sink, window, pad, splits):
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, torch.float32, Skv + splits, pad)
    out = T.sparse_attention(q, k, v, keep, None, 0.0, sink, window, 0, None, "rotate_half",
                             block_n=16, num_splits=splits, dense_fallback=False)
    assert _rel(out, _reference(q, k, v, keep, 0.0, sink, window)) <= 1e-4


@pytest.mark.parametrize("S", [1, 17])
def test_every_tile_alignment(S):
    """Window and sink edges at every offset within a 16-key tile: Skv over 16 residues."""
    for skv in range(40, 56):
        q, k, v, _ = _inputs(1, 1, 1, S, skv, 16, torch.float32, skv)
        for sink, window in ((3, 16), (17, 21)):
            out = T.sparse_attention(q, k, v, None, None, 0.0, sink, window, 0, None,
                                     "rotate_half", block_m=16, block_n=16,
                                     num_splits=2 if S == 1 else 1, dense_fallback=False)
            ref = _reference(q, k, v, None, 0.0, sink, window)
            assert _rel(out, ref) <= 1e-4, (skv, sink, window)


def test_decode_split_kv_bf16():
    q, k, v, keep = _inputs(1, 4, 2, 1, 131, 64, torch.bfloat16, 5, 2)
    out = T.sparse_attention(q, k, v, keep, None, 0.0, 4, 16, 0, None, "rotate_half",
                             block_n=16, num_splits=3, dense_fallback=False)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _reference(q, k, v, keep, 0.0, 4, 16)) <= 2e-2


CAPPED = [  # B, H, Hkv, S, Skv, D, rot_dims, sink, window, cap, style, splits
    (1, 2, 1, 40, 40, 16, 16, 2, 4, 6, "rotate_half", None),      # prefill, all channels
    (1, 2, 1, 20, 100, 32, 16, 3, 9, 12, "interleaved", None),    # chunked, half rotated
    (1, 4, 1, 3, 200, 64, 32, 4, 16, 20, "rotate_half", 4),       # decode, split
    (1, 4, 2, 1, 150, 80, 64, 5, 16, 30, "complex", 2),           # D=80, R=64
]


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,rot,sink,window,cap,style,splits", CAPPED)
def test_cap_fused_rotation(B, H, Hkv, S, Skv, D, rot, sink, window, cap, style, splits):
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, torch.float32, cap, 0)
    inv = _inv_freq(rot)
    out = T.sparse_attention(q, k, v, keep, None, 0.0, sink, window, cap, inv, style,
                             block_m=16, block_n=16, num_splits=splits, dense_fallback=False)
    ref = _reference(q, k, v, keep, 0.0, sink, window, cap, inv, style)
    assert _rel(out, ref) <= 1e-4
    uncapped = _reference(q, k, v, keep, 0.0, sink, window)
    assert _rel(uncapped, ref) > 1e-3            # the cap changes the answer here


def test_cap_half():
    q, k, v, _ = _inputs(1, 2, 1, 20, 100, 32, torch.float16, 1, 0)
    inv = _inv_freq(32)
    out = T.sparse_attention(q, k, v, None, None, 0.0, 3, 9, 12, inv, "rotate_half",
                             block_m=16, block_n=16, dense_fallback=False)
    assert _rel(out, _reference(q, k, v, None, 0.0, 3, 9, 12, inv)) <= 2e-2


def test_fully_masked_rows_are_zero():
    q, k, v, _ = _inputs(1, 2, 1, 20, 20, 16, torch.float32, 2, 0)
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, :8] = False                   # queries 0..7 see only padding
    out = T.sparse_attention(q, k, v, keep, None, 0.0, 2, 6, 0, None, "rotate_half",
                             block_m=16, block_n=16, dense_fallback=False)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    assert _rel(out, _reference(q, k, v, keep, 0.0, 2, 6)) <= 1e-4


def test_strided_inputs_and_value_head_dim():
    """q/k/v as transposed [B, S, H, D] views (no copy), v with its own head dim."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 26, 4, 32, generator=g).transpose(1, 2)           # [B, H, S, D] view
    k = torch.randn(1, 26, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 26, 2, 48, generator=g).transpose(1, 2)           # Dv = 48
    out = T.sparse_attention(q, k, v, None, None, 0.0, 1, 5, 0, None, "rotate_half",
                             block_m=16, block_n=16, dense_fallback=False)
    assert out.shape == (1, 4, 26, 48)
    assert _rel(out, _reference(q, k, v, None, 0.0, 1, 5)) <= 1e-4


# --- dense fallback --------------------------------------------------------------------------

def test_dense_fallback_when_the_window_covers_everything(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(T, "_launch", boom)
    q, k, v, _ = _inputs(1, 4, 2, 12, 12, 16, torch.float32, 6)
    out = T.sparse_attention(q, k, v, None, None, 0.0, 2, 50, 0, None, "rotate_half")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref)
    q1 = q[:, :, -1:]
    out = T.sparse_attention(q1, k, v, None, None, 0.0, 0, 0, 0, None, "rotate_half")
    assert _rel(out, _reference(q1, k, v, None)) <= 1e-5


def test_dense_fallback_at_high_density(monkeypatch):
    s = 40
    assert R.density(s, s, 2, 38) >= T.DENSE_DENSITY and s <= T.DENSE_MAX_KV
    assert T.prefer_dense(s, s, 2, 38, None, 0.0, 0)
    assert not T.prefer_dense(s, s, 2, 8, None, 0.0, 0)                  # sparse: the kernel
    assert not T.prefer_dense(s, s, 2, 38, None, 5.0, 0)                 # SDPA has no softcap
    assert not T.prefer_dense(s, T.DENSE_MAX_KV + 1, 2, T.DENSE_MAX_KV, None, 0.0, 0)
    monkeypatch.setattr(T, "_launch", lambda *a, **kw: pytest.fail("the kernel ran"))
    q, k, v, keep = _inputs(1, 2, 1, s, s, 16, torch.float32, 8, 3)
    out = T.sparse_attention(q, k, v, keep, None, 0.0, 2, 38, 0, None, "rotate_half")
    assert _rel(out, _reference(q, k, v, keep, 0.0, 2, 38)) <= 1e-5


def test_chunked_prefill_without_window_runs_the_kernel():
    q, k, v, _ = _inputs(1, 2, 1, 20, 45, 16, torch.float32, 9)
    out = T.sparse_attention(q, k, v, None, None, 0.0, 0, 0, 0, None, "rotate_half",
                             block_m=16, block_n=16)
    assert _rel(out, _reference(q, k, v, None)) <= 1e-4


# --- block table -----------------------------------------------------------------------------

def _table(B, H, nqb, nkb, width, seed):
    """Random distinct kv block ids per row, -1 padded: int32 [B, H, nqb, width]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((B, H, nqb, width), -1, dtype=torch.int32)
    for idx in range(B * H * nqb):
        n = int(torch.randint(0, width + 1, (1,), generator=g))
        ids = torch.randperm(nkb, generator=g)[: min(n, nkb)]
        t.view(-1, width)[idx, : ids.numel()] = ids.int()
    return t


def _table_reference(q, k, v, table, bs, keep=None, sink=0, window=0):
    B, H, S, _ = q.shape
    skv = k.shape[2]
    qp, kp = R.positions(S, skv)
    listed = torch.zeros(B, H, S, skv, dtype=torch.bool)                   # [B, H, S, Skv]
    for b in range(B):
        for h in range(H):
            for i in range(S):
                for kb in table[b, h, i // bs].tolist():
                    if kb >= 0:
                        listed[b, h, i, kb * bs: (kb + 1) * bs] = True
    vis = listed & (kp[None, :] <= qp[:, None])
    if window > 0:
        vis = vis | R.visible(qp, kp, sink, window)
    if keep is not None:
        vis = vis & keep[:, None, None, :]
    ke, ve = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
    scores = (q @ ke.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return probs @ ve


@pytest.mark.parametrize("S,Skv,window,pad,splits", [
    (40, 40, 0, 0, None),       # the table alone
    (40, 70, 6, 1, None),       # table ∪ sink + window, chunked prefill, padding
    (2, 70, 0, 0, 3),           # decode over the table, split
])
def test_block_table(S, Skv, window, pad, splits):
    bs = 16
    B, H, Hkv, D = 1, 4, 2, 32
    q, k, v, keep = _inputs(B, H, Hkv, S, Skv, D, torch.float32, S + Skv, pad)
    table = _table(B, H, -(-S // bs), -(-Skv // bs), 3, S)
    table[table == 0] = -1
    table[..., 0] = 0                     # block 0 (sinks) listed: counted once in the union
    out = T.block_sparse_attention(q, k, v, table, bs, key_keep=keep, sink=3, window=window,
                                   num_splits=splits)
    ref = _table_reference(q, k, v, table, bs, keep, 3, window)
    assert _rel(out, ref) <= 1e-4


def test_block_table_bigger_blocks_than_tiles():
    """block_size 32 over 16-wide kernel tiles: each table entry is two tiles."""
    q, k, v, _ = _inputs(1, 2, 1, 50, 50, 16, torch.float32, 12)
    table = _table(1, 2, 2, 2, 2, 1)
    out = T.block_sparse_attention(q, k, v, table, 32, block_m=16, block_n=16)
    assert _rel(out, _table_reference(q, k, v, table, 32)) <= 1e-4


def test_block_table_shape_is_checked():
    q, k, v, _ = _inputs(1, 2, 1, 20, 20, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="block_index"):
        T.block_sparse_attention(q, k, v, torch.zeros(1, 2, 5, 1, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="power of two"):
        T.block_sparse_attention(q, k, v, torch.zeros(1, 2, 1, 1, dtype=torch.int32), 24)


# --- availability ----------------------------------------------------------------------------

def test_supports():
    q, k, v, keep = _inputs(2, 4, 2, 5, 9, 80, torch.float16, 0, 1)
    assert T.AVAILABLE and T.supports(q, k, v, keep, 0.0, 0)
    assert T.supports(q, k, v, None, 30.0, 8)                    # softcap and cap are in-kernel
    assert not T.supports(q.double(), k.double(), v.double(), None)
    assert not T.supports(q, k.float(), v, None)                 # mixed dtypes
    assert not T.supports(q, k, v, keep[:, :5])                  # padding of the wrong length
    big = torch.zeros(1, 1, 2, 512, dtype=torch.float16)
    assert not T.supports(big, big, big, None)                   # head dim > 256
    assert not T.supports(q, k[:, :1].expand(2, 3, 9, 80), v[:, :1].expand(2, 3, 9, 80), None)
    qm = torch.empty(1, 1, 1, 64, dtype=torch.float16, device="meta")
    big = torch.empty(1, 1, 2 ** 24, 64, dtype=torch.float16, device="meta")
    huge = torch.empty(1, 1, 2 ** 25, 64, dtype=torch.float16, device="meta")
    assert T.supports(qm, big, big, None)
    assert not T.supports(qm, huge, huge, None)                  # int32 key offsets would overflow


def test_import_without_cuda_or_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from longfx.kernels.sparse_attention import triton as T; "
            "assert T.AVAILABLE == torch.cuda.is_available(), T.AVAILABLE; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
