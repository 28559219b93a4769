"""The eviction reference: SnapKV keeps the tokens with the highest pooled window votes (per KV
head, on a constructed example) and its scores equal a naive loop; H2O's accumulation equals
summing each query's softmax; selections are sorted and sized by the budget; re-rotation moves
a RoPE key to another position; the per-head gather compacts."""
import math

import pytest
import torch

from longfx.kernels.kv_evict import reference as R


def _rope(x, pos, inv_freq):
    """Rotate-half RoPE of x [..., T, D] at integer positions pos [T]."""
    ang = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((ang, ang), -1)
    return x * emb.cos() + R.rotate_half(x) * emb.sin()


def _naive_probs(q, k, scaling):
    """Per-query loop: query i of S (position T−S+i) softmax over keys 0..T−S+i."""
    B, H, S, D = q.shape
    T, n_rep = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, S, T)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                n = T - S + i + 1
                out[b, h, i, :n] = torch.softmax(k[b, h // n_rep, :n] @ q[b, h, i] * scaling, -1)
    return out


def test_snapkv_keeps_the_highest_pooled_tokens_per_head():
    # 2 KV heads, 2 query heads each; 20 keys, window 4. Window queries point along channel 0
    # (KV head 0) or channel 1 (KV head 1); a single prefix key per head answers them.
    B, Hkv, H, T, D, w = 1, 2, 4, 20, 4, 4
    keys = torch.zeros(B, Hkv, T, D)
    keys[0, 0, 5, 0] = 1.0       # head 0's hot token: 5
    keys[0, 1, 12, 1] = 1.0      # head 1's hot token: 12
    q = torch.zeros(B, H, w, D)
    q[0, :2, :, 0] = 20.0
    q[0, 2:, :, 1] = 20.0
    scores = R.snapkv_scores(q, keys, scaling=1.0, kernel=3, pool="avg")   # [1, 2, 16]
    assert scores.shape == (1, 2, T - w)
    # the hot token and its pooled neighbours lead; everything else is equal
    assert set(scores[0, 0].topk(3).indices.tolist()) == {4, 5, 6}
    assert set(scores[0, 1].topk(3).indices.tolist()) == {11, 12, 13}
    hot = scores[0, 0, 4:7]                       # avg pool: the peak spread over 3 tokens
    assert torch.allclose(hot, hot[1].expand(3)) and float(hot.min()) > 1e6 * float(scores[0, 0, 0])
    keep = R.snapkv_keep(scores, budget=w + 3, window=w)
    assert keep.shape == (1, 2, 7)
    assert keep[0, 0].tolist() == [4, 5, 6, 16, 17, 18, 19]
    assert keep[0, 1].tolist() == [11, 12, 13, 16, 17, 18, 19]
    # without pooling only the hot token itself is ahead
    raw = R.snapkv_scores(q, keys, 1.0, kernel=1)
    assert R.snapkv_keep(raw, w + 1, w)[0, :, 0].tolist() == [5, 12]
    # max pooling spreads the peak to both neighbours with the same value
    mx = R.snapkv_scores(q, keys, 1.0, kernel=3, pool="max")
    assert torch.equal(mx[0, 0, 4], mx[0, 0, 5]) and torch.equal(mx[0, 0, 6], mx[0, 0, 5])


def test_snapkv_scores_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, Hkv, n_rep, T, D, w, k = 2, 3, 2, 23, 8, 5, 5
    q = torch.randn(B, Hkv * n_rep, w, D, generator=g)
    keys = torch.randn(B, Hkv, T, D, generator=g)
    probs = _naive_probs(q, keys, 0.3)                                    # [B, H, w, T]
    votes = probs[..., :T - w].sum(2).view(B, Hkv, n_rep, T - w).mean(2)
    pad = torch.nn.functional.pad(votes, (k // 2, k // 2))                # zeros, as avg_pool1d
    pooled = torch.stack([pad[..., i:i + k].mean(-1) for i in range(T - w)], -1)
    got = R.snapkv_scores(q, keys, 0.3, kernel=k)
    torch.testing.assert_close(got, pooled, rtol=1e-5, atol=1e-6)


def test_h2o_accumulation_equals_the_sum_of_each_query_softmax():
    g = torch.Generator().manual_seed(1)
    B, Hkv, n_rep, T, S, D = 1, 2, 3, 37, 29, 8
    q = torch.randn(B, Hkv * n_rep, S, D, generator=g)
    keys = torch.randn(B, Hkv, T, D, generator=g)
    want = _naive_probs(q, keys, 0.25).sum(2).view(B, Hkv, n_rep, T).mean(2)
    got = R.h2o_accumulate(q, keys, 0.25, block=7)       # blocks of 7 queries: 5 blocks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a chunk's keys after its last query get no mass; every query spreads mass 1 (per head)
    assert torch.allclose(got.sum(-1), torch.full((B, Hkv), float(S)))
    # accumulation over two chunks = one pass over all queries (keys grow with the chunks)
    a = R.h2o_accumulate(q[:, :, :10], keys[:, :, :T - S + 10], 0.25)
    b = R.h2o_accumulate(q[:, :, 10:], keys, 0.25)
    torch.testing.assert_close(torch.nn.functional.pad(a, (0, S - 10)) + b, got,
                               rtol=1e-5, atol=1e-6)


def test_h2o_keep_heavy_hitters_and_recent():
    acc = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 9.0, 0.3, 0.0, 0.0],
                         [0.0, 7.0, 0.1, 6.0, 0.2, 0.3, 0.0, 0.0]]])      # [1, 2, 8]
    keep = R.h2o_keep(acc, budget=4, recent=2)
    assert keep.tolist() == [[[0, 4, 6, 7], [1, 3, 6, 7]]]
    assert R.h2o_keep(acc, budget=20, recent=2).shape == (1, 2, 8)        # nothing to evict
    assert R.h2o_keep(acc, budget=3, recent=0).tolist() == [[[0, 2, 4], [1, 3, 5]]]


def test_budgets():
    assert R.SnapKVConfig(ratio=0.5, window=32).budget_for(4096) == 2048
    assert R.SnapKVConfig(ratio=0.9, window=32).budget_for(100) == 32     # the window stays
    assert R.SnapKVConfig(budget=300).budget_for(4096) == 300
    assert R.H2OConfig(ratio=0.5).budget_for(7) == 4
    assert R.H2OConfig(budget=100).recent_for(100) == 50
    assert R.H2OConfig(budget=100, recent=10).recent_for(100) == 10
    assert R.StreamingConfig(4, 60).budget_for(10_000) == 64


def test_streaming_keep():
    assert R.streaming_keep(10, 2, 3).tolist() == [0, 1, 7, 8, 9]
    assert R.streaming_keep(5, 2, 3).tolist() == [0, 1, 2, 3, 4]


def test_rerotate_moves_a_key_to_another_position():
    g = torch.Generator().manual_seed(2)
    D = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    x = torch.randn(1, 2, 6, D, generator=g)
    pos = torch.tensor([0, 1, 2, 500, 501, 502])
    new = torch.tensor([0, 1, 2, 3, 4, 5])
    moved = R.rerotate(_rope(x, pos, inv_freq), new - pos, inv_freq)
    torch.testing.assert_close(moved, _rope(x, new, inv_freq), rtol=1e-4, atol=1e-4)
    # zero shift is bit for bit
    k = _rope(x, pos, inv_freq)
    assert torch.equal(R.rerotate(k, torch.zeros(6, dtype=torch.long), inv_freq), k)


def test_gather_tokens_is_per_head_and_compact():
    x = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)
    idx = torch.tensor([[[0, 5], [1, 9], [2, 3]], [[4, 4], [0, 1], [8, 9]]])
    out = R.gather_tokens(x, idx)
    assert out.shape == (2, 3, 2, 4) and out.is_contiguous()
    for b in range(2):
        for h in range(3):
            assert torch.equal(out[b, h], x[b, h, idx[b, h]])
    assert out.untyped_storage().nbytes() == out.numel() * 4                # not a view of x
    assert R.gather_tokens(torch.zeros(1, 2, 5), torch.tensor([[[1], [2]]])).shape == (1, 2, 1)


def test_rotating_the_sinks_equals_moving_every_kept_key():
    """StreamingLLM's kept set (sinks 0..n−1, then a contiguous run ending at seen − 1): moving
    every key to its in-cache position (the reference) leaves the run's keys unchanged bit for
    bit and moves the sinks by seen − K; rotate_sinks does just that, out of place or in place.
    A kept set with a gap in the run (not StreamingLLM's) is not covered by the shortcut."""
    g = torch.Generator().manual_seed(5)
    D, sink, window, seen = 16, 3, 9, 40
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = R.streaming_keep(seen, sink, window)                       # [0, 1, 2, 31, .., 39]
    K = pos.numel()
    x = torch.randn(2, 2, K, D, generator=g)
    keys = _rope(x, pos, inv_freq)                                   # true positions
    want = R.rerotate_to_cache_positions(keys, pos, seen - K, inv_freq)
    torch.testing.assert_close(want, _rope(x, torch.arange(seen - K, seen), inv_freq),
                               rtol=1e-4, atol=1e-4)                 # cache positions seen−K..
    got = R.rotate_sinks(keys, sink, seen - K, inv_freq)
    assert torch.equal(got[:, :, sink:], want[:, :, sink:]) and torch.equal(got[:, :, sink:],
                                                                          keys[:, :, sink:])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    inplace = keys.clone()
    assert R.rotate_sinks(inplace, sink, seen - K, inv_freq, inplace=True) is inplace
    assert torch.equal(inplace, got)
    assert R.rotate_sinks(keys, 0, 5, inv_freq) is keys and R.rotate_sinks(keys, 3, 0, inv_freq) is keys
    gap = torch.cat((pos[:sink], pos[sink:] - (pos >= 35).long()[sink:] * 2))   # run with a hole
    want_gap = R.rerotate_to_cache_positions(keys, gap, seen - K, inv_freq)
    assert not torch.allclose(R.rotate_sinks(keys, sink, seen - K, inv_freq), want_gap,
                              rtol=1e-4, atol=1e-4)
