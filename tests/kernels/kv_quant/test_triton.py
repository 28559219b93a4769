"""The kv_quant Triton kernels against the reference, under the Triton interpreter (CPU).

Small odd shapes (Skv=423, D=80), every bit width, both scale formats, ring of 0/128 tokens.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from longfx.kernels.attention.reference import attention  # noqa: E402
from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _kv(B, Hkv, n, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, D, generator=g)
    k[..., 1] += 4.0                                        # an outlier channel
    return k.to(dtype), torch.randn(B, Hkv, n, D, generator=g).to(dtype)


def _assert_same_state(tri, ref):
    assert int(tri.length) == int(ref.length)
    for name in R.QuantizedKV.NAMES:
        a, b = getattr(tri, name), getattr(ref, name)
        if a.dtype == torch.uint8:       # exp2/division may differ by an ulp at rounding ties
            diff = (a.int() - b.int()).abs()
            assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, a.numel() // 1000), name
        elif a.dtype == torch.float16:
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6), name
        else:
            assert torch.equal(a, b), name


APPEND_CASES = [  # bits, group, residual, scales, D, dtype, chunks
    (4, 32, 0, "u8", 80, torch.float32, (200, 1, 29, 70)),
    (2, 64, 128, "fp16", 64, torch.bfloat16, (150, 1, 1, 148)),
    (8, 32, 0, "u8", 128, torch.float32, (33, 64, 1)),
    (2, 32, 40, "u8", 80, torch.float16, (97, 3, 1)),
]


@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,chunks", APPEND_CASES)
def test_append_matches_reference(bits, group, residual, scales, D, dtype, chunks):
    c = R.KVQuantConfig(bits, group, residual, scales)
    k, v = _kv(2, 2, sum(chunks), D, dtype, seed=bits * D)
    ref = R.QuantizedKV.empty(2, 2, D, sum(chunks), c, dtype)
    tri = R.QuantizedKV.empty(2, 2, D, sum(chunks), c, dtype)
    t = 0
    for s in chunks:
        kn, vn = k[:, :, t:t + s], v[:, :, t:t + s]
        R.append(ref, kn, vn)
        T.append(tri, kn.transpose(1, 2).contiguous().transpose(1, 2), vn)   # strided k works
        t += s
        _assert_same_state(tri, ref)


DECODE_CASES = [  # bits, group, residual, scales, D, dtype, S, splits
    (4, 64, 128, "u8", 128, torch.float32, 1, 3),
    (4, 32, 0, "fp16", 80, torch.bfloat16, 3, 4),
    (2, 64, 0, "u8", 64, torch.float32, 2, 2),              # one value group a token
    (2, 64, 128, "fp16", 80, torch.bfloat16, 1, 5),
    (8, 32, 128, "u8", 64, torch.float16, 16, 2),
    (8, 64, 0, "fp16", 128, torch.bfloat16, 1, None),
]


@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,S,splits", DECODE_CASES)
def test_decode_matches_reference(bits, group, residual, scales, D, dtype, S, splits):
    c = R.KVQuantConfig(bits, group, residual, scales)
    B, Hkv, H, Skv = 2, 2, 8, 423                           # GQA 4:1
    k, v = _kv(B, Hkv, Skv, D, dtype, seed=bits + D + S)
    st = R.append(R.QuantizedKV.empty(B, Hkv, D, 450, c, dtype), k, v)
    q = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(S)).to(dtype)
    out = T.attention_decode(q, st, 0.125, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    kd, vd = R.dequantize_state(st)
    mask = torch.ones(S, Skv, dtype=torch.bool).tril(Skv - S)
    want = attention(q.float(), kd.float(), vd.float(), mask, 0.125)
    assert _rel(out, want) < (1e-3 if dtype == torch.float32 else 2e-2)


def test_decode_short_state_and_empty_splits():
    """Only the ring is filled (no packed tokens), more splits than tiles, S == length."""
    c = R.KVQuantConfig(4, 32, 64)
    k, v = _kv(1, 2, 5, 64, torch.float32, seed=1)
    st = R.append(R.QuantizedKV.empty(1, 2, 64, 200, c, torch.float32), k, v)
    q = torch.randn(1, 6, 5, 64)
    out = T.attention_decode(q, st, None, num_splits=7)
    assert _rel(out, R.attention_decode(q, st)) < 1e-3


def test_append_then_decode_across_a_group_boundary():
    """Token-by-token Triton append + decode, the length read on the device, vs the reference."""
    c = R.KVQuantConfig(2, 32, 32)
    k, v = _kv(1, 1, 68, 64, torch.float32, seed=7)
    ref = R.append(R.QuantizedKV.empty(1, 1, 64, 70, c, torch.float32), k[:, :, :64], v[:, :, :64])
    tri = T.append(R.QuantizedKV.empty(1, 1, 64, 70, c, torch.float32), k[:, :, :64], v[:, :, :64])
    q = torch.randn(1, 2, 4, 64, generator=torch.Generator().manual_seed(0))
    for p in range(64, 67):                                 # n_packed: 32 -> 64 at p = 65
        R.append(ref, k[:, :, p:p + 1], v[:, :, p:p + 1])
        T.append(tri, k[:, :, p:p + 1], v[:, :, p:p + 1])
        _assert_same_state(tri, ref)
        assert _rel(T.attention_decode(q[:, :, p - 64:p - 63], tri, 0.2, num_splits=2),
                    R.attention_decode(q[:, :, p - 64:p - 63], ref, 0.2)) < 1e-3


def test_supports_and_errors():
    c = R.KVQuantConfig(4, 64, 0)
    st = R.QuantizedKV.empty(1, 2, 64, 64, c, torch.float32)
    assert T.supports_attention(torch.zeros(1, 4, 1, 64), st)
    assert not T.supports_attention(torch.zeros(1, 4, 1, 64, dtype=torch.float16), st)
    assert not T.supports_attention(torch.zeros(1, 64, 8, 64), st)       # G·S = 256 rows
    odd = R.QuantizedKV.empty(1, 2, 64, 96, R.KVQuantConfig(4, 48, 0), torch.float32)
    assert not T.supports_attention(torch.zeros(1, 4, 1, 64), odd)
    with pytest.raises(ValueError, match="G·S"):
        T.attention_decode(torch.zeros(1, 64, 8, 64), st)
    with pytest.raises(ValueError, match="power-of-two"):
        T.append(odd, torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))


def test_import_without_cuda_or_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, longfx.kernels.kv_quant.triton as t; "
            "assert t.AVAILABLE == torch.cuda.is_available()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_a_key_bits_state_is_taken_by_the_append_and_asmt_only():
    """Keys wider than values (``key_bits``): the append and the default decode ("asmt") take
    such a state, the other decode variants refuse it (test_triton_key_bits.py: against the
    reference)."""
    k, v = _kv(1, 2, 80, 64, torch.float32, 7)
    q = torch.randn(1, 4, 1, 64)
    wide = R.QuantizedKV.empty(1, 2, 64, 128, R.KVQuantConfig(bits=2, group=32, residual=32,
                                                               key_bits=4), torch.float32)
    same = R.QuantizedKV.empty(1, 2, 64, 128, R.KVQuantConfig(bits=2, group=32, residual=32),
                               torch.float32)
    assert T.supports_append(same, k, v) and T.supports_attention(q, same)
    assert T.supports_append(wide, k, v) and T.supports_attention(q, wide)
    assert T.supports_attention(q, same, variant="joined")
    assert not T.supports_attention(q, wide, variant="joined")


ASMT_OPTION_CASES = [  # bits, group, residual, scales, D, dtype, G, S, length, splits
    (4, 64, 128, "u8", 128, torch.bfloat16, 4, 1, 128 + 5 * 64 + 9, 7),
    (2, 32, 32, "fp16", 96, torch.float16, 7, 3, 32 + 6 * 32 + 5, 5),
    (4, 32, 32, "u8", 64, torch.float32, 4, 2, 300, 9),
]


@pytest.mark.parametrize("raw,wait_split,combine_tile", [(True, True, 8192), (False, False, 64),
                                                         (True, False, 32)])
@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,G,S,length,splits",
                         ASMT_OPTION_CASES)
def test_asmt_options_match_reference(monkeypatch, raw, wait_split, combine_tile, bits, group,
                                      residual, scales, D, dtype, G, S, length, splits):
    """"asmt"'s switches (triton._ASMT: operands that keep the magic offset, the run-time sink
    branch off) and combine programs that take a few channels each (_COMBINE_TILE), with and
    without exact sinks, against the reference."""
    monkeypatch.setitem(T._ASMT, "raw", raw)
    monkeypatch.setitem(T._ASMT, "wait_split", wait_split)
    monkeypatch.setattr(T, "_COMBINE_TILE", combine_tile)
    c = R.KVQuantConfig(bits, group, residual, scales)
    k, v = _kv(1, 2, length, D, dtype, seed=bits + D + S)
    st = R.append(R.QuantizedKV.empty(1, 2, D, length + 8, c, dtype), k, v)
    q = torch.randn(1, 2 * G, S, D, generator=torch.Generator().manual_seed(G)).to(dtype)
    sk, sv = ((3 * x[:, :, :4].float() + 1).to(dtype) for x in (k, v))
    kd, vd = R.dequantize_state(st)
    mask = torch.ones(S, length, dtype=torch.bool).tril(length - S)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    out = T.attention_decode(q, st, 0.125, num_splits=splits)
    assert _rel(out, attention(q.float(), kd.float(), vd.float(), mask, 0.125)) < tol
    out = T.attention_decode(q, st, 0.125, num_splits=splits, sink_k=sk, sink_v=sv)
    ks, vs = R.with_sinks(kd.float(), vd.float(), sk.float(), sv.float())
    assert _rel(out, attention(q.float(), ks, vs, mask, 0.125)) < tol
