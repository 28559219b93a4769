"""Vertical-slash (MInference) and FlexPrefill estimation, lowered to the block table of
``longfx::block_sparse_attention``, and the op ``longfx::dynamic_sparse_prefill`` that runs them.

Both estimators look at the attention of the *last queries* of the call and choose token-level
lines, which are then lowered to a per-(batch, query head, query block) table of key blocks that
``op.attend_table`` runs (the Triton block-table kernel on CUDA, the gather on CPU):

* ``vertical_slash`` — MInference 1.0 (Jiang et al. 2024, §3.2 and
  ``minference/modules/minference_forward.py:vertical_and_slash_kernel``): per query head, the
  softmax attention of the last ``last_q`` queries (causal) is summed along columns (one score
  per key position j) and along diagonals (one score per offset o = i − j). The top ``vertical``
  columns and the top ``slash`` offsets are kept; like MInference, the first ``FORCED_COLUMNS``
  key columns and the ``FORCED_OFFSETS`` smallest offsets (the local diagonal band) rank first
  and count in the budgets.
* ``flex`` — FlexPrefill (Lai et al. 2025, ICLR, Algorithms 2–4): per query head, the true
  block distribution of the last ``block`` queries (their softmax attention, sum-pooled per key
  block, averaged over the queries) is compared with the estimate from pooled queries and keys
  (softmax of ``mean(q̂) · mean-pooled k``) by the square root of the Jensen–Shannon divergence.
  Below ``tau`` the head is *query-aware*: the row-softmaxed pooled scores of every query block
  (``reference.pooled_scores``) are flattened and the fewest (query block, key block) pairs whose
  mass reaches ``gamma`` of the total are kept. Otherwise the head is *vertical-slash*: the
  fewest columns and the fewest offsets whose (normalized) mass from the last block's attention
  reaches ``gamma`` each are kept. The budget is therefore adaptive per head. Both modes keep the
  first key block and the diagonal (FlexPrefill forces the first vertical and the last slash
  block).

Lowering (``lines_to_blocks``) is *exact coverage at block granularity*: a key block is kept for
a query block iff the bs × bs tile contains a causal position (i, j) of a chosen column j or of
a chosen offset p_i − j. Inside a kept tile every causal position is attended, so the attended
set is a superset of the token-level pattern, equal to it up to the tiles it touches. Tiles of a
column: chosen j in [k0, min(k1, p1)]; tiles of an offset: chosen o in [max(0, p0 − k1), p1 − k0]
(every integer of that range is some p − j of the tile). Both are interval counts over prefix
sums of the chosen lines, so the [nqb, nkb] keep matrix is built with tensor ops only. The
token-level references (``vertical_slash_mask``, ``flex_mask``: dense [S, Skv] masks, small
shapes) state the same patterns without the block arithmetic; tests compare the two.

Positions follow the KV cache (bottom-right) as in reference.py: query index i is at
``p_i = Skv − S + i``; tables are per query head (GQA heads read kv head h // (H / Hkv)).
"""
from __future__ import annotations

import math

import torch

from longfx.kernels.attention.reference import expand_kv
from longfx.kernels.block_sparse import op as bs_op
from longfx.kernels.block_sparse import reference
from longfx.kernels.block_sparse.reference import check_block, layout, query_block_bounds

METHODS = ("vertical_slash", "flex")
FORCED_COLUMNS = 30          # MInference: vertical[..., :30] = inf (the first tokens)
FORCED_OFFSETS = 100         # MInference: slash[..., -100:] = inf (offsets 0..99: the local band)
DENSE_DENSITY = 0.9          # a table keeping more than this of the causal blocks runs dense


# ==============================================================================================
# Scores of the last queries


def last_probs(q: torch.Tensor, k: torch.Tensor, n: int, scale: float,
               key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the last ``n`` queries, fp32 [B, H, n, Skv] (causal, padding)."""
    S, Skv = q.shape[2], k.shape[2]
    n = max(1, min(n, S))
    ql = q[:, :, S - n:].float()                                          # [B, H, n, D]
    sc = torch.matmul(ql, expand_kv(q, k).float().transpose(-1, -2)) * scale   # [B, H, n, Skv]
    pos = torch.arange(Skv - n, Skv, device=q.device)                    # [n]
    keep = (torch.arange(Skv, device=q.device)[None, :] <= pos[:, None])[None, None]
    if key_keep is not None:
        keep = keep & key_keep.bool()[:, None, None, :]
    return torch.softmax(sc.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)


def column_scores(p: torch.Tensor) -> torch.Tensor:
    """Attention mass per key column j, [B, H, Skv] (the vertical lines)."""
    return p.sum(2)


def offset_scores(p: torch.Tensor) -> torch.Tensor:
    """Attention mass per offset o = p_i − j, [B, H, Skv] (index o; the slash lines) of the
    last-query probabilities p [B, H, n, Skv] (rows at positions Skv − n .. Skv − 1)."""
    B, H, n, Skv = p.shape
    pos = torch.arange(Skv - n, Skv, device=p.device)                    # [n]
    j = pos[:, None] - torch.arange(Skv, device=p.device)[None, :]       # [n, Skv]: key of (row, o)
    g = p.gather(-1, j.clamp(min=0).expand(B, H, n, Skv))                # [B, H, n, Skv]
    return (g * (j >= 0)).sum(2)


def top_lines(scores: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """bool [B, H, L]: the ``count`` best lines, the first ``forced`` ranked first."""
    L = scores.shape[-1]
    s = scores.float().clone()
    s[..., :min(forced, L)] = float("inf")
    idx = torch.topk(s, min(count, L), dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def cover(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool like ``scores`` (>= 0, along the last dim): the fewest entries whose sum reaches
    ``gamma`` of the total (ties by sort order); ``gamma >= 1``: every entry."""
    if gamma >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    vals, idx = torch.sort(scores.double(), dim=-1, descending=True)   # fp64 sums: stable cut
    before = torch.cumsum(vals, -1) - vals                               # mass of the better ones
    take = before < gamma * vals.sum(-1, keepdim=True)
    take[..., 0] = True
    return torch.zeros_like(take).scatter_(-1, idx, take)


# ==============================================================================================
# Lines -> blocks


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """int32 [..., L + 1]: count of True among x[..., :t] at index t."""
    c = torch.cumsum(x.to(torch.int32), -1, dtype=torch.int32)
    return torch.nn.functional.pad(c, (1, 0))


def lines_to_blocks(cols: torch.Tensor, offs: torch.Tensor, s: int, skv: int,
                    bs: int) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: the tiles holding a causal position of a chosen column
    (``cols`` bool [B, H, Skv], by key index) or of a chosen offset (``offs`` bool [B, H, Skv],
    by offset p_i − j). Exact at block granularity (see the module docstring)."""
    dev = cols.device
    B, H = cols.shape[:2]
    p0, p1 = query_block_bounds(s, skv, bs, dev)                         # [nqb]
    nkb = -(-skv // bs)
    k0 = torch.arange(nkb, device=dev) * bs                              # [nkb]
    k1 = torch.clamp(k0 + bs, max=skv) - 1
    # vertical: chosen j in [k0, min(k1, p1)]
    vhi = torch.minimum(k1[None, :], p1[:, None])                        # [nqb, nkb]
    vok = vhi >= k0[None, :]
    vlo = k0[None, :].expand_as(vhi)
    # slash: chosen o in [max(0, p0 - k1), p1 - k0]
    shi = p1[:, None] - k0[None, :]                                      # [nqb, nkb]
    sok = shi >= 0
    slo = (p0[:, None] - k1[None, :]).clamp(min=0)

    def count(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ok: torch.Tensor):
        hi = torch.where(ok, hi, lo - 1).clamp(min=-1)                   # empty where not ok
        lo = lo.clamp(max=skv)
        idx_hi = (hi + 1).reshape(1, 1, -1).expand(B, H, -1)
        idx_lo = lo.reshape(1, 1, -1).expand(B, H, -1)
        n = prefix.gather(-1, idx_hi) - prefix.gather(-1, idx_lo)        # [B, H, nqb·nkb]
        return (n > 0).reshape(B, H, *ok.shape)

    keep = count(_prefix(cols), vlo, vhi, vok) | count(_prefix(offs), slo, shi, sok)
    causal, _ = layout(s, skv, bs, 0, 0, dev)
    return keep & causal


def keep_to_table(keep: torch.Tensor) -> torch.Tensor:
    """int32 [B, H, nqb, W] (ascending key blocks, -1 padded; W = the fullest row: one device
    sync) from a keep matrix bool [B, H, nqb, nkb]."""
    nkb = keep.shape[-1]
    width = max(1, int(keep.sum(-1).max()))
    kb = torch.arange(nkb, device=keep.device, dtype=torch.float32)
    rank = torch.where(keep, nkb - kb, torch.full_like(kb, -1.0))       # kept: > 0, lower kb first
    vals, idx = torch.topk(rank, width, dim=-1)
    return torch.where(vals > 0, idx, -1).to(torch.int32)


# ==============================================================================================
# The two estimators


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def vertical_slash_lines(q, k, vertical: int, slash: int, last_q: int = 64, scale=None,
                         key_keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's chosen lines: (columns, offsets), bool [B, H, Skv] each."""
    p = last_probs(q, k, last_q, _scale(q, scale), key_keep)
    cols = top_lines(column_scores(p), vertical, FORCED_COLUMNS)
    offs = top_lines(offset_scores(p), slash, FORCED_OFFSETS)
    return cols, offs


def vertical_slash_keep(q, k, block: int, vertical: int, slash: int, last_q: int = 64,
                        scale=None, key_keep=None) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: the tiles of MInference's vertical-slash pattern."""
    check_block(block)
    cols, offs = vertical_slash_lines(q, k, vertical, slash, last_q, scale, key_keep)
    return lines_to_blocks(cols, offs, q.shape[2], k.shape[2], block)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen–Shannon divergence (natural log) along the last dim; inputs are
    normalized first (0 * log 0 = 0)."""
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    m = (p + q) / 2

    def kl(a):
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - m.clamp(min=1e-30).log()),
                           torch.zeros_like(a)).sum(-1)
    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0).sqrt()


def flex_distributions(q, k, block: int, scale=None, key_keep=None, p_last=None):
    """(true, estimated) block distributions of the last ``block`` queries, [B, H, nkb] each:
    true = the mean over those queries of their softmax attention, sum-pooled per key block;
    estimated = softmax over key blocks of ``mean(q̂) · mean-pooled k · scale``."""
    scale = _scale(q, scale)
    S, Skv = q.shape[2], k.shape[2]
    n = max(1, min(block, S))
    p = last_probs(q, k, n, scale, key_keep) if p_last is None else p_last
    nkb = -(-Skv // block)
    true = torch.nn.functional.pad(p.mean(2), (0, nkb * block - Skv))
    true = true.reshape(*true.shape[:2], nkb, block).sum(-1)             # [B, H, nkb]
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qm = q[:, :, S - n:].float().mean(2)                                 # [B, H, D]
    kp = reference._block_mean(k, block)                                 # [B, Hkv, nkb, D]
    est = torch.matmul(qm.reshape(B, Hkv, H // Hkv, D), kp.transpose(-1, -2)).reshape(B, H, nkb)
    if key_keep is not None:                                             # blocks of padding only
        kk = torch.nn.functional.pad(key_keep.bool(), (0, nkb * block - Skv))
        est = est.masked_fill(~kk.reshape(B, 1, nkb, block).any(-1), float("-inf"))
    est = torch.softmax(est * scale, -1).nan_to_num(0.0)
    return true, est


def flex_choice(q, k, block: int, gamma: float, tau: float, scale=None, key_keep=None):
    """FlexPrefill's selection: (keep bool [B, H, nqb, nkb], query_aware bool [B, H])."""
    check_block(block)
    scale = _scale(q, scale)
    S, Skv = q.shape[2], k.shape[2]
    p = last_probs(q, k, block, scale, key_keep)                         # [B, H, n, Skv]
    true, est = flex_distributions(q, k, block, scale, key_keep, p_last=p)
    query_aware = js_distance(true, est) < tau                           # [B, H]
    causal, _ = layout(S, Skv, block, 0, 0, q.device)
    # vertical-slash heads: gamma of the column mass and of the offset mass
    cols = cover(column_scores(p), gamma)
    offs = cover(offset_scores(p), gamma)
    cols[..., 0] = True                                                  # the first block
    offs[..., 0] = True                                                  # the diagonal
    keep_vs = lines_to_blocks(cols, offs, S, Skv, block)
    # query-aware heads: gamma of the flattened row-softmaxed pooled scores
    sc = reference.pooled_scores(q, k, block) * scale                    # [B, H, nqb, nkb]
    a = torch.softmax(sc.masked_fill(~causal, float("-inf")), -1).nan_to_num(0.0)
    flat = cover(a.flatten(2), gamma).reshape(a.shape)
    forced = layout(S, Skv, block, 1, 1, q.device)[1]                    # first block, diagonal
    keep_qa = flat | forced
    keep = torch.where(query_aware[..., None, None], keep_qa, keep_vs) & causal
    return keep, query_aware


# ==============================================================================================
# Token-level references (dense masks; small shapes)


def lines_mask(cols: torch.Tensor, offs: torch.Tensor, s: int, skv: int) -> torch.Tensor:
    """bool [B, H, S, Skv]: causal positions on a chosen column or a chosen offset."""
    dev = cols.device
    pos = torch.arange(skv - s, skv, device=dev)                         # [S]
    j = torch.arange(skv, device=dev)
    o = pos[:, None] - j[None, :]                                        # [S, Skv]
    causal = o >= 0
    on_col = cols[:, :, None, :].expand(-1, -1, s, -1)
    on_off = offs.gather(-1, o.clamp(min=0).reshape(1, 1, -1).expand(
        cols.shape[0], cols.shape[1], -1)).reshape(*cols.shape[:2], s, skv)
    return (on_col | on_off) & causal


def block_any(mask: torch.Tensor, bs: int) -> torch.Tensor:
    """bool [B, H, nqb, nkb]: tiles of a token mask [B, H, S, Skv] holding any True."""
    B, H, S, Skv = mask.shape
    nqb, nkb = -(-S // bs), -(-Skv // bs)
    m = torch.nn.functional.pad(mask, (0, nkb * bs - Skv, 0, nqb * bs - S))
    return m.reshape(B, H, nqb, bs, nkb, bs).any(5).any(3)


def vertical_slash_mask(q, k, vertical: int, slash: int, last_q: int = 64, scale=None,
                        key_keep=None) -> torch.Tensor:
    """MInference's token-level pattern bool [B, H, S, Skv], by explicit loops over the lines
    (plain and slow: the reference the tile lowering is compared with)."""
    cols, offs = vertical_slash_lines(q, k, vertical, slash, last_q, scale, key_keep)
    S, Skv = q.shape[2], k.shape[2]
    B, H = cols.shape[:2]
    mask = torch.zeros(B, H, S, Skv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in cols[b, h].nonzero().flatten().tolist():
                mask[b, h, :, j] = True
            for o in offs[b, h].nonzero().flatten().tolist():
                for i in range(S):
                    if 0 <= Skv - S + i - o < Skv:
                        mask[b, h, i, Skv - S + i - o] = True
    pos = torch.arange(Skv - S, Skv)
    return (mask & (torch.arange(Skv)[None, :] <= pos[:, None])).to(cols.device)


def flex_mask(q, k, block: int, gamma: float, tau: float, scale=None,
              key_keep=None) -> torch.Tensor:
    """The keep matrix FlexPrefill's selection means, rebuilt per head with loops and plain
    sorting (the reference ``flex_choice`` is compared with): bool [B, H, nqb, nkb]."""
    scale = _scale(q, scale)
    S, Skv = q.shape[2], k.shape[2]
    B, H = q.shape[:2]
    p = last_probs(q, k, block, scale, key_keep)
    true, est = flex_distributions(q, k, block, scale, key_keep, p_last=p)
    causal, forced = layout(S, Skv, block, 1, 1, q.device)
    pooled = reference.pooled_scores(q, k, block) * scale
    out = torch.zeros(B, H, *causal.shape, dtype=torch.bool)
    n = p.shape[2]
    for b in range(B):
        for h in range(H):
            t, e = true[b, h].double(), est[b, h].double()
            t, e = t / t.sum(), e / e.sum()
            m = (t + e) / 2
            js = 0.5 * sum(float(x * math.log(x / y)) for x, y in zip(t, m) if x > 0) + \
                0.5 * sum(float(x * math.log(x / y)) for x, y in zip(e, m) if x > 0)
            if math.sqrt(max(js, 0.0)) < tau:                            # query-aware
                a = torch.softmax(pooled[b, h].masked_fill(~causal, float("-inf")), -1)
                entries = sorted(((float(a[r, c]), r, c) for r in range(a.shape[0])
                                  for c in range(a.shape[1])), key=lambda x: -x[0])
                total, acc = sum(e[0] for e in entries), 0.0
                for val, r, c in entries:
                    if gamma < 1 and acc >= gamma * total:
                        break
                    out[b, h, r, c] = True
                    acc += val
                out[b, h] |= forced.cpu()
            else:                                                        # vertical-slash
                pb = p[b, h]                                             # [n, Skv]
                colm = pb.sum(0)
                offm = torch.zeros(Skv)
                for r in range(n):
                    for j in range(Skv - n + r + 1):
                        offm[Skv - n + r - j] += pb[r, j]
                chosen = []
                for vec in (colm, offm):
                    vals = sorted(((float(x), i) for i, x in enumerate(vec)), key=lambda x: -x[0])
                    keep, acc, total = torch.zeros(Skv, dtype=torch.bool), 0.0, sum(x[0] for x in vals)
                    for val, i in vals:
                        if gamma < 1 and acc >= gamma * total:
                            break
                        keep[i] = True
                        acc += val
                    keep[0] = True
                    chosen.append(keep)
                tok = lines_mask(chosen[0][None, None], chosen[1][None, None], S, Skv)
                out[b, h] = block_any(tok, block)[0, 0]
    return out.to(q.device) & causal


# ==============================================================================================
# The op


def dense_bound(context: int, block: int, vertical: int, slash: int) -> float:
    """An upper bound of the kept / causal tiles of a one-shot vertical-slash prefill of
    ``context`` tokens, without data: per query block at most ``vertical`` column tiles plus
    two tiles per chosen offset, never more than its causal tiles."""
    causal, _ = layout(context, context, block, 0, 0)
    n = causal.sum(-1)
    kept = torch.minimum(n, torch.full_like(n, vertical + 2 * slash))
    return float(kept.sum()) / float(n.sum())


def _record_full(s, skv, bs, batch_heads: int) -> None:
    """A call whose selection was too dense for the table: counted as computing every causal
    tile (what the dense attention does) in ``op.record_density``'s prefill entry."""
    if bs_op._STATS:
        causal, _ = layout(s, skv, bs, 0, 0)
        n = int(causal.sum()) * batch_heads
        for st in bs_op._STATS:
            st["prefill"][0] += n
            st["prefill"][1] += n
            st["prefill"][2] += 1


def keep_matrix(q, k, method: str, block: int, vertical: int, slash: int, last_q: int,
                gamma: float, tau: float, scale, key_keep) -> torch.Tensor:
    if method == "vertical_slash":
        return vertical_slash_keep(q, k, block, vertical, slash, last_q, scale, key_keep)
    if method == "flex":
        return flex_choice(q, k, block, gamma, tau, scale, key_keep)[0]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def forward(q, k, v, key_keep, scale, softcap, *, method, block, vertical, slash, last_q,
            gamma, tau, min_len, dense_fallback: bool = True) -> torch.Tensor:
    """The op's body. Dense (canonical attention) for decode steps (S <= ``op.DECODE_MAX_S``),
    below ``min_len`` keys, and when the selection keeps more than ``DENSE_DENSITY`` of the
    causal tiles (``dense_fallback=False``, for tests, always runs the table)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s, skv = q.shape[2], k.shape[2]
    if s == 0:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)
    if dense_fallback and (s <= bs_op.DECODE_MAX_S or skv < min_len):
        return bs_op._dense(q, k, v, key_keep, scale, softcap)
    keep = keep_matrix(q, k, method, block, vertical, slash, last_q, gamma, tau, scale, key_keep)
    if dense_fallback:
        causal, _ = layout(s, skv, block, 0, 0, q.device)
        kept, total = int(keep.sum()), int(causal.sum()) * keep.shape[0] * keep.shape[1]
        if kept > DENSE_DENSITY * total:
            _record_full(s, skv, block, keep.shape[0] * keep.shape[1])
            return bs_op.SPARSE(q, k, v, key_keep, scale, softcap, 0, 0, 0, None, "rotate_half")
    table = keep_to_table(keep)
    bs_op._count("prefill", table, s, skv, block)
    return bs_op.attend_table(q, k, v, table, block, scale, softcap, key_keep)


@torch.library.custom_op("longfx::dynamic_sparse_prefill", mutates_args=())
def dynamic_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_keep: torch.Tensor | None, scale: float, softcap: float,
                           method: str, block: int, vertical: int, slash: int, last_q: int,
                           gamma: float, tau: float, min_len: int) -> torch.Tensor:
    bs_op.check_args(q, k, v, key_keep, block, 16, "pooled")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return forward(q, k, v, key_keep, scale, softcap, method=method, block=block,
                   vertical=vertical, slash=slash, last_q=last_q, gamma=gamma, tau=tau,
                   min_len=min_len)


@dynamic_sparse_prefill.register_fake
def _(q, k, v, key_keep, scale, softcap, *params):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.dynamic_sparse_prefill.default
