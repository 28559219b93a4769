"""The tables block_sparse / decode_topk build, run by the Triton block-table kernel (the CUDA
lowering) under the interpreter, against the dense-mask reference of the same table."""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from longfx.kernels.block_sparse import gather  # noqa: E402
from longfx.kernels.block_sparse import reference as R  # noqa: E402
from longfx.kernels.sparse_attention import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


@pytest.mark.parametrize("S,Skv,pad,decode", [
    (40, 40, False, False),     # prefill, pooled estimate, topk
    (20, 50, True, False),      # chunked prefill with padding
    (1, 70, True, True),        # decode, Quest table
])
def test_kernel_runs_the_estimated_table(S, Skv, pad, decode):
    g = torch.Generator().manual_seed(S + Skv)
    q = torch.randn(1, 4, S, 32, generator=g)
    k = torch.randn(1, 2, Skv, 32, generator=g)
    v = torch.randn(1, 2, Skv, 32, generator=g)
    keep = None
    if pad:
        keep = torch.ones(1, Skv, dtype=torch.bool)
        keep[0, :5] = False
    if decode:
        table = R.decode_table(q, k, 16, topk=2, sink=4, window=8)
    else:
        table = R.prefill_table(q, k, 16, topk=2, sink=0, window=0)
    out = T.block_sparse_attention(q, k, v, table, 16, 0.2, key_keep=keep)
    ref = R.attention_with_table(q, k, v, table, 16, 0.2, 0.0, keep)
    assert _rel(out, ref) <= 1e-4
    assert _rel(gather.attend(q, k, v, table, 16, 0.2, 0.0, keep), ref) <= 1e-5
