"""Dynamic block sparsity: block-importance estimation, the block table, and its dense-mask
semantics (plain torch, obviously correct, any device).

Two selections build the same kind of table, ``int32 [B, H, n_q_blocks, n_keep]`` of key-block
ids, -1 padded (the table ``kernels/sparse_attention/triton.py:block_sparse_attention`` takes):

* prefill (``prefill_table``), MInference's *block_sparse* pattern (Jiang et al. 2024,
  "MInference 1.0", §3.2 and ``minference/ops/block_sparse_flash_attention.py``): the queries
  and keys of each block of ``block`` tokens are mean-pooled and the pooled scores
  ``q̄_qb · k̄_kbᵀ`` rank the key blocks of each query block (``estimate="pooled"``); or, as
  in its vertical-slash estimation, the exact attention of the last ``last_q`` queries,
  summed per key block, ranks the key blocks for every query block (``estimate="last_q"``).
* decode (``decode_table``), Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for
  Efficient Long-Context LLM Inference", §3.2): per key block the channel-wise minimum and
  maximum of the keys give the upper bound ``Σ_d max(q_d·min_d, q_d·max_d)`` of any
  ``q · k`` in the block; the blocks with the largest bounds are kept. Computed here as
  ``q·(min+max)/2 + |q|·(max−min)/2`` (two matmuls, no [.., blocks, D] product).

Quest's bounds can also come from the KV cache (``runtime/bounds_cache.py``): per key block
the channel-wise ``kmin``/``kmax`` [B, Hkv, n_blocks, D] kept with the keys, updated on append
(``update_bounds``: only the last partial block and the new ones are recomputed), so a decode
step reads 2·D numbers per block instead of the block's keys (``decode_table(..., bounds=)``).
``select="kv_head"`` makes one selection per KV head — the bounds of the G query heads of a
group (and of the S queries) are max-reduced — so the table is [B, Hkv, 1, n_keep] and a
kernel reads each kept block once for the whole group (LServe, Yang et al. 2025,
arXiv:2502.14866, §4.3 shares page selection across the query heads of a KV head);
``select="head"`` keeps Quest's per-query-head selection [B, H, 1, n_keep].

Both always keep the *forced* blocks of each query block — the sink blocks (keys ``j <
sink``), the local window (keys within ``window`` of any row of the block) and the diagonal —
and then the highest-scoring other causal blocks until the row holds ``budget`` blocks:
``topk`` (a count, forced blocks included) or ``ceil(density · causal blocks)``. Sink and
window are rounded out to whole blocks.

Positions follow the KV cache (bottom-right): with S queries over Skv keys, query index i is at
``p_i = Skv − S + i``. Query block qb holds the query *indices* ``[qb·bs, (qb+1)·bs)``, key
block kb the keys ``[kb·bs, (kb+1)·bs)``. Visible keys (``table_mask``)::

    j <= p_i  and  key_keep[b, j]  and  j // bs in table[b, h, i // bs]

Shapes: q [B, H, S, D]; k [B, Hkv, Skv, D]; H % Hkv == 0 (head h reads kv head h // (H/Hkv)).
A table's head axis is H (per query head) or Hkv (per KV head: head h reads row h // (H/Hkv)).
"""
from __future__ import annotations

import math

import torch

from longfx.kernels.attention.reference import expand_kv

ESTIMATES = ("pooled", "last_q")
SELECTS = ("kv_head", "head")     # decode: one table per KV head (LServe) or per query head (Quest)


def check_block(block: int) -> None:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")


def query_block_bounds(s: int, skv: int, bs: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last query position of each query block (int64 [n_q_blocks] each)."""
    i0 = torch.arange(0, s, bs, device=device)
    i1 = torch.clamp(i0 + bs, max=s) - 1
    return skv - s + i0, skv - s + i1


def layout(s: int, skv: int, bs: int, sink: int, window: int, device=None):
    """Block structure of the causal score matrix: ``causal`` and ``forced`` bool
    [n_q_blocks, n_kv_blocks] (forced: sink blocks, the window of every row, the diagonal)."""
    p0, p1 = query_block_bounds(s, skv, bs, device)
    kb = torch.arange(-(-skv // bs), device=device)
    causal = kb[None, :] <= (p1 // bs)[:, None]                           # [nqb, nkb]
    lo = (p0 - max(window, 1) + 1).clamp(min=0) // bs                    # first window block
    forced = causal & (kb[None, :] >= lo[:, None])
    if sink > 0:
        forced = forced | (causal & (kb[None, :] < -(-sink // bs)))
    return causal, forced


def budget(n_causal: torch.Tensor, n_forced: torch.Tensor, topk: int, density: float) -> torch.Tensor:
    """Blocks each query block keeps: ``topk`` or ``ceil(density · causal)``, at least the
    forced blocks, at most the causal ones (int64 like ``n_causal``)."""
    want = torch.full_like(n_causal, int(topk)) if topk > 0 else \
        torch.ceil(n_causal.double() * float(density)).long()
    return torch.minimum(torch.maximum(want, n_forced), n_causal)


def max_budget(s: int, skv: int, bs: int, sink: int, window: int, topk: int, density: float) -> int:
    """An upper bound of ``budget`` over the query blocks (host ints only: no device sync)."""
    nkb = -(-skv // bs)
    forced = -(-sink // bs) + (max(window, 1) + min(bs, s) - 2) // bs + 2
    want = topk if topk > 0 else math.ceil(nkb * float(density))
    return max(1, min(nkb, max(want, forced)))


def select_table(scores: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor, topk: int,
           density: float, width: int) -> torch.Tensor:
    """Table int32 [B, H, nqb, width] from block scores [B, H, nqb, nkb]: forced blocks, then
    the best-scoring causal ones, ``budget`` per row, -1 padded. Tensor ops only."""
    s = scores.float().nan_to_num(0.0, posinf=3e38, neginf=-3e38).clamp(-3e38, 3e38)
    s = s.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    n = budget(causal.sum(-1), forced.sum(-1), topk, density)            # [nqb]
    width = min(width, s.shape[-1])
    vals, idx = torch.topk(s, width, dim=-1)                              # [B, H, nqb, width]
    keep = (torch.arange(width, device=s.device) < n[:, None]) & (vals > float("-inf"))
    return torch.where(keep, idx, -1).to(torch.int32)


def pooled_scores(q: torch.Tensor, k: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean-pooled block scores [B, H, nqb, nkb] (MInference block_sparse)."""
    B, H, S, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    qp = _block_mean(q, bs)                                               # [B, H, nqb, D]
    kp = _block_mean(k, bs)                                               # [B, Hkv, nkb, D]
    qg = qp.reshape(B, Hkv, (H // Hkv) * qp.shape[2], D)                  # [B, Hkv, G·nqb, D]
    sc = torch.matmul(qg.float(), kp.float().transpose(-1, -2))           # [B, Hkv, G·nqb, nkb]
    return sc.reshape(B, H, qp.shape[2], kp.shape[2])


def _block_mean(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean over blocks of ``bs`` rows of x [B, H, L, D] (the last block: its valid rows)."""
    B, H, L, D = x.shape
    n = -(-L // bs)
    pad = n * bs - L
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    # summed in fp32 straight from x's dtype: no fp32 copy of x (at 128k tokens, 32 heads,
    # the copy and its padding were most of the pooled estimate's 7.7 ms on an H100)
    xs = x.reshape(B, H, n, bs, D).sum(3, dtype=torch.float32)            # [B, H, n, D]
    counts = torch.clamp(L - torch.arange(n, device=x.device) * bs, max=bs).to(xs.dtype)
    return xs / counts[:, None]                                           # [B, H, n, D]


def last_q_scores(q: torch.Tensor, k: torch.Tensor, bs: int, last_q: int, scale: float,
                  key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass of the last ``last_q`` queries per key block, [B, H, 1, nkb] (the same
    ranking for every query block; MInference's vertical-slash estimation)."""
    S, Skv = q.shape[2], k.shape[2]
    n = max(1, min(last_q, S))
    ql = q[:, :, S - n:].float()                                          # [B, H, n, D]
    sc = torch.matmul(ql, expand_kv(q, k).float().transpose(-1, -2)) * scale   # [B, H, n, Skv]
    qp = torch.arange(Skv - n, Skv, device=q.device)
    keep = torch.arange(Skv, device=q.device)[None, :] <= qp[:, None]      # [n, Skv]
    keep = keep[None, None]
    if key_keep is not None:
        keep = keep & key_keep.bool()[:, None, None, :]
    p = torch.softmax(sc.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0).sum(2)
    nkb = -(-Skv // bs)
    p = torch.nn.functional.pad(p, (0, nkb * bs - Skv))                   # [B, H, nkb·bs]
    return p.reshape(*p.shape[:2], 1, nkb, bs).sum(-1)                   # [B, H, 1, nkb]


def block_bounds(k: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each block of ``bs`` keys (the last block: its valid keys):
    ``(kmin, kmax)`` [B, Hkv, ceil(Skv / bs), D] in k's dtype (exact: min/max pick values)."""
    B, Hkv, Skv, D = k.shape
    n = -(-Skv // bs)
    if n * bs > Skv:                                                      # pad with the last key
        k = torch.cat((k, k[:, :, -1:].expand(B, Hkv, n * bs - Skv, D)), dim=2)
    kb = k.reshape(B, Hkv, n, bs, D)                                      # [B, Hkv, n, bs, D]
    return kb.amin(3), kb.amax(3)


def update_bounds(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, start: int,
                  end: int, bs: int) -> None:
    """In place: after keys ``[start, end)`` were written into ``keys`` [B, Hkv, >= end, D],
    recompute the bounds of the blocks they touch — ``[start // bs, ceil(end / bs))``: the
    last partial block (from its first key) and the new ones; nothing before is read.
    ``kmin``/``kmax`` [B, Hkv, >= ceil(end / bs), D]."""
    b0, b1 = start // bs, -(-end // bs)
    if end <= start or b1 <= b0:
        return
    lo, hi = block_bounds(keys[:, :, b0 * bs:end], bs)                    # [B, Hkv, b1 - b0, D]
    kmin[:, :, b0:b1] = lo
    kmax[:, :, b0:b1] = hi


def bound_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k over each block from its bounds, max over the S queries:
    q [B, H, S, D], kmin/kmax [B, Hkv, n, D] -> [B, H, 1, n] fp32."""
    B, H, S, D = q.shape
    Hkv, n = kmin.shape[1], kmin.shape[2]
    lo, hi = kmin.float(), kmax.float()
    qg = q.float().reshape(B, Hkv, (H // Hkv) * S, D)                     # [B, Hkv, G·S, D]
    ub = torch.matmul(qg, ((lo + hi) / 2).transpose(-1, -2)) + \
        torch.matmul(qg.abs(), ((hi - lo) / 2).transpose(-1, -2))          # [B, Hkv, G·S, n]
    return ub.reshape(B, H, S, n).amax(2, keepdim=True)                   # [B, H, 1, n]


def quest_scores(q: torch.Tensor, k: torch.Tensor, bs: int) -> torch.Tensor:
    """Quest's upper bound per key block, max over the S queries: [B, H, 1, nkb] (the bounds
    recomputed from k)."""
    lo, hi = block_bounds(k.float(), bs)                                  # [B, Hkv, n, D]
    return bound_scores(q, lo, hi)


def kv_head_scores(scores: torch.Tensor, hkv: int) -> torch.Tensor:
    """Per-query-head block scores [B, H, 1, n] -> one per KV head [B, Hkv, 1, n]: the max over
    the G query heads that read that KV head (a block any of them may need ranks high)."""
    B, H, one, n = scores.shape
    return scores.reshape(B, hkv, H // hkv, one, n).amax(2)               # [B, Hkv, 1, n]


def expand_table(table: torch.Tensor, heads: int) -> torch.Tensor:
    """A per-KV-head table [B, Hkv, nqb, W] as a per-query-head one [B, H, nqb, W] (query head
    h reads row h // (H / Hkv)); a per-head table is returned as it is."""
    if table.shape[1] == heads:
        return table
    if heads % table.shape[1]:
        raise ValueError(f"a table of {table.shape[1]} heads does not serve {heads} query heads")
    return table.repeat_interleave(heads // table.shape[1], dim=1)


def prefill_table(q: torch.Tensor, k: torch.Tensor, block: int, topk: int = 0,
                  density: float = 0.0, sink: int = 0, window: int = 0, estimate: str = "pooled",
                  last_q: int = 64, scale: float | None = None,
                  key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill block table int32 [B, H, ceil(S / block), n_keep]."""
    check_block(block)
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    S, Skv = q.shape[2], k.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    causal, forced = layout(S, Skv, block, sink, window, q.device)
    if estimate == "pooled":
        scores = pooled_scores(q, k, block)
    else:
        scores = last_q_scores(q, k, block, last_q, scale, key_keep).expand(
            -1, -1, causal.shape[0], -1)
    width = max_budget(S, Skv, block, sink, window, topk, density)
    return select_table(scores, causal, forced, topk, density, width)


def decode_table(q: torch.Tensor, k: torch.Tensor | None, block: int, topk: int = 0,
                 density: float = 0.0, sink: int = 0, window: int = 0,
                 scores: torch.Tensor | None = None, select: str = "head",
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 skv: int | None = None) -> torch.Tensor:
    """The decode block table int32 (S <= block queries, Quest bounds): [B, H, 1, n_keep]
    with ``select="head"``, [B, Hkv, 1, n_keep] with ``select="kv_head"``.

    The bounds are ``scores`` when given (per query head [B, H, 1, nkb], e.g. from the Triton
    kernel), else computed from ``bounds`` = (kmin, kmax) kept with the cache (only their first
    ceil(skv / block) blocks are read), else from the keys k. ``skv``: the key count (default
    k's)."""
    check_block(block)
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    S = q.shape[2]
    Skv = k.shape[2] if skv is None else skv
    if S > block:
        raise ValueError(f"decode selection takes at most block={block} queries, got {S}")
    causal, forced = layout(S, Skv, block, sink, window, q.device)       # [1, nkb]
    width = max_budget(S, Skv, block, sink, window, topk, density)
    if scores is None:
        if bounds is not None:
            n = -(-Skv // block)
            scores = bound_scores(q, bounds[0][:, :, :n], bounds[1][:, :, :n])
        else:
            scores = quest_scores(q, k, block)
    if select == "kv_head":
        hkv = bounds[0].shape[1] if bounds is not None else k.shape[1]
        scores = kv_head_scores(scores, hkv)                              # [B, Hkv, 1, nkb]
    return select_table(scores, causal, forced, topk, density, width)


def decode_budget(s: int, skv: int, bs: int, sink: int, window: int, topk: int,
                  density: float) -> tuple[int, int, int]:
    """(blocks a decode step keeps, first window block, sink blocks) as host ints — what
    ``layout`` and ``budget`` give for the one query block of ``s <= bs`` queries over ``skv``
    keys: forced blocks are those < sink blocks or >= the first window block."""
    nkb = -(-skv // bs)
    lo = max(skv - s - max(window, 1) + 1, 0) // bs
    nsb = min(-(-sink // bs), nkb) if sink > 0 else 0
    forced = (nkb - lo) + min(nsb, lo)
    want = int(topk) if topk > 0 else math.ceil(nkb * float(density))
    return min(max(want, forced), nkb), lo, nsb


def table_mask(table: torch.Tensor, s: int, skv: int, bs: int,
               key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-matrix bool [B, H, S, Skv] a table means (small shapes: it is dense)."""
    B, H, nqb, _ = table.shape
    nkb = -(-skv // bs)
    member = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool, device=table.device)
    idx = torch.where(table >= 0, table.long(), nkb)                      # -1 -> a spare column
    member.scatter_(-1, idx, True)
    member = member[..., :nkb]                                            # [B, H, nqb, nkb]
    rows = member.repeat_interleave(bs, 2)[:, :, :s]                      # [B, H, S, nkb]
    keep = rows.repeat_interleave(bs, 3)[..., :skv]                       # [B, H, S, Skv]
    qp = torch.arange(skv - s, skv, device=table.device)
    keep = keep & (torch.arange(skv, device=table.device)[None, :] <= qp[:, None])
    if key_keep is not None:
        keep = keep & key_keep.bool()[:, None, None, :]
    return keep


def attention_with_table(q, k, v, table, bs, scale=None, softcap=0.0, key_keep=None):
    """softmax attention under ``table_mask`` (fp32 softmax; fully masked rows give zeros)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    keep = table_mask(expand_table(table, q.shape[1]), q.shape[2], k.shape[2], bs, key_keep)
    sc = torch.matmul(q, expand_kv(q, k).transpose(-1, -2)) * scale       # [B, H, S, Skv]
    if softcap:
        sc = torch.tanh(sc / softcap) * softcap
    p = torch.softmax(sc.float().masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.matmul(p.to(v.dtype), expand_kv(q, v))


def table_counts(table: torch.Tensor, s: int, skv: int, bs: int) -> tuple[int, int]:
    """(kept, causal) block pairs of a table, summed over batch and heads."""
    causal, _ = layout(s, skv, bs, 0, 0, table.device)
    B, H = table.shape[:2]
    return int((table >= 0).sum()), int(causal.sum()) * B * H


def expected_density(context: int, block: int, topk: int, density: float, sink: int,
                     window: int) -> float:
    """Kept / causal block pairs of a one-shot prefill of ``context`` tokens (no data needed:
    the budget does not depend on the scores)."""
    causal, forced = layout(context, context, block, sink, window)
    n = budget(causal.sum(-1), forced.sum(-1), topk, density)
    return float(n.sum()) / float(causal.sum())
