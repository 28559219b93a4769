"""The Triton split-KV decode ("asmt") with a sliding window (``window=w``: a query at held
index p sees held keys p − w + 1 .. p), against ``reference.attention_decode(..., window=w)``.

Runs under the Triton interpreter on CPU, and on CUDA (compiled kernels, inline-PTX planes)
when a GPU is there and TRITON_INTERPRET is not set: run it alone there, after ``pip install
.``, from outside the checkout (inside it, ``python -m pytest`` imports the source tree's
``longfx`` folder, which is not the package), e.g. ``cd /tmp && python -m pytest -c /dev/null
--rootdir=/tmp -p no:logging <repo>/tests/kernels/kv_quant/test_triton_window.py``.

Odd shapes: windows smaller than a tile (and of one key), starting inside a tile (the partial
tile is masked), across the packed / ring boundary, inside the ring only, and longer than the
held length (= no window); S = 1 and S > 1 (each query its own window); GQA 4 and 1; 2- and
4-bit codes and keys of another width (K4V2, K2V4, K8V4); exact sinks inside and outside the
window; fp32, bf16, fp16. Each case also checks that the answer without the window is far
from the windowed one, so a kernel that ignored the window fails. The tiles before the window
are not read at all: the packed tokens there are poisoned with NaN scales and the answer stays
finite and right.
"""
import os

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"    # before triton is imported anywhere

import pytest  # noqa: E402

from longfx.kernels.kv_quant import op as kv_op  # noqa: E402
from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE or T.INTERPRET == CUDA,
                                reason="needs triton (CUDA, or the interpreter on CPU)")

DEV = torch.device("cuda" if CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _tol(dtype):
    return 1e-3 if dtype == F32 else 2e-2          # test_triton.py's decode tolerances


def _state(bits, key_bits, group, residual, scales, D, dtype, length, seed, B=2, Hkv=2):
    c = R.KVQuantConfig(bits, group, residual, scales, key_bits=key_bits)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, length, D, generator=g)
    k[..., 1] += 4.0                                        # an outlier channel
    v = torch.randn(B, Hkv, length, D, generator=g)
    st = R.QuantizedKV.empty(B, Hkv, D, length + 8, c, dtype, DEV)
    return R.append(st, k.to(dtype).to(DEV), v.to(dtype).to(DEV))


def _float_state(st):
    """The same state with its ring in fp32 (the reference then attends in fp32)."""
    t = list(st.tensors())
    t[4], t[5] = t[4].float(), t[5].float()
    return R.QuantizedKV(*t, st.config)


def _sinks(st, n, seed):
    """A random exact copy of the first n positions, unlike the stored tokens."""
    B, Hkv, _, D = st.k_ring.shape
    g = torch.Generator().manual_seed(seed)
    sk = 3 * torch.randn(B, Hkv, n, D, generator=g)
    sv = 4 * torch.randn(B, Hkv, n, D, generator=g) + 2
    return sk.to(st.k_ring.dtype).to(DEV), sv.to(st.k_ring.dtype).to(DEV)


CASES = [  # bits, key_bits, group, residual, D, dtype, G, S, length, window, sinks, splits, block_n
    (4, None, 32, 32, 64, F32, 4, 1, 32 * 6 + 7, 5, 0, None, 32),       # window inside one tile
    (4, None, 32, 32, 80, F32, 4, 1, 32 * 6 + 7, 45, 0, 3, 32),         # starts inside a tile
    (4, None, 64, 64, 64, BF16, 4, 1, 64 * 7 + 9, 130, 0, None, 32),    # several tiles + ring
    (2, None, 32, 32, 96, BF16, 1, 3, 32 * 5 + 20, 50, 0, 2, 32),       # S > 1, G = 1
    (4, None, 32, 32, 64, F16, 4, 2, 32 * 4 + 17, 1, 0, 2, 32),         # one key, S = 2
    (4, None, 32, 64, 64, F32, 4, 1, 64 + 32 * 3 + 5, 30, 0, 4, 32),    # the ring only
    (4, None, 32, 32, 64, F32, 4, 1, 100, 1000, 0, 2, 32),              # longer than held
    (4, 2, 64, 64, 128, BF16, 4, 1, 64 * 6 + 33, 200, 0, None, 64),     # K4V2
    (2, 4, 32, 32, 64, F32, 2, 2, 32 * 7 + 3, 70, 0, 3, 32),            # K2V4
    (4, 8, 32, 32, 64, F16, 4, 1, 32 * 5 + 11, 40, 0, 2, 32),           # K8V4
    (4, None, 32, 32, 64, F32, 4, 1, 20, 9, 4, None, 32),               # sinks, nothing packed
    (4, None, 32, 32, 64, F32, 4, 1, 40, 38, 4, 2, 32),                 # some sinks in the window
    (2, None, 32, 32, 64, BF16, 4, 3, 32 * 4 + 3, 60, 4, 2, 32),        # sinks outside it, S > 1
    (4, 2, 32, 32, 64, F32, 4, 1, 32 * 3 + 10, 25, 7, 2, 32),           # K4V2 with sinks
]


@pytest.mark.parametrize(
    "bits,key_bits,group,residual,D,dtype,G,S,length,window,sinks,splits,block_n", CASES)
def test_windowed_decode_matches_reference(bits, key_bits, group, residual, D, dtype, G, S,
                                           length, window, sinks, splits, block_n):
    st = _state(bits, key_bits, group, residual, "u8", D, dtype, length,
                seed=bits * 7 + D + G * S + window)
    q = torch.randn(2, 2 * G, S, D, generator=torch.Generator().manual_seed(window + S))
    q = q.to(dtype).to(DEV)
    sk, sv = _sinks(st, sinks, seed=sinks + window) if sinks else (None, None)
    assert T.supports_attention(q, st, sinks=bool(sinks), window=window)
    out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n, sink_k=sk,
                             sink_v=sv, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    fs = _float_state(st)
    fsk, fsv = (sk.float(), sv.float()) if sinks else (None, None)
    want = R.attention_decode(q.float(), fs, 0.125, fsk, fsv, window)
    assert _rel(out, want) < _tol(dtype)
    if window < length:                              # a kernel that ignored the window fails
        assert _rel(R.attention_decode(q.float(), fs, 0.125, fsk, fsv), want) > 0.05
        assert _rel(T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n,
                                       sink_k=sk, sink_v=sv), want) > 0.05


@pytest.mark.parametrize("key_bits", [None, 2])
def test_tiles_before_the_window_are_not_read(key_bits):
    """fp16 scales of every packed token in the tiles wholly before the window set to NaN: a
    kernel that loaded them (even to mask them) would return NaN. The answer equals the
    reference over the clean state."""
    group, block_n, length, window = 32, 32, 32 * 8 + 5, 70
    st = _state(4, key_bits, group, 32, "fp16", 64, F32, length, seed=3)
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(4)).to(DEV)
    want = R.attention_decode(q, st, 0.125, window=window)
    lo = length - window                                     # the first key the query sees
    dead = lo // block_n * block_n                           # tokens in wholly earlier tiles
    assert dead >= 4 * block_n
    st.k_params[:, :, :dead // group] = float("nan")
    st.v_params[:, :, :dead] = float("nan")
    for splits in (None, 1, 5):
        out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n, window=window)
        assert bool(torch.isfinite(out).all()) and _rel(out, want) < 1e-3
    assert not bool(torch.isfinite(T.attention_decode(q, st, 0.125, block_n=block_n)).all())


def test_supports_errors_and_the_op_with_a_window():
    """Only "asmt" over 2/4-bit (or two-width) codes applies a window: one width of 8 bits and
    the other variants say no and raise; the op falls back to the dequantized path there
    (on CUDA: ``dequantized_attention``) and gives the reference's answer."""
    st = _state(4, None, 32, 32, "u8", 64, F32, 32 * 3 + 5, seed=5)
    q = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(6)).to(DEV)
    assert T.supports_attention(q, st, window=7)
    assert not T.supports_attention(q, st, window=7, variant="joined")
    with pytest.raises(ValueError, match="window"):
        T.attention_decode(q, st, variant="planes", window=7)
    with pytest.raises(ValueError, match="window"):
        T.attention_decode(q, st, window=-1)
    eight = _state(8, None, 32, 32, "u8", 64, F32, 32 * 3 + 5, seed=7)
    assert T.supports_attention(q, eight) and not T.supports_attention(q, eight, window=7)
    with pytest.raises(ValueError, match="asmt"):
        T.attention_decode(q, eight, window=7)
    for state, bits in ((st, 4), (eight, 8)):
        got = kv_op.ATTENTION(q, *state.tensors(), 0.125, bits, 32, None, None, 7)
        want = R.attention_decode(q, state, 0.125, window=7)
        assert _rel(got, want) < 1e-3
        assert _rel(R.attention_decode(q, state, 0.125), want) > 0.05
