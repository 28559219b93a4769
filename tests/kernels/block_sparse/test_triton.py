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


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,bs,dtype", [
    (1, 4, 2, 1, 70, 32, 16, torch.float32),        # partial last block
    (2, 6, 2, 3, 300, 80, 32, torch.float32),       # batch, odd head dim, S > 1, 2 programs
    (1, 8, 8, 1, 64, 64, 64, torch.float16),        # one block, no GQA
    (1, 4, 1, 16, 530, 256, 16, torch.bfloat16),    # 64 query rows, largest head dim
])
def test_quest_kernel_matches_the_reference(B, H, Hkv, S, Skv, D, bs, dtype):
    from longfx.kernels.block_sparse import triton as QT
    g = torch.Generator().manual_seed(Skv + D)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Skv, D, generator=g) * torch.linspace(0.1, 3, D)).to(dtype)
    assert QT.supports(q, k, bs)
    got = QT.quest_scores(q, k, bs)
    want = R.quest_scores(q.float(), k.float(), bs)
    assert got.shape == want.shape == (B, H, 1, -(-Skv // bs))
    assert _rel(got, want) < 1e-5
    # the table built from either is the same (ties aside: random data has none)
    t1 = R.decode_table(q, k, bs, topk=3, sink=4, window=8, scores=got)
    t2 = R.decode_table(q.float(), k.float(), bs, topk=3, sink=4, window=8)
    assert torch.equal(t1, t2)


def test_quest_kernel_refuses_what_it_does_not_take():
    from longfx.kernels.block_sparse import triton as QT
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 40, 32)
    assert not QT.supports(q, k, 8) and not QT.supports(q, k, 128) and not QT.supports(q, k, 24)
    assert not QT.supports(q, k.half(), 16)
    assert not QT.supports(torch.randn(1, 4, 65, 32), k, 16)       # 130 query rows
    with pytest.raises(ValueError, match="unsupported"):
        QT.quest_scores(q, k, 8)
