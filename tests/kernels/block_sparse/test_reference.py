"""Block estimation, table selection and the gather lowering of longfx::block_sparse_attention
against brute-force references (Python loops over blocks, dense masks) on small odd shapes."""
import math

import pytest
import torch

from longfx.kernels.block_sparse import gather, op
from longfx.kernels.block_sparse import reference as R
from longfx.kernels.sparse_attention import reference as SR


def _inputs(B, H, Hkv, S, Skv, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    return q, k, v


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


def _brute_table(scores, s, skv, bs, sink, window, topk, density):
    """Loops over blocks: forced (sink, window, diagonal) first, then the best causal ones."""
    B, H, nqb, nkb = scores.shape
    rows = {}
    for b in range(B):
        for h in range(H):
            for qb in range(nqb):
                p0 = skv - s + qb * bs
                p1 = skv - s + min(s, (qb + 1) * bs) - 1
                causal = [kb for kb in range(nkb) if kb * bs <= p1]
                forced = {kb for kb in causal
                          if (kb + 1) * bs - 1 >= max(0, p0 - max(window, 1) + 1)
                          or (sink > 0 and kb * bs < sink)}
                want = topk if topk > 0 else math.ceil(len(causal) * density)
                n = min(len(causal), max(want, len(forced)))
                rest = sorted((kb for kb in causal if kb not in forced),
                              key=lambda kb: -float(scores[b, h, qb, kb]))
                rows[b, h, qb] = forced | set(rest[:n - len(forced)])
    return rows


def _as_sets(table):
    B, H, nqb, _ = table.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for qb in range(nqb):
                row = [int(x) for x in table[b, h, qb] if x >= 0]
                assert len(row) == len(set(row)), "a block listed twice"
                out[b, h, qb] = set(row)
    return out


def _brute_pooled(q, k, bs):
    B, H, S, D = q.shape
    G = H // k.shape[1]
    nqb, nkb = -(-S // bs), -(-k.shape[2] // bs)
    out = torch.zeros(B, H, nqb, nkb)
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                for j in range(nkb):
                    qm = q[b, h, i * bs:(i + 1) * bs].mean(0)
                    km = k[b, h // G, j * bs:(j + 1) * bs].mean(0)
                    out[b, h, i, j] = qm @ km
    return out


@pytest.mark.parametrize("S,Skv,sink,window,topk,density", [
    (77, 77, 0, 0, 3, 0.0),          # prefill, topk, diagonal only forced
    (50, 99, 5, 20, 0, 0.3),         # chunked prefill, density, sinks + window
    (93, 93, 16, 40, 2, 0.0),        # forced blocks exceed topk
])
def test_pooled_table_matches_brute_force(S, Skv, sink, window, topk, density):
    q, k, _ = _inputs(2, 4, 2, S, Skv, 8, seed=S + Skv)
    bs = 16
    scores = R.pooled_scores(q, k, bs)
    assert _rel(scores, _brute_pooled(q, k, bs)) < 1e-5
    table = R.prefill_table(q, k, bs, topk, density, sink, window, "pooled")
    assert table.dtype == torch.int32 and table.shape[:3] == (2, 4, -(-S // bs))
    assert _as_sets(table) == _brute_table(scores, S, Skv, bs, sink, window, topk, density)


def test_last_q_scores_are_the_last_queries_attention_per_block():
    q, k, _ = _inputs(1, 2, 1, 40, 60, 8, seed=3)
    got = R.last_q_scores(q, k, 16, last_q=5, scale=0.3)                  # [1, 2, 1, 4]
    kk = k.expand(1, 2, 60, 8)
    want = torch.zeros(1, 2, 1, 4)
    for h in range(2):
        for i in range(35, 40):
            p = 60 - 40 + i
            w = torch.softmax((q[0, h, i] @ kk[0, h, :p + 1].T) * 0.3, -1)
            for j in range(p + 1):
                want[0, h, 0, j // 16] += w[j]
    assert _rel(got, want) < 1e-5
    table = R.prefill_table(q, k, 16, topk=2, estimate="last_q", last_q=5, scale=0.3)
    assert _as_sets(table) == _brute_table(got.expand(1, 2, 3, 4), 40, 60, 16, 0, 0, 2, 0.0)


def test_quest_bound_is_the_min_max_formula_and_bounds_every_score():
    q, k, _ = _inputs(1, 4, 2, 2, 70, 8, seed=5)
    bs = 16
    got = R.quest_scores(q, k, bs)                                        # [1, 4, 1, 5]
    for h in range(4):
        kh = k[0, h // 2]
        for j in range(5):
            blk = kh[j * bs:(j + 1) * bs]
            lo, hi = blk.min(0).values, blk.max(0).values
            want = max(float(torch.maximum(q[0, h, i] * lo, q[0, h, i] * hi).sum())
                       for i in range(2))
            assert abs(float(got[0, h, 0, j]) - want) < 1e-4
            assert float(got[0, h, 0, j]) >= float((q[0, h] @ blk.T).max()) - 1e-4


def test_decode_table_matches_brute_force():
    q, k, _ = _inputs(2, 4, 2, 1, 131, 8, seed=7)
    table = R.decode_table(q, k, 16, topk=4, sink=4, window=20)
    want = _brute_table(R.quest_scores(q, k, 16), 1, 131, 16, 4, 20, 4, 0.0)
    assert _as_sets(table) == want
    assert all(0 in row and 8 in row and 7 in row for row in want.values())   # sink, window


@pytest.mark.parametrize("S,Skv,D,pad,softcap", [
    (37, 37, 16, False, 0.0), (23, 90, 24, True, 0.0), (1, 131, 16, True, 30.0)])
def test_gather_equals_the_dense_mask_reference(S, Skv, D, pad, softcap):
    q, k, v = _inputs(2, 6, 2, S, Skv, D, seed=S)
    keep = None
    if pad:
        keep = torch.ones(2, Skv, dtype=torch.bool)
        keep[1, :9] = False
    table = R.prefill_table(q, k, 16, topk=2, sink=0, window=0) if S > 1 else \
        R.decode_table(q, k, 16, topk=3)
    got = gather.attend(q, k, v, table, 16, 0.25, softcap, keep)
    want = R.attention_with_table(q, k, v, table, 16, 0.25, softcap, keep)
    assert _rel(got, want) < 1e-5


def _dense(q, k, v, keep=None):
    return SR.sparse_attention(q, k, v, keep, 0.25)


PARAMS = dict(op.OFF, min_len=0, decode_min_len=0)


@pytest.mark.parametrize("S,Skv", [(45, 45), (30, 77), (1, 77)])
def test_full_budget_equals_dense(S, Skv):
    q, k, v = _inputs(1, 4, 2, S, Skv, 16, seed=11)
    keep = torch.ones(1, Skv, dtype=torch.bool)
    keep[0, :4] = False
    for budget in (dict(topk=99, decode_topk=99), dict(density=1.0, decode_density=1.0)):
        p = dict(PARAMS, block=16, **budget)
        got = op.forward(q, k, v, keep, 0.25, 0.0, **p, dense_fallback=False)
        assert _rel(got, _dense(q, k, v, keep)) < 1e-5


def test_sparse_tables_differ_from_dense_and_match_their_reference():
    q, k, v = _inputs(1, 4, 2, 64, 64, 16, seed=13)
    with op.record_density() as st:
        got = op.forward(q, k, v, None, 0.25, 0.0, **dict(PARAMS, block=16, topk=2))
    assert st["prefill"][:2] == [4 * (1 + 2 + 2 + 2), 4 * 10] and st["dense_calls"] == 0  # 4 heads
    table = R.prefill_table(q, k, 16, topk=2, scale=0.25)
    assert _rel(got, R.attention_with_table(q, k, v, table, 16, 0.25)) < 1e-5
    assert _rel(got, _dense(q, k, v)) > 1e-3


def test_dense_fallback_short_decode_and_off():
    q, k, v = _inputs(1, 4, 2, 64, 64, 16, seed=17)
    cases = [
        (dict(block=16, topk=2, min_len=65), q),          # shorter than min_len
        (dict(block=16, topk=4), q),                      # budget keeps every causal block
        (dict(block=16, topk=2), q[:, :, -1:]),           # decode without decode_topk
        (dict(decode_topk=2, decode_block=16, decode_min_len=100), q[:, :, -1:]),
        (dict(decode_topk=2, decode_block=16), q),        # prefill without block_sparse
    ]
    for params, qq in cases:
        with op.record_density() as st:
            got = op.forward(qq, k, v, None, 0.25, 0.0, **dict(PARAMS, **params))
        assert st["dense_calls"] == 1 and st["prefill"][2] == st["decode"][2] == 0, params
        assert _rel(got, _dense(qq, k, v)) < 1e-5


def test_custom_op_checks_its_arguments():
    q, k, v = _inputs(1, 4, 2, 20, 20, 16, seed=0)
    args = dict(PARAMS, block=24)
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.longfx.block_sparse_attention(q, k, v, None, 0.25, 0.0,
                                                *(args[p] for p in op.PARAMS))
    args = dict(PARAMS, estimate="oracle")
    with pytest.raises(ValueError, match="estimate"):
        torch.ops.longfx.block_sparse_attention(q, k, v, None, 0.25, 0.0,
                                                *(args[p] for p in op.PARAMS))


def test_expected_density():
    # 4 query blocks of 16 over 64 keys: causal blocks 1+2+3+4 = 10; topk 2 keeps 1+2+2+2
    assert R.expected_density(64, 16, 2, 0.0, 0, 0) == pytest.approx(7 / 10)
    assert R.expected_density(64, 16, 0, 1.0, 0, 0) == 1.0
