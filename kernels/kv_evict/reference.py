"""Reference KV-cache eviction: scoring and per-head selection in plain torch, any device.

Three policies, each a frozen config with the budget rule (:meth:`budget_for`):

* :class:`SnapKVConfig` — SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
  Before Generation", arXiv:2404.14469): the last ``window`` queries of a prefill chunk (the
  *observation window*) attend to the keys; their softmax probabilities, summed over the
  window and averaged over the query heads that share a KV head (GQA), are smoothed with a 1-D
  pool of size ``kernel`` (avg as in the paper, or max) over the prefix, and each KV head keeps
  its own top ``budget − window`` prefix tokens plus the whole window.
* :class:`H2OConfig` — H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
  Generative Inference of Large Language Models", arXiv:2306.14048): every query's attention
  probabilities are accumulated per key (per KV head, averaged over its query heads); a head
  keeps the ``recent`` newest tokens plus the ``budget − recent`` *heavy hitters* with the
  largest accumulated score among the older ones. Applied after every chunk and decode step.
* :class:`StreamingConfig` — StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language
  Models with Attention Sinks", arXiv:2309.17453): keep the first ``sink`` tokens (attention
  sinks) and the last ``window``; attention sees contiguous positions inside the cache. Only the
  sinks' keys need moving for that (:func:`rotate_sinks`; why it is exact is said there), not
  every kept key (:func:`rerotate_to_cache_positions`, the plain reference).

Budgets: a fixed ``budget`` (tokens per KV head), or ``ratio`` — the fraction evicted — so the
cache holds ``ceil((1 − ratio) · seen)`` of the ``seen`` tokens (at least the window SnapKV
protects). Shape letters: B, H (query heads), Hkv, S (queries), T (keys), D, w (window),
K (kept tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SnapKVConfig", "H2OConfig", "StreamingConfig", "window_probs", "snapkv_scores",
           "snapkv_keep", "h2o_accumulate", "h2o_keep", "streaming_keep", "gather_tokens",
           "rotate_half", "rerotate", "rerotate_to_cache_positions", "rotate_sinks", "POOLS"]

POOLS = ("avg", "max")


def _budget(budget: int | None, ratio: float | None, seen: int, floor: int = 1) -> int:
    if budget is not None:
        return max(int(budget), floor)
    return max(int(math.ceil((1.0 - ratio) * seen)), floor)


@dataclass(frozen=True)
class SnapKVConfig:
    budget: int | None = None      # tokens per KV head after compression (window included)
    ratio: float | None = None     # or: fraction of the seen tokens evicted
    window: int = 32
    kernel: int = 15
    pool: str = "avg"
    when: str = "prompt"           # "prompt": once, when the prompt ends; "chunk": every chunk

    def budget_for(self, seen: int) -> int:
        return _budget(self.budget, self.ratio, seen, floor=self.window)


@dataclass(frozen=True)
class H2OConfig:
    budget: int | None = None      # tokens per KV head after every update
    ratio: float | None = None
    recent: int | None = None      # None: half the budget (H2O's even heavy/recent split)

    def budget_for(self, seen: int) -> int:
        return _budget(self.budget, self.ratio, seen, floor=1)

    def recent_for(self, budget: int) -> int:
        return min(budget, budget // 2 if self.recent is None else self.recent)


@dataclass(frozen=True)
class StreamingConfig:
    sink: int = 4
    window: int = 1024

    def budget_for(self, seen: int) -> int:
        return self.sink + self.window


# ------------------------------------------------------------------------------- attention


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv·n_rep, T, D] (query head h reads KV head h // n_rep)."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def window_probs(q: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax probabilities of the last ``S`` positions' queries over all ``T`` keys.

    q [B, H, S, D] are the queries of key positions ``T−S .. T−1``; keys [B, Hkv, T, D].
    Returns float32 [B, H, S, T]; query ``i`` sees keys ``0 .. T−S+i``."""
    B, H, S, D = q.shape
    T = keys.shape[2]
    k = _repeat_kv(keys.float(), H // keys.shape[1])                      # [B, H, T, D]
    logits = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling       # [B, H, S, T]
    qpos = torch.arange(T - S, T, device=q.device)[:, None]               # [S, 1]
    kpos = torch.arange(T, device=q.device)[None, :]                      # [1, T]
    logits = logits.masked_fill(kpos > qpos, float("-inf"))
    return logits.softmax(-1)


def _group_mean(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, H, T] -> [B, Hkv, T]: mean over the query heads of each KV head."""
    B, H, T = x.shape
    return x.view(B, hkv, H // hkv, T).mean(2)                            # [B, Hkv, n_rep, T]


# ------------------------------------------------------------------------------- SnapKV


def snapkv_scores(q_win: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int,
                  pool: str = "avg") -> torch.Tensor:
    """SnapKV's per-KV-head score of each *prefix* key (all but the last ``w`` keys, which are
    the observation window itself): window attention summed over the window queries,
    averaged over the group's query heads, pooled (1-D, size ``kernel``, stride 1, same length).

    q_win [B, H, w, D] (queries of the last w key positions), keys [B, Hkv, T, D]
    -> float32 [B, Hkv, T − w]."""
    w, hkv = q_win.shape[2], keys.shape[1]
    probs = window_probs(q_win, keys, scaling)                            # [B, H, w, T]
    votes = _group_mean(probs[..., :keys.shape[2] - w].sum(2), hkv)       # [B, Hkv, T−w]
    if kernel > 1 and votes.shape[-1] > 0:
        B, _, P = votes.shape
        flat = votes.reshape(B * hkv, 1, P)                               # [B·Hkv, 1, T−w]
        fn = F.avg_pool1d if pool == "avg" else F.max_pool1d
        votes = fn(flat, kernel, stride=1, padding=kernel // 2).reshape(B, hkv, P)
    return votes


def snapkv_keep(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Kept key indices per KV head, ascending: the top ``budget − window`` prefix keys by
    ``scores`` [B, Hkv, P] plus the window ``P .. P+window−1``. -> long [B, Hkv, K] with
    K = min(budget, P + window)."""
    B, Hkv, P = scores.shape
    top = min(max(budget - window, 0), P)
    idx = scores.topk(top, dim=-1).indices                                # [B, Hkv, top]
    win = torch.arange(P, P + window, device=scores.device).expand(B, Hkv, window)
    return torch.cat((idx.sort(-1).values, win), -1)                     # [B, Hkv, K]


# ------------------------------------------------------------------------------- H2O


def h2o_accumulate(q: torch.Tensor, keys: torch.Tensor, scaling: float,
                   block: int = 256) -> torch.Tensor:
    """H2O's accumulated attention of one chunk: the causal softmax probabilities of the
    chunk's ``S`` queries (the last S key positions) summed over the queries, averaged over
    each KV head's query heads. q [B, H, S, D], keys [B, Hkv, T, D] -> float32 [B, Hkv, T].
    Queries are taken ``block`` at a time so the probabilities never exceed [B, H, block, T]."""
    B, H, S, D = q.shape
    T, hkv = keys.shape[2], keys.shape[1]
    acc = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    for a in range(0, S, block):
        b = min(S, a + block)
        # the block's queries are the positions T−S+a .. T−S+b−1: keys past T−S+b−1 are masked
        probs = window_probs(q[:, :, a:b], keys[:, :, :T - S + b], scaling)   # [B, H, b−a, T']
        acc[..., :T - S + b] += probs.sum(2)
    return _group_mean(acc, hkv)


def h2o_keep(acc: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Kept key indices per KV head, ascending: the ``recent`` newest keys plus the
    ``budget − recent`` older keys with the largest accumulated score. acc [B, Hkv, T]
    -> long [B, Hkv, K], K = min(budget, T)."""
    B, Hkv, T = acc.shape
    recent = min(recent, budget, T)
    heavy = min(budget - recent, T - recent)
    idx = acc[..., :T - recent].topk(heavy, dim=-1).indices               # [B, Hkv, heavy]
    tail = torch.arange(T - recent, T, device=acc.device).expand(B, Hkv, recent)
    return torch.cat((idx.sort(-1).values, tail), -1)


# ------------------------------------------------------------------------------- StreamingLLM


def streaming_keep(T: int, sink: int, window: int, device=None) -> torch.Tensor:
    """Kept token indices (shared by every head): the first ``sink`` and the last ``window``
    of ``T`` tokens, ascending. -> long [K], K = min(T, sink + window)."""
    if T <= sink + window:
        return torch.arange(T, device=device)
    return torch.cat((torch.arange(sink, device=device),
                      torch.arange(T - window, T, device=device)))


# ------------------------------------------------------------------------------- helpers


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head token gather: x [B, Hkv, T, *rest], idx long [B, Hkv, K] -> [B, Hkv, K, *rest]
    (a new, compact tensor: the evicted tokens' storage is freed with ``x``)."""
    shape = idx.shape + x.shape[3:]
    full = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(shape)
    return x.gather(2, full)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE helper: (x1, x2) -> (−x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move rotate-half RoPE keys by ``delta`` positions: RoPE is a rotation by ``pos·θ``, so
    rotating a key cached at position p by ``(p' − p)·θ`` gives the key at p' (StreamingLLM's
    re-assigned positions; HF 4.x ``SinkCache`` shifted its keys the same way).

    keys [B, Hkv, T, D], delta [T] (integers; zero leaves a key bit for bit),
    inv_freq [D/2] -> keys' dtype [B, Hkv, T, D]."""
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]   # [T, D/2]
    emb = torch.cat((ang, ang), -1)                                                 # [T, D]
    cos, sin = emb.cos(), emb.sin()
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def rerotate_to_cache_positions(keys: torch.Tensor, pos: torch.Tensor, start: int,
                                inv_freq: torch.Tensor) -> torch.Tensor:
    """StreamingLLM's read, written plainly: every kept key, rotated by the model at its true
    position ``pos[j]``, moved to the cache position ``start + j`` (so the kept keys sit at
    contiguous positions right before the chunk, which starts at ``start + K``). This is what
    ``EvictLayer`` did on every read until 2026-11-24; it is kept as the reference that
    :func:`rotate_sinks` is tested against.

    keys [B, Hkv, K, D] (rotate-half RoPE), pos long [K] -> [B, Hkv, K, D]."""
    target = torch.arange(start, start + pos.numel(), device=pos.device)        # [K]
    return rerotate(keys, target - pos, inv_freq)


def rotate_sinks(keys: torch.Tensor, n: int, shift: int, inv_freq: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
    """StreamingLLM's read moving only the sinks: the first ``n`` keys re-rotated by ``shift``
    positions, the others untouched. Equal to :func:`rerotate_to_cache_positions` on
    StreamingLLM's kept set (Xiao et al. 2023, arXiv:2309.17453, section 3.2: positions are
    assigned inside the cache), because:

    * the kept set is the sinks ``0 .. n−1`` followed by a contiguous run of the newest tokens,
      ``seen − (K − n) .. seen − 1``, where ``seen`` tokens were seen and ``K`` are kept; the
      reference moves kept key ``j`` to cache position ``seen − K + j``;
    * for a window key (``j ≥ n``) that cache position *is* its true position
      (``seen − K + j``), so its move is a rotation by zero: the key the model produced,
      unchanged. Only the sinks move, all by the same ``shift = seen − K`` (the tokens evicted
      so far): sink ``j`` from ``j`` to ``seen − K + j``;
    * the query keeps its true position (HF rotates it at ``get_seq_length()`` = ``seen``), and
      RoPE scores depend only on the difference of the angles (``R(a)q · R(b)k = q · R(b − a)k``),
      so query/window distances are the true ones and query/sink distances are the in-cache
      ones, exactly what StreamingLLM's re-assigned positions give.

    A read thus rotates ``n`` keys (``sink``, e.g. 4) instead of all ``K``.

    keys [B, Hkv, T, D] (T ≥ n), shift ≥ 0 -> keys with ``[:, :, :n]`` replaced: a new tensor, or
    ``keys`` itself written in place with ``inplace=True``."""
    if n == 0 or shift == 0:
        return keys
    delta = torch.full((n,), shift, dtype=torch.long, device=keys.device)        # [n]
    moved = rerotate(keys[:, :, :n], delta, inv_freq)                            # [B, Hkv, n, D]
    if inplace:
        keys[:, :, :n] = moved
        return keys
    return torch.cat((moved, keys[:, :, n:]), 2)
