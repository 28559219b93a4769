"""Vertical-slash / FlexPrefill estimation (kernels/block_sparse/estimate.py) against token-level
references (dense masks built with loops), on constructed and random odd shapes."""
import math

import pytest
import torch

from longfx.kernels.block_sparse import estimate as E
from longfx.kernels.block_sparse import op
from longfx.kernels.block_sparse import reference as R


def _inputs(B, H, Hkv, S, Skv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g),
            torch.randn(B, Hkv, Skv, D, generator=g))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _dense(q, k, v, key_keep=None):
    """Causal (bottom-right) softmax attention, by the table semantics with every block."""
    s, skv = q.shape[2], k.shape[2]
    nkb = -(-skv // 16)
    table = torch.arange(nkb, dtype=torch.int32).expand(q.shape[0], q.shape[1], -(-s // 16), -1)
    return R.attention_with_table(q, k, v, table, 16, key_keep=key_keep)


def _tile_mask(keep, s, skv, bs):
    """Token mask of a keep matrix: every causal position of a kept tile."""
    m = keep.repeat_interleave(bs, 2)[:, :, :s].repeat_interleave(bs, 3)[..., :skv]
    pos = torch.arange(skv - s, skv)
    return m & (torch.arange(skv)[None, :] <= pos[:, None])


SHAPES = [(1, 2, 2, 150, 150), (2, 4, 2, 70, 203), (1, 3, 1, 64, 64), (1, 2, 1, 17, 130)]


@pytest.fixture
def few_forced(monkeypatch):
    monkeypatch.setattr(E, "FORCED_COLUMNS", 1)
    monkeypatch.setattr(E, "FORCED_OFFSETS", 1)


def test_constructed_vertical_and_slash_lines_are_found_and_covered(few_forced):
    # q_i = a·e_i + a·e_last, k_j = a·e_{j+5}, k_37 += a·e_last: every query attends key 37
    # (a vertical line) and key i - 5 (a slash line at offset 5) and little else.
    S, D, a = 150, 192, 20.0
    q = torch.zeros(1, 1, S, D)
    k = torch.zeros(1, 1, S, D)
    q[0, 0, torch.arange(S), torch.arange(S)] = a
    q[0, 0, :, D - 1] = a
    k[0, 0, torch.arange(S), torch.arange(S) + 5] = a
    k[0, 0, 37, D - 1] = a
    cols, offs = E.vertical_slash_lines(q, k, vertical=2, slash=2, last_q=8)
    assert cols[0, 0].nonzero().flatten().tolist() == [0, 37]
    assert offs[0, 0].nonzero().flatten().tolist() == [0, 5]
    keep = E.vertical_slash_keep(q, k, 16, vertical=2, slash=2, last_q=8)
    seen = R.table_mask(E.keep_to_table(keep), S, S, 16)[0, 0]
    i = torch.arange(S)
    assert seen[37:, 37].all() and seen[i[5:], i[5:] - 5].all() and seen[i, i].all()
    assert seen[:, 0].all()
    assert keep.sum() < R.layout(S, S, 16, 0, 0)[0].sum()           # and it skips tiles
    # the pattern holds the attention mass: the sparse output is close to dense
    v = torch.randn(1, 1, S, 8)
    out = E.forward(q, k, v, None, None, 0.0, method="vertical_slash", block=16, vertical=2,
                    slash=2, last_q=8, gamma=1.0, tau=0.0, min_len=0, dense_fallback=False)
    assert _rel(out, _dense(q, k, v)) < 1e-3


@pytest.mark.parametrize("B,H,Hkv,S,Skv", SHAPES)
@pytest.mark.parametrize("vertical,slash", [(1, 1), (3, 2), (9, 5)])
def test_tiles_cover_the_token_pattern_exactly(B, H, Hkv, S, Skv, vertical, slash, few_forced):
    q, k, _ = _inputs(B, H, Hkv, S, Skv, 16, seed=S + vertical)
    keep = E.vertical_slash_keep(q, k, 16, vertical, slash, last_q=8)
    tokens = E.vertical_slash_mask(q, k, vertical, slash, last_q=8)  # loops over the lines
    assert torch.equal(keep, E.block_any(tokens, 16))               # the touched tiles, no more
    table = E.keep_to_table(keep)
    seen = R.table_mask(table, S, Skv, 16)
    assert not (tokens & ~seen).any()                                # every pattern position
    assert torch.equal(seen, _tile_mask(keep, S, Skv, 16))
    rows = [set(int(x) for x in r if x >= 0) for r in table.reshape(-1, table.shape[-1])]
    assert all(len(r) == int(n) for r, n in zip(rows, keep.sum(-1).flatten()))


def test_minference_forces_the_first_columns_and_the_local_band():
    q, k, _ = _inputs(1, 2, 1, 300, 300, 16, seed=3)
    cols, offs = E.vertical_slash_lines(q, k, vertical=31, slash=101, last_q=16)
    assert cols[..., :30].all() and offs[..., :100].all()
    assert int(cols.sum(-1).max()) == 31 and int(offs.sum(-1).max()) == 101


def test_column_and_offset_scores_against_loops():
    q, k, _ = _inputs(1, 2, 1, 40, 57, 8, seed=4)
    p = E.last_probs(q, k, 6, 8 ** -0.5)
    col, off = E.column_scores(p), E.offset_scores(p)
    for h in range(2):
        c = torch.zeros(57)
        o = torch.zeros(57)
        for r in range(6):
            pos = 57 - 6 + r
            for j in range(pos + 1):
                c[j] += p[0, h, r, j]
                o[pos - j] += p[0, h, r, j]
            assert float(p[0, h, r, pos + 1:].sum()) == 0.0               # causal
        torch.testing.assert_close(col[0, h], c)
        torch.testing.assert_close(off[0, h], o)


def test_cover_takes_the_fewest_entries_reaching_gamma():
    x = torch.tensor([[0.125, 0.5, 0.375]])             # exact in binary
    assert E.cover(x, 0.5).tolist() == [[False, True, False]]
    assert E.cover(x, 0.6).tolist() == [[False, True, True]]
    assert E.cover(x, 0.9).tolist() == [[True, True, True]]
    assert E.cover(torch.tensor([[0.0, 1.0, 0.0]]), 1.0).all()      # gamma 1: everything


def test_js_distance():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 2.0]])
    d = E.js_distance(p, q)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(d[1]) == pytest.approx(math.sqrt(math.log(2)), rel=1e-6)   # disjoint: max


def _switch_example():
    """Head 0: keys constant within blocks and one query direction, so the pooled estimate is
    the true block distribution (query-aware). Head 1: the last block's queries are ±u, the
    keys of block 3 are +u and of block 5 are -u: the true mass is split between blocks 3 and
    5 while the mean query is 0, so the estimate is uniform (vertical-slash)."""
    bs, S, D = 16, 128, 8
    u = torch.zeros(D)
    u[0] = 1.0
    q = torch.zeros(1, 2, S, D)
    k = torch.zeros(1, 2, S, D)
    g = torch.Generator().manual_seed(0)
    kb = torch.randn(S // bs, D, generator=g)
    kb[-1] = -8 * u                                      # the last block: negligible mass
    k[0, 0] = kb.repeat_interleave(bs, 0)
    q[0, 0] = 2 * u
    q[0, 1, :] = u * torch.tensor([1.0, -1.0]).repeat(S // 2)[:, None]
    k[0, 1, 3 * bs:4 * bs] = 20 * u
    k[0, 1, 5 * bs:6 * bs] = -20 * u
    return q, k, bs


def test_js_switch_on_constructed_distributions():
    q, k, bs = _switch_example()
    true, est = E.flex_distributions(q, k, bs)
    d = E.js_distance(true, est)[0]
    assert float(d[0]) < 0.05 and float(d[1]) > 0.5
    _, qa = E.flex_choice(q, k, bs, gamma=0.9, tau=0.1)
    assert qa[0].tolist() == [True, False]
    _, qa = E.flex_choice(q, k, bs, gamma=0.9, tau=0.0)                # tau 0: never query-aware
    assert qa[0].tolist() == [False, False]
    keep, _ = E.flex_choice(q, k, bs, gamma=0.9, tau=0.1)
    assert keep[0, 1, -1, 3] and keep[0, 1, -1, 5]                    # the two heavy columns


@pytest.mark.parametrize("B,H,Hkv,S,Skv", SHAPES)
@pytest.mark.parametrize("gamma,tau", [(0.5, 0.0), (0.5, 1.0), (0.9, 0.15), (0.99, 0.1)])
def test_flex_choice_matches_the_loop_reference(B, H, Hkv, S, Skv, gamma, tau):
    q, k, _ = _inputs(B, H, Hkv, S, Skv, 16, seed=S + int(gamma * 100))
    keep, _ = E.flex_choice(q, k, 16, gamma, tau)
    assert torch.equal(keep, E.flex_mask(q, k, 16, gamma, tau))
    causal, forced = R.layout(S, Skv, 16, 1, 1)
    assert not (keep & ~causal).any() and keep[..., forced].all()


@pytest.mark.parametrize("B,H,Hkv,S,Skv", SHAPES)
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_gamma_one_keeps_every_causal_block(B, H, Hkv, S, Skv, tau):
    q, k, _ = _inputs(B, H, Hkv, S, Skv, 16, seed=7)
    keep, qa = E.flex_choice(q, k, 16, 1.0, tau)
    assert bool(qa.all()) == (tau == 1.0)
    causal, _ = R.layout(S, Skv, 16, 0, 0)
    assert torch.equal(keep, causal.expand_as(keep))


@pytest.mark.parametrize("B,H,Hkv,S,Skv", SHAPES)
@pytest.mark.parametrize("method", ["vertical_slash", "flex"])
def test_full_budgets_equal_dense(B, H, Hkv, S, Skv, method):
    q, k, v = _inputs(B, H, Hkv, S, Skv, 16, seed=11)
    keep_in = torch.ones(B, Skv, dtype=torch.bool)
    keep_in[0, :3] = False                                            # left padding
    out = E.forward(q, k, v, keep_in, None, 0.0, method=method, block=16, vertical=Skv,
                    slash=Skv, last_q=8, gamma=1.0, tau=0.1, min_len=0, dense_fallback=False)
    assert _rel(out, _dense(q, k, v, keep_in)) < 1e-5


def test_small_budget_attends_exactly_its_table(few_forced):
    q, k, v = _inputs(1, 4, 2, 150, 203, 16, seed=12)
    keep = E.vertical_slash_keep(q, k, 16, 2, 2, last_q=8)
    out = E.forward(q, k, v, None, None, 0.0, method="vertical_slash", block=16, vertical=2,
                    slash=2, last_q=8, gamma=1.0, tau=0.0, min_len=0, dense_fallback=False)
    want = R.attention_with_table(q, k, v, E.keep_to_table(keep), 16)
    assert _rel(out, want) < 1e-5 and _rel(out, _dense(q, k, v)) > 1e-2


def test_dense_fallbacks_and_density_records():
    q, k, v = _inputs(1, 2, 1, 64, 64, 16, seed=13)
    args = dict(method="vertical_slash", block=16, vertical=1, slash=1, last_q=8, gamma=1.0,
                tau=0.0)
    with op.record_density() as st:
        E.forward(q, k, v, None, None, 0.0, min_len=65, **args)        # below min_len
        E.forward(q[:, :, -4:], k, v, None, None, 0.0, min_len=0, **args)   # a decode step
    assert st["dense_calls"] == 2 and st["prefill"] == [0, 0, 0]
    with op.record_density() as st:                                   # everything kept: dense,
        out = E.forward(q, k, v, None, None, 0.0, min_len=0, **dict(args, vertical=64))
    assert st["prefill"] == [10 * 2, 10 * 2, 1] and st["dense_calls"] == 0   # counted as full
    assert _rel(out, _dense(q, k, v)) < 1e-5
    with op.record_density() as st:
        E.forward(q, k, v, None, None, 0.0, min_len=0, **args)
    kept, causal, calls = st["prefill"]
    assert calls == 1 and causal == 20 and kept < causal


def test_the_op_and_its_fake():
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, seed=14)
    out = E.OP(q, k, v, None, 0.25, 0.0, "flex", 16, 1, 1, 16, 0.9, 0.1, 0)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="method"):
        E.OP(q, k, v, None, 0.25, 0.0, "oracle", 16, 1, 1, 16, 0.9, 0.1, 0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert E.OP(fq, fk, fv, None, 0.25, 0.0, "flex", 16, 1, 1, 16, 0.9, 0.1, 0).shape == q.shape


def test_dense_bound_is_an_upper_bound():
    assert E.dense_bound(8192, 64, 1000, 6096) == 1.0
    b = E.dense_bound(8192, 64, 4, 4)
    assert 0 < b < 0.25
