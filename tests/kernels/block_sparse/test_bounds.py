"""Quest's bounds kept with the cache (kernels/block_sparse: ``update_bounds``,
``kv_decode_table``; the per-KV-head table in the Triton table kernel), under the interpreter on
odd shapes, against the reference: bounds after many appends equal the bounds recomputed from
K; the per-KV-head table lists the reference's blocks; the decode output equals the dense-mask
reference of the same table; a budget covering every block equals dense attention."""
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from longfx.kernels.block_sparse import op  # noqa: E402
from longfx.kernels.block_sparse import reference as R  # noqa: E402
from longfx.kernels.block_sparse import triton as QT  # noqa: E402
from longfx.kernels.sparse_attention import reference as SR  # noqa: E402
from longfx.kernels.sparse_attention import triton as T  # noqa: E402

pytestmark = pytest.mark.skipif(not T.AVAILABLE, reason="triton is not installed")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


def _rows(table):
    """{(b, h): sorted kept block ids} of a decode table [B, h, 1, W] (-1 dropped)."""
    return {(b, h): sorted(int(x) for x in table[b, h, 0] if x >= 0)
            for b in range(table.shape[0]) for h in range(table.shape[1])}


@pytest.mark.parametrize("B,Hkv,D,bs,dtype,chunks", [
    (2, 3, 80, 16, torch.float32, [37, 1, 1, 14, 1, 33, 1, 1, 1]),
    (1, 2, 128, 32, torch.bfloat16, [5, 64, 1, 1, 30, 1]),
    (1, 1, 24, 64, torch.float16, [1] * 70),
])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bounds_after_many_appends_equal_the_bounds_of_k(B, Hkv, D, bs, dtype, chunks, impl):
    g = torch.Generator().manual_seed(sum(chunks) + D)
    total = sum(chunks)
    keys = torch.zeros(B, Hkv, total + 9, D, dtype=dtype)                # capacity > length
    cap = -(-(total + 9) // bs)
    kmin = torch.full((B, Hkv, cap, D), 7.0, dtype=dtype)                # stale values
    kmax = torch.full((B, Hkv, cap, D), -7.0, dtype=dtype)
    update = QT.update_bounds if impl == "triton" else R.update_bounds
    if impl == "triton":
        assert QT.supports_update(keys, kmin, kmax, bs)
    a = 0
    for n in chunks:
        keys[:, :, a:a + n] = (torch.randn(B, Hkv, n, D, generator=g) * 3).to(dtype)
        update(keys, kmin, kmax, a, a + n, bs)
        a += n
        lo, hi = R.block_bounds(keys[:, :, :a], bs)
        nb = lo.shape[2]
        assert torch.equal(kmin[:, :, :nb], lo) and torch.equal(kmax[:, :, :nb], hi), a
    assert (kmin[:, :, -(-a // bs):] == 7.0).all()                       # nothing beyond read


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,bs,budget,dtype", [
    (2, 6, 2, 1, 301, 80, 16, dict(topk=5, sink=4, window=20), torch.float32),
    (1, 4, 1, 3, 530, 64, 32, dict(density=0.3, sink=0, window=1), torch.float32),
    (1, 8, 8, 1, 200, 32, 16, dict(topk=3, sink=16, window=40), torch.float16),
    (1, 32, 8, 1, 4100, 128, 16, dict(density=0.1, sink=16, window=64), torch.bfloat16),
])
def test_kv_head_table_lists_the_reference_blocks(B, H, Hkv, S, Skv, D, bs, budget, dtype):
    g = torch.Generator().manual_seed(Skv + H)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Skv, D, generator=g) * torch.linspace(0.2, 3, D)).to(dtype)
    kmin, kmax = R.block_bounds(k, bs)
    pad = torch.randn(B, Hkv, 3, D, generator=g).to(dtype)              # capacity beyond Skv
    kmin, kmax = torch.cat((kmin, pad), 2), torch.cat((kmax, pad), 2)
    args = dict(dict(topk=0, density=0.0), **budget)
    assert QT.supports_bounds(q, kmin, kmax, bs)
    got = QT.kv_decode_table(q, kmin, kmax, Skv, bs, args["topk"], args["density"],
                             args["sink"], args["window"])
    want = R.decode_table(q.float(), None, bs, args["topk"], args["density"], args["sink"],
                          args["window"], select="kv_head", bounds=(kmin, kmax), skv=Skv)
    assert got.shape[:3] == (B, Hkv, 1) and (got >= 0).all()
    assert _rows(got) == _rows(want)
    # recomputed from k, the reference gives the same table
    again = R.decode_table(q.float(), k.float(), bs, args["topk"], args["density"],
                           args["sink"], args["window"], select="kv_head")
    assert _rows(again) == _rows(want)


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D,bs,dtype,full", [
    (2, 6, 2, 1, 301, 80, 16, torch.float32, True),
    (1, 4, 1, 3, 170, 64, 32, torch.float32, False),
    (1, 8, 2, 1, 333, 128, 16, torch.bfloat16, True),
])
def test_kv_head_table_kernel_equals_the_dense_mask_reference(B, H, Hkv, S, Skv, D, bs, dtype,
                                                              full):
    g = torch.Generator().manual_seed(Skv + D)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    keep = torch.ones(B, Skv, dtype=torch.bool)
    keep[-1, :7] = False
    kmin, kmax = R.block_bounds(k, bs)
    if full:
        table = QT.kv_decode_table(q, kmin, kmax, Skv, bs, 4, 0.0, 4, 10)   # unsorted, no -1
    else:
        table = R.decode_table(q, k, bs, topk=3, sink=0, window=1, select="kv_head")
    assert table.shape[1] == Hkv
    out = T.block_sparse_attention(q, k, v, table, bs, 0.3, key_keep=keep, table_full=full)
    ref = R.attention_with_table(q.float(), k.float(), v.float(), table, bs, 0.3, 0.0, keep)
    assert _rel(out, ref) <= (1e-4 if dtype == torch.float32 else 2e-2)
    dense = SR.sparse_attention(q.float(), k.float(), v.float(), keep, 0.3)
    assert _rel(out, dense) > 1e-3                                       # blocks were skipped


def test_full_budget_on_kept_bounds_equals_dense():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 1, 40, generator=g)
    k = torch.randn(1, 3, 157, 40, generator=g)
    v = torch.randn(1, 3, 157, 40, generator=g)
    kmin, kmax = R.block_bounds(k, 16)
    table = QT.kv_decode_table(q, kmin, kmax, 157, 16, 0, 1.0, 0, 0)
    assert sorted(table[0, 0, 0].tolist()) == list(range(10))
    out = T.block_sparse_attention(q, k, v, table, 16, 0.2, table_full=True)
    assert _rel(out, SR.sparse_attention(q, k, v, None, 0.2)) < 1e-5
    params = dict(op.OFF, decode_density=1.0, decode_block=16)
    for select in ("kv_head", "head"):                      # the op, reference path (CPU)
        got = op.forward(q, k, v, None, 0.2, 0.0, **dict(params, decode_select=select),
                         kmin=kmin, kmax=kmax, dense_fallback=False)
        assert _rel(got, SR.sparse_attention(q, k, v, None, 0.2)) < 1e-5


def test_refuses_what_it_does_not_take():
    q, kmin = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 5, 32)
    assert not QT.supports_bounds(q, kmin, kmin, 8)
    assert not QT.supports_bounds(q, kmin.half(), kmin.half(), 16)
    assert not QT.supports_bounds(torch.randn(1, 4, 65, 32), kmin, kmin, 16)   # 130 rows
    keys = torch.randn(1, 2, 80, 32)
    assert not QT.supports_update(keys, kmin, kmin, 512)
    with pytest.raises(ValueError, match="unsupported"):
        QT.kv_decode_table(q, kmin, kmin, 80, 8, 2, 0.0, 0, 0)
    with pytest.raises(ValueError, match="kmin/kmax"):
        op.check_args(q, keys, keys, None, 64, 16, "pooled", "kv_head", kmin[:, :, :4],
                      kmin[:, :, :4])


@pytest.mark.parametrize("select", ["kv_head", "head"])
def test_op_on_kept_bounds_equals_the_op_on_recomputed_bounds(select):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 6, 1, 24, generator=g)
    k = torch.randn(2, 2, 181, 24, generator=g)
    v = torch.randn(2, 2, 181, 24, generator=g)
    kmin, kmax = R.block_bounds(k, 16)
    kmin, kmax = torch.cat((kmin, -kmin), 2), torch.cat((kmax, -kmax), 2)   # junk past the keys
    params = dict(op.OFF, decode_topk=5, decode_block=16, decode_sink=4, decode_window=8,
                  decode_select=select)
    with op.record_density() as st:
        kept = op.forward(q, k, v, None, 0.2, 0.0, **params, kmin=kmin, kmax=kmax)
    again = op.forward(q, k, v, None, 0.2, 0.0, **params)
    assert torch.equal(kept, again)
    heads = 2 if select == "kv_head" else 6
    assert st["decode"] == [2 * heads * 5, 2 * heads * 12, 1]    # sink 1 + window 2 + 2 best
    table = R.decode_table(q, k, 16, 5, 0.0, 4, 8, select=select)
    assert _rel(kept, R.attention_with_table(q, k, v, table, 16, 0.2)) < 1e-5
    assert _rel(kept, SR.sparse_attention(q, k, v, None, 0.2)) > 1e-3
