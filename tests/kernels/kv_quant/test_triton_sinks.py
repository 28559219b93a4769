"""The Triton split-KV decode ("asmt") with an exact sink copy, against
``reference.attention_decode(q, state, scale, sink_k, sink_v)``, under the Triton interpreter.

The copies are random (not the state's first tokens), so a kernel that read a sink position's
stored form — packed, or in the full-precision ring — or added a position twice fails: each
case also checks that the answer without the sinks is far from the one with them.

Odd shapes: n = 1, 4, 7 (and 20: more than one 16-token tile of packed tokens and of the sink
loop); lengths shorter than n, with nothing packed yet (everything in the ring), with n
straddling the packed/ring boundary, and over many groups; GQA G = 4 and 1, S = 1 and S > 1
(queries before some sink positions); fp32, bf16 and fp16; 2- and 4-bit codes.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _case(bits, group, residual, D, dtype, G, S, length, n, seed, B=2, Hkv=2):
    c = R.KVQuantConfig(bits, group, residual)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, length, D, generator=g)
    k[..., 1] += 4.0                                        # an outlier channel
    v = torch.randn(B, Hkv, length, D, generator=g)
    st = R.append(R.QuantizedKV.empty(B, Hkv, D, length + 8, c, dtype), k.to(dtype), v.to(dtype))
    # a copy unlike the stored tokens: keys that draw attention, values far from the others
    sk = (3 * torch.randn(B, Hkv, n, D, generator=g)).to(dtype)
    sv = (4 * torch.randn(B, Hkv, n, D, generator=g) + 2).to(dtype)
    q = torch.randn(B, Hkv * G, S, D, generator=g).to(dtype)
    return st, q, sk, sv


CASES = [  # bits, group, residual, D, dtype, G, S, length, n, splits, block_n
    (4, 32, 32, 80, F32, 4, 1, 3, 4, None, 32),          # L < n, nothing packed
    (4, 32, 32, 64, BF16, 4, 3, 5, 7, 2, 32),            # L < n, queries before sink positions
    (4, 64, 64, 128, F32, 4, 1, 64, 4, 3, 64),           # everything in the ring (full)
    (2, 32, 32, 96, BF16, 1, 2, 34, 7, 2, 32),           # 32 packed, 2 in the ring, G = 1
    (4, 32, 32, 64, F32, 4, 2, 40, 33, 2, 32),           # n straddles packed (32) / ring
    (4, 32, 32, 80, F32, 4, 1, 32 + 37, 1, 3, 16),       # n = 1, L > group
    (4, 64, 128, 128, BF16, 4, 1, 128 + 5 * 64 + 9, 4, None, 64),   # Llama-8B-like, decode
    (2, 64, 0, 64, F32, 4, 3, 64 + 4 * 64 + 3, 7, 5, 32),           # S > 1, ring of one group
    (4, 32, 64, 96, F16, 4, 2, 64 + 6 * 32 + 1, 4, 4, 32),           # fp16, 3 value groups
    (4, 32, 32, 64, F32, 4, 1, 32 + 3 * 32, 20, 2, 16),  # n > 16: two masked tiles, 2 sink steps
    (2, 32, 32, 64, BF16, 4, 4, 32 + 3 * 32 + 31, 20, 3, 32),        # n > 16, S > 1
]


@pytest.mark.parametrize("bits,group,residual,D,dtype,G,S,length,n,splits,block_n", CASES)
def test_decode_with_sinks_matches_reference(bits, group, residual, D, dtype, G, S, length, n,
                                             splits, block_n):
    st, q, sk, sv = _case(bits, group, residual, D, dtype, G, S, length, n,
                          seed=bits * D + G * S + n)
    assert T.supports_attention(q, st, sinks=True)
    out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n, sink_k=sk,
                             sink_v=sv)
    assert out.shape == q.shape and out.dtype == dtype
    want = R.attention_decode(q.float(), _float_state(st), 0.125, sk.float(), sv.float())
    assert _rel(out, want) < (1e-3 if dtype == F32 else 2e-2)
    # the sinks change the answer: a kernel that ignored them would fail above
    plain = R.attention_decode(q.float(), _float_state(st), 0.125)
    assert _rel(plain, want) > 0.1


def _float_state(st):
    """The same state with its ring in fp32 (the reference then attends in fp32)."""
    t = list(st.tensors())
    t[4], t[5] = t[4].float(), t[5].float()
    return R.QuantizedKV(*t, st.config)


def test_sinks_with_the_sinks_equal_to_the_stored_tokens():
    """The runtime's case: the copy holds the first n tokens exactly; the answer differs from
    the plain one only by the sink tokens' quantization error."""
    c = R.KVQuantConfig(4, 32, 32)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 150, 64, generator=g), torch.randn(1, 2, 150, 64, generator=g)
    st = R.append(R.QuantizedKV.empty(1, 2, 64, 160, c, F32), k, v)
    q = torch.randn(1, 8, 1, 64, generator=g)
    out = T.attention_decode(q, st, None, num_splits=2, sink_k=k[:, :, :4], sink_v=v[:, :, :4])
    assert _rel(out, R.attention_decode(q, st, None, k[:, :, :4], v[:, :, :4])) < 1e-3


def test_supports_and_errors_with_sinks():
    c = R.KVQuantConfig(4, 64, 0)
    st = R.QuantizedKV.empty(1, 2, 64, 64, c, F32)
    q = torch.zeros(1, 4, 1, 64)
    sk = torch.zeros(1, 2, 4, 64)
    assert T.supports_attention(q, st, sinks=True)
    eight = R.QuantizedKV.empty(1, 2, 64, 64, R.KVQuantConfig(8, 64, 0), F32)
    assert T.supports_attention(q, eight) and not T.supports_attention(q, eight, sinks=True)
    with pytest.raises(ValueError, match="asmt"):
        T.attention_decode(q, eight, sink_k=sk, sink_v=sk)
    with pytest.raises(ValueError, match="asmt"):
        T.attention_decode(q, st, variant="joined", sink_k=sk, sink_v=sk)
    with pytest.raises(ValueError, match="both or neither"):
        T.attention_decode(q, st, sink_k=sk)
    with pytest.raises(ValueError, match="float16"):
        T.attention_decode(q, st, sink_k=sk.half(), sink_v=sk.half())
