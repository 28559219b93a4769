"""The "planes" decode kernel (bit planes kept apart, value groups carried by repeated query
rows, codes turned into dot operands without I2F) against the reference, under
the Triton interpreter (CPU), in each of its operand modes: "planes" (fp32 magic number,
converted), "magic" (codes built straight into bf16/fp16 bits, centred), "tf32" (fp32
operands) and "asm" — whose inline PTX does not run in the interpreter, so there it runs its
pure-Triton twin "magic" (the same centred codes); test_triton_asm_cuda.py tests the PTX on
a GPU.

Odd shapes: 2/4/8 bits, D 64/96/128 (96: planes narrower than their power-of-two block),
group 32/64 (1 to 4 value groups a token), G 1/4/7 query heads per kv head, S 1/3 queries,
lengths that end exactly at a group boundary (the ring full) and inside the ring, every dtype
and both scale formats, tiles of 16/32/64 tokens and several split counts.
The interpreter's bf16 dot is garbage (triton 3.9), so bf16 runs its dots in fp32 there
(DOT_F32).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from longfx.kernels.attention.reference import attention  # noqa: E402
from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [  # bits, group, residual, scales, D, dtype, G, S, length, splits, block_n
    (4, 64, 128, "u8", 128, BF16, 4, 1, 128 + 3 * 64, None, 64),     # ends at a group boundary
    (4, 32, 0, "fp16", 96, F16, 7, 3, 32 + 5 * 32 + 7, 3, 32),      # inside the ring, 3 groups
    (2, 32, 32, "u8", 64, F32, 1, 3, 32 + 6 * 32, 2, 16),           # boundary, 2 value groups
    (2, 64, 0, "fp16", 128, BF16, 4, 1, 64 + 3 * 64 + 31, 5, 32),   # inside, more splits
    (8, 32, 64, "fp16", 96, BF16, 4, 3, 64 + 4 * 32, 4, 32),        # 8-bit, 3 value groups
    (8, 64, 128, "u8", 64, F16, 7, 1, 128 + 2 * 64 + 1, 3, 64),     # fp16, 8-bit codes
    (4, 32, 128, "u8", 128, F32, 4, 3, 128 + 4 * 32 + 20, 4, 32),   # 4 value groups
    (2, 32, 128, "fp16", 96, F16, 1, 1, 128 + 3 * 32, None, 32),    # 2-bit fp16, D/4 = 24
    (4, 64, 0, "u8", 64, F16, 4, 3, 64 + 2 * 64 + 63, 2, 64),       # ring one short of a group
]


def _state(bits, group, residual, scales, D, dtype, length, seed, B=1, Hkv=2):
    c = R.KVQuantConfig(bits, group, residual, scales)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, length, D, generator=g)
    k[..., 1] += 4.0                                        # an outlier channel
    v = torch.randn(B, Hkv, length, D, generator=g)
    return R.append(R.QuantizedKV.empty(B, Hkv, D, length + 8, c, dtype), k.to(dtype), v.to(dtype))


def _want(q, st, scale):
    kd, vd = R.dequantize_state(st)
    S, L = q.shape[2], int(st.length)
    mask = torch.ones(S, L, dtype=torch.bool).tril(L - S)
    return attention(q.float(), kd.float(), vd.float(), mask, scale)


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("variant", ["planes", "magic", "tf32", "asm", "asmt"])
@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,G,S,length,splits,block_n", CASES)
def test_planes_decode_matches_reference(bits, group, residual, scales, D, dtype, G, S, length,
                                         splits, block_n, variant):
    st = _state(bits, group, residual, scales, D, dtype, length, seed=bits * D + G + S)
    assert R.n_packed(length, st.config) > 0
    q = torch.randn(1, 2 * G, S, D, generator=torch.Generator().manual_seed(S)).to(dtype)
    assert T.planes_ok(q, st)
    out = T.attention_decode(q, st, 0.125, num_splits=splits, num_warps=4, num_stages=2,
                             variant=variant, block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, _want(q, st, 0.125)) < (1e-3 if dtype == F32 else 2e-2)


def test_planes_falls_back_to_joined_when_rows_do_not_fit():
    """JV·G·S = 4·8·5 = 160 > 128 rows: "planes" runs the joined kernel, still right."""
    st = _state(4, 32, 32, "u8", 128, F32, 32 + 64, seed=3, Hkv=1)
    q = torch.randn(1, 8, 5, 128, generator=torch.Generator().manual_seed(0))
    assert not T.planes_ok(q, st)
    out = T.attention_decode(q, st, None, num_splits=2, variant="planes")
    assert _rel(out, _want(q, st, 128 ** -0.5)) < 1e-3


def test_variant_and_block_n_errors():
    st = _state(4, 64, 0, "u8", 64, F32, 70, seed=0, Hkv=1)
    q = torch.zeros(1, 2, 1, 64)
    with pytest.raises(ValueError, match="variant"):
        T.attention_decode(q, st, variant="bogus")
    with pytest.raises(ValueError, match="block_n"):
        T.attention_decode(q, st, block_n=48)
    with pytest.raises(ValueError, match="block_n"):
        T.attention_decode(q, st, block_n=128)              # larger than the group
