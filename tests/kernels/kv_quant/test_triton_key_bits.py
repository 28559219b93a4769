"""The kv_quant Triton kernels over states whose keys are wider or narrower than their values
(``key_bits``, KIVI's "K4V2"; key codes [B, Hkv, Sp, D·key_bits/8]), against the reference.

Runs under the Triton interpreter on CPU, and on CUDA (compiled kernels, the inline-PTX key
and value planes) when a GPU is there and TRITON_INTERPRET is not set: run it alone there,
after ``pip install .``, from outside the checkout, e.g. ``cd /tmp && python -m pytest -c
/dev/null --rootdir=/tmp <repo>/tests/kernels/kv_quant/test_triton_key_bits.py``.

Append: every pair of widths that differ (2/4/8 bits), both scale formats, chunks that leave
the ring partly filled and lengths off the group; the packed state as exact as
test_triton.py demands (uint8 codes and params within 1 of the reference on at most 0.1%,
fp16 params to 1e-3, the ring and length equal). Decode ("asmt", the default): K4V2, K2V4
and the pairs with an 8-bit side, head dims 64/128, GQA groups 1 and 4, S 1..3, lengths off
the group (ring partly filled, everything in the ring), exact sinks (random copies, n inside
the packed part and across the packed / ring boundary), fp32 / bf16 / fp16 — within
test_triton.py's tolerances of dequantize + fp32 attention. A state with key_bits == bits
launches the single-width kernels with the same constexprs (no KBITS) and gives the same
bits as one with key_bits=None; the other decode variants refuse two widths.
"""
import os

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"    # before triton is imported anywhere

import pytest  # noqa: E402

from longfx.kernels.attention.reference import attention  # noqa: E402
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


def _kv(B, Hkv, n, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, D, generator=g)
    k[..., 1] += 4.0                                        # an outlier channel
    v = torch.randn(B, Hkv, n, D, generator=g)
    return k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def _assert_same_state(tri, ref):
    """test_triton.py's rule: codes / u8 params within 1 (rounding ties of exp2 / division) on
    at most 0.1% of the bytes, fp16 params to 1e-3, the rest equal."""
    assert int(tri.length) == int(ref.length)
    for name in R.QuantizedKV.NAMES:
        a, b = getattr(tri, name), getattr(ref, name)
        assert a.shape == b.shape, name
        if a.dtype == torch.uint8:
            diff = (a.int() - b.int()).abs()
            assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, a.numel() // 1000), name
        elif a.dtype == torch.float16:
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6), name
        else:
            assert torch.equal(a, b), name


APPEND_CASES = [  # key_bits, bits, group, residual, scales, D, dtype, chunks
    (4, 2, 64, 128, "u8", 128, BF16, (150, 1, 1, 148)),    # ring partly filled after each
    (2, 4, 32, 0, "fp16", 64, F32, (200, 1, 29, 70)),
    (8, 4, 32, 40, "u8", 64, F16, (97, 3, 1)),
    (4, 8, 32, 0, "u8", 128, F32, (33, 64, 1)),
    (8, 2, 64, 64, "fp16", 64, BF16, (130, 5, 60)),
    (2, 8, 32, 32, "u8", 128, F32, (70, 1, 40)),
]


@pytest.mark.parametrize("key_bits,bits,group,residual,scales,D,dtype,chunks", APPEND_CASES)
def test_append_matches_reference(key_bits, bits, group, residual, scales, D, dtype, chunks):
    c = R.KVQuantConfig(bits, group, residual, scales, key_bits=key_bits)
    k, v = _kv(2, 2, sum(chunks), D, dtype, seed=key_bits * 10 + bits + D)
    ref = R.QuantizedKV.empty(2, 2, D, sum(chunks), c, dtype, DEV)
    tri = R.QuantizedKV.empty(2, 2, D, sum(chunks), c, dtype, DEV)
    assert tri.k_codes.shape[-1] == D * key_bits // 8 != tri.v_codes.shape[-1]
    assert T.supports_append(tri, k, v)
    t = 0
    for s in chunks:
        kn, vn = k[:, :, t:t + s], v[:, :, t:t + s]
        R.append(ref, kn, vn)
        T.append(tri, kn.transpose(1, 2).contiguous().transpose(1, 2), vn)   # strided k works
        t += s
        _assert_same_state(tri, ref)
    assert R.n_packed(t, c) > 0


def _state(key_bits, bits, group, residual, scales, D, dtype, length, seed, B=2, Hkv=2):
    c = R.KVQuantConfig(bits, group, residual, scales, key_bits=key_bits)
    k, v = _kv(B, Hkv, length, D, dtype, seed)
    return R.append(R.QuantizedKV.empty(B, Hkv, D, length + 8, c, dtype, DEV), k, v)


def _want(q, st, scale, sink_k=None, sink_v=None):
    """Dequantize + fp32 attention (bottom-right causal), the sink copy read when given."""
    kd, vd = R.with_sinks(*R.dequantize_state(st), sink_k, sink_v)
    S, L = q.shape[2], int(st.length)
    mask = torch.ones(S, L, dtype=torch.bool, device=DEV).tril(L - S)
    return attention(q.float(), kd.float(), vd.float(), mask, scale)


DECODE_CASES = [  # key_bits, bits, group, residual, scales, D, dtype, G, S, length, splits, block_n
    (4, 2, 64, 128, "u8", 128, BF16, 4, 1, 128 + 5 * 64 + 9, None, 64),   # Llama-8B-like K4V2
    (4, 2, 32, 32, "fp16", 64, F32, 1, 3, 32 + 6 * 32 + 5, 3, 32),       # G = 1, S = 3
    (4, 2, 64, 128, "u8", 64, F16, 4, 2, 100, 2, 64),                     # everything in the ring
    (2, 4, 64, 64, "u8", 128, F16, 4, 2, 64 + 3 * 64 + 30, 4, 64),
    (2, 4, 32, 0, "fp16", 64, BF16, 1, 1, 32 + 9 * 32 + 1, 5, 32),        # ring of one group
    (8, 4, 64, 64, "u8", 128, BF16, 4, 1, 64 + 3 * 64 + 1, 3, 32),
    (4, 8, 32, 32, "fp16", 64, F32, 4, 2, 32 + 5 * 32 + 17, 2, 32),
    (8, 2, 32, 64, "u8", 64, F32, 1, 1, 64 + 4 * 32 + 3, 3, 32),
    (2, 8, 64, 128, "u8", 128, BF16, 4, 1, 128 + 2 * 64 + 50, None, 64),
]


@pytest.mark.parametrize("key_bits,bits,group,residual,scales,D,dtype,G,S,length,splits,block_n",
                         DECODE_CASES)
def test_decode_matches_reference(key_bits, bits, group, residual, scales, D, dtype, G, S,
                                  length, splits, block_n):
    st = _state(key_bits, bits, group, residual, scales, D, dtype, length,
                seed=key_bits * 10 + bits + G * S)
    q = torch.randn(2, 2 * G, S, D, generator=torch.Generator().manual_seed(G + S)).to(dtype)
    q = q.to(DEV)
    assert T.key_bits(st) == key_bits and T.supports_attention(q, st)
    out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype
    want = _want(q, st, 0.125)
    assert _rel(out, want) < _tol(dtype)


SINK_CASES = [  # key_bits, bits, group, residual, D, dtype, G, S, length, n, splits, block_n
    (4, 2, 32, 64, 64, BF16, 4, 1, 64 + 4 * 32 + 17, 7, 2, 32),       # n inside the packed part
    (4, 2, 64, 128, 128, BF16, 4, 1, 128 + 3 * 64 + 9, 4, None, 64),
    (2, 4, 32, 32, 128, F32, 1, 2, 40, 33, 2, 32),                     # n straddles packed / ring
    (2, 4, 32, 32, 64, F16, 4, 3, 5, 7, 2, 32),                        # L < n, nothing packed
    (8, 4, 32, 32, 64, F32, 4, 1, 32 + 3 * 32, 20, 2, 32),             # n > 16: two sink steps
    (4, 8, 64, 64, 128, BF16, 1, 1, 64 + 2 * 64 + 5, 4, 3, 64),
]


@pytest.mark.parametrize("key_bits,bits,group,residual,D,dtype,G,S,length,n,splits,block_n",
                         SINK_CASES)
def test_decode_with_sinks_matches_reference(key_bits, bits, group, residual, D, dtype, G, S,
                                             length, n, splits, block_n):
    """Random sink copies (unlike the stored tokens): a sink position read from its stored
    form, or twice, fails; the answer without the sinks is checked to be far off."""
    seed = key_bits * 10 + bits + n
    st = _state(key_bits, bits, group, residual, "u8", D, dtype, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    sk = (3 * torch.randn(2, 2, n, D, generator=g)).to(dtype).to(DEV)
    sv = (4 * torch.randn(2, 2, n, D, generator=g) + 2).to(dtype).to(DEV)
    q = torch.randn(2, 2 * G, S, D, generator=g).to(dtype).to(DEV)
    assert T.supports_attention(q, st, sinks=True)
    out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n, sink_k=sk,
                             sink_v=sv)
    want = _want(q, st, 0.125, sk, sv)
    assert _rel(out, want) < _tol(dtype)
    assert _rel(_want(q, st, 0.125), want) > 0.1                         # the sinks matter


@pytest.mark.parametrize("key_bits,bits", [(4, 2), (2, 4)])
def test_append_then_decode_across_group_boundaries(key_bits, bits):
    """Token-by-token Triton append + decode (the length read on the device) vs the
    reference, over two group flushes, GQA 4, D 64."""
    c = R.KVQuantConfig(bits, 32, 32, key_bits=key_bits)
    k, v = _kv(1, 2, 132, 64, F32, seed=key_bits)
    ref = R.append(R.QuantizedKV.empty(1, 2, 64, 140, c, F32, DEV), k[:, :, :64], v[:, :, :64])
    tri = T.append(R.QuantizedKV.empty(1, 2, 64, 140, c, F32, DEV), k[:, :, :64], v[:, :, :64])
    q = torch.randn(1, 8, 1, 64, generator=torch.Generator().manual_seed(0)).to(DEV)
    for p in range(64, 132):                       # n_packed: 32 -> 64 at 65, 96 at 97, 128 at 129
        R.append(ref, k[:, :, p:p + 1], v[:, :, p:p + 1])
        T.append(tri, k[:, :, p:p + 1], v[:, :, p:p + 1])
        if p % 16 == 0 or p in (97, 129):
            _assert_same_state(tri, ref)
            assert _rel(T.attention_decode(q, tri, 0.2, num_splits=2, block_n=32),
                        _want(q, ref, 0.2)) < 1e-3
    _assert_same_state(tri, ref)


class _Spy:
    """Stands in for a Triton kernel: records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("bits", [4, 2])
def test_key_bits_equal_to_bits_runs_the_single_width_kernels(monkeypatch, bits):
    """key_bits == bits: the same launches (no KBITS / BLOCK_KDP / KCENTER / KASM) and the same
    bits as key_bits=None; K4V2 / K2V4 launch with their own key constexprs."""
    decode = _Spy(T._decode_tposed_kernel)
    append = _Spy(T._append_quantize_kernel)
    monkeypatch.setattr(T, "_decode_tposed_kernel", decode)
    monkeypatch.setattr(T, "_append_quantize_kernel", append)
    k, v = _kv(1, 2, 200, 64, BF16, seed=3)
    q = torch.randn(1, 8, 1, 64, generator=torch.Generator().manual_seed(1)).to(BF16).to(DEV)
    outs, states = [], []
    for key_bits in (None, bits, 6 - bits):
        c = R.KVQuantConfig(bits, 32, 32, key_bits=key_bits)
        st = T.append(R.QuantizedKV.empty(1, 2, 64, 210, c, BF16, DEV), k, v)
        outs.append(T.attention_decode(q, st, None, num_splits=3, block_n=32))
        states.append(st)
    plain, same, two = decode.calls
    assert "KBITS" not in plain and plain == same
    assert two["KBITS"] == 6 - bits and two["KCENTER"] == 1 << (5 - bits) and two["BITS"] == bits
    assert "KBITS" not in append.calls[0] and append.calls[0] == append.calls[1]
    assert append.calls[2]["KBITS"] == 6 - bits
    for name in R.QuantizedKV.NAMES:
        assert torch.equal(getattr(states[0], name), getattr(states[1], name)), name
    assert torch.equal(outs[0], outs[1])
    assert states[2].k_codes.shape[-1] != states[0].k_codes.shape[-1]


def test_other_variants_refuse_two_widths():
    st = _state(4, 2, 32, 32, "u8", 64, F32, 150, seed=1)
    q = torch.randn(2, 8, 1, 64).to(DEV)
    sk = torch.zeros(2, 2, 4, 64, device=DEV)
    assert T.supports_attention(q, st) and T.supports_attention(q, st, variant="asmt")
    assert T.supports_attention(q, st, sinks=True)
    for variant in ("joined", "planes", "magic", "tf32", "asm"):
        assert not T.supports_attention(q, st, variant=variant)
        assert not T.supports_attention(q, st, sinks=True, variant=variant)
        with pytest.raises(ValueError, match="two widths"):
            T.attention_decode(q, st, variant=variant)
    # a key plane of 32 / 4 = 8 columns is no dot operand: "asmt" would run "joined"
    narrow = _state(2, 4, 32, 32, "u8", 32, F32, 100, seed=2)
    q32 = torch.randn(2, 8, 1, 32).to(DEV)
    assert not T.planes_ok(q32, narrow) and not T.supports_attention(q32, narrow)
    with pytest.raises(ValueError, match="two widths"):
        T.attention_decode(q32, narrow)
    same = _state(2, 2, 32, 32, "u8", 32, F32, 100, seed=2)
    assert not T.planes_ok(q32, same) and T.supports_attention(q32, same)   # one width: "joined"
    # one width of 8 bits runs "asm" (no sinks); an 8-bit side of two widths runs "asmt"
    eight = _state(8, 8, 32, 32, "u8", 64, F32, 100, seed=3)
    k8v4 = _state(8, 4, 32, 32, "u8", 64, F32, 100, seed=3)
    assert not T.supports_attention(q, eight, sinks=True)
    assert T.supports_attention(q, k8v4, sinks=True)
    with pytest.raises(ValueError, match="asmt"):
        T.attention_decode(q, eight, sink_k=sk, sink_v=sk)


def test_packed_bytes_read_counts_the_key_width():
    st = _state(4, 2, 64, 128, "u8", 128, BF16, 64 * 10, seed=0, B=1, Hkv=1)
    n = R.n_packed(640, st.config)
    codes = n * (128 * 4 // 8 + 128 * 2 // 8)
    params = (n // 64) * 2 * 128 + n * 2 * 2
    ring = 2 * (640 - n) * 128 * 2
    assert T.packed_bytes_read(st, 640) == codes + params + ring


@pytest.mark.skipif(not CUDA, reason="the ops take the Triton path on CUDA only")
def test_the_op_runs_the_triton_kernels_on_a_two_width_state():
    """``longfx::kv_quant_attention`` is given one ``bits`` (the values'): it reads the key
    width off the tensors and takes the Triton decode (the same bits as calling it)."""
    from longfx.kernels.kv_quant import op  # noqa: F401 - registers the ops

    st = _state(4, 2, 64, 128, "u8", 128, BF16, 128 + 3 * 64 + 9, seed=5)
    q = torch.randn(2, 8, 1, 128, generator=torch.Generator().manual_seed(2)).to(BF16).to(DEV)
    got = torch.ops.longfx.kv_quant_attention(q, *st.tensors(), 0.125, 2, 64)
    assert torch.equal(got, T.attention_decode(q, st, 0.125))
    assert _rel(got, _want(q, st, 0.125)) < 2e-2
