"""The "asm" and "asmt" decodes (inline-PTX unpacking, ``_asm_planes``) on a CUDA GPU against
the reference and against their pure-Triton twin "magic". Inline PTX does not run under the Triton interpreter, where "asm" runs its
pure-Triton twin "magic" (same centred codes; tested in test_decode_planes.py), so this file
is the only test of the PTX itself: it runs on CUDA only, in a process without
TRITON_INTERPRET: run it alone, after ``pip install .``, from outside the checkout (whose
source folder longfx/ would shadow the installed package), e.g. ``cd /tmp && python -m pytest
-c /dev/null --rootdir=/tmp <repo>/tests/kernels/kv_quant/test_triton_asm_cuda.py`` (12 passed
on an H100, Triton 3.6, 2026-11-24; the 6 sink cases also with ``triton._ASMT["raw"]``); in
a run with the interpreter tests, which set
TRITON_INTERPRET=1, it skips. It skips before
importing the kernels where there is no GPU, so that the interpreter tests collected after it
still import them under the interpreter.

Odd shapes: 2/4 bits, D 96/128, group 32/64 (1 to 3 value groups), G 1/4/7, S 1/3, every
dtype and both scale formats, lengths inside the ring and at a group boundary; and "asmt"
with an exact sink copy (n = 4, 7, 20, 33; lengths below n, all in the ring, n across the
packed / ring boundary) against ``reference.with_sinks``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs CUDA and Triton without TRITON_INTERPRET", allow_module_level=True)

from longfx.kernels.attention.reference import attention  # noqa: E402
from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(T.INTERPRET or not T.AVAILABLE,
                                reason="needs CUDA and Triton without TRITON_INTERPRET")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [  # bits, group, residual, scales, D, dtype, G, S, length, splits
    (4, 64, 128, "u8", 128, BF16, 4, 1, 128 + 40 * 64, None),
    (4, 32, 0, "fp16", 96, F16, 7, 3, 32 + 50 * 32 + 7, 7),
    (2, 32, 32, "u8", 128, F32, 1, 3, 32 + 60 * 32, 3),
    (2, 64, 0, "fp16", 128, BF16, 4, 1, 64 + 30 * 64 + 31, 5),
    (4, 32, 128, "u8", 96, F16, 4, 1, 128 + 33 * 32 + 20, None),
    (2, 64, 128, "u8", 96, BF16, 7, 1, 128 + 25 * 64 + 1, 4),
]


@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,G,S,length,splits", CASES)
def test_asm_decode_matches_reference(bits, group, residual, scales, D, dtype, G, S, length,
                                      splits):
    dev = torch.device("cuda")
    c = R.KVQuantConfig(bits, group, residual, scales)
    g = torch.Generator(device=dev).manual_seed(bits * D + G)
    k = torch.randn(2, 2, length, D, generator=g, device=dev)
    k[..., 1] += 4.0                                        # an outlier channel
    v = torch.randn(2, 2, length, D, generator=g, device=dev)
    st = R.append(R.QuantizedKV.empty(2, 2, D, length + 8, c, dtype, dev), k.to(dtype),
                  v.to(dtype))
    q = torch.randn(2, 2 * G, S, D, generator=g, device=dev).to(dtype)
    kd, vd = R.dequantize_state(st)
    mask = torch.ones(S, length, dtype=torch.bool, device=dev).tril(length - S)
    want = attention(q.float(), kd.float(), vd.float(), mask, 0.125)
    for block_n, variant in ((32, "asm"), (64, "asm"), (32, "asmt"), (64, "asmt")):
        if group % block_n:
            continue
        out = T.attention_decode(q, st, 0.125, num_splits=splits, variant=variant,
                                 block_n=block_n)
        twin = T.attention_decode(q, st, 0.125, num_splits=splits, variant="magic",
                                  block_n=block_n)
        assert out.shape == q.shape and out.dtype == dtype
        rel = float((out.float() - want).abs().max() / want.abs().max())
        assert rel < (2e-3 if dtype == F32 else 2e-2), (variant, block_n, rel)
        # the PTX builds the same operands as the Triton twin
        assert float((out.float() - twin.float()).abs().max() / want.abs().max()) < (
            1e-5 if dtype == F32 else 1e-2)


SINK_CASES = [  # bits, group, residual, scales, D, dtype, G, S, length, n, splits
    (4, 64, 128, "u8", 128, BF16, 4, 1, 128 + 40 * 64 + 3, 4, None),
    (4, 64, 128, "u8", 128, BF16, 4, 1, 100, 4, None),         # everything in the ring
    (2, 32, 32, "fp16", 96, F16, 7, 3, 32 + 50 * 32 + 7, 7, 7),
    (4, 32, 32, "u8", 128, F32, 1, 2, 40, 33, 3),              # n straddles packed / ring
    (2, 64, 64, "u8", 128, BF16, 4, 4, 64 + 9 * 64 + 1, 20, None),
    (4, 64, 128, "u8", 128, BF16, 4, 1, 3, 4, None),           # length < n
]


@pytest.mark.parametrize("bits,group,residual,scales,D,dtype,G,S,length,n,splits", SINK_CASES)
def test_asmt_decode_with_sinks_matches_reference(bits, group, residual, scales, D, dtype, G,
                                                  S, length, n, splits):
    """The exact sink copy (random, unlike the stored tokens) read by the compiled kernel."""
    dev = torch.device("cuda")
    c = R.KVQuantConfig(bits, group, residual, scales)
    g = torch.Generator(device=dev).manual_seed(bits * D + G + n)
    k = torch.randn(2, 2, length, D, generator=g, device=dev)
    k[..., 1] += 4.0
    v = torch.randn(2, 2, length, D, generator=g, device=dev)
    st = R.append(R.QuantizedKV.empty(2, 2, D, length + 8, c, dtype, dev), k.to(dtype),
                  v.to(dtype))
    sk = (3 * torch.randn(2, 2, n, D, generator=g, device=dev)).to(dtype)
    sv = (4 * torch.randn(2, 2, n, D, generator=g, device=dev) + 2).to(dtype)
    q = torch.randn(2, 2 * G, S, D, generator=g, device=dev).to(dtype)
    assert T.supports_attention(q, st, sinks=True)
    kd, vd = R.with_sinks(*R.dequantize_state(st), sk, sv)
    mask = torch.ones(S, length, dtype=torch.bool, device=dev).tril(length - S)
    want = attention(q.float(), kd.float(), vd.float(), mask, 0.125)
    kp, vp = R.dequantize_state(st)
    plain = attention(q.float(), kp.float(), vp.float(), mask, 0.125)
    assert float((plain - want).abs().max() / want.abs().max()) > 0.1   # the sinks matter
    for block_n in (32, 64):
        if group % block_n:
            continue
        out = T.attention_decode(q, st, 0.125, num_splits=splits, block_n=block_n, sink_k=sk,
                                 sink_v=sv)
        assert out.shape == q.shape and out.dtype == dtype
        rel = float((out.float() - want).abs().max() / want.abs().max())
        assert rel < (2e-3 if dtype == F32 else 2e-2), (block_n, rel)
