"""Reference ThinK: query-driven pruning of key-cache channels, in plain torch (any device).

ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018):
the attention logit of a query q and a key k is ``sum_c q[c] · k[c]``; channel ``c``'s share of
the window's logits, ``Q[:, c] K[:, c]^T``, has Frobenius norm ``||Q[:, c]|| · ||K[:, c]||``
(the outer product of two vectors), so each KV head keeps the channels where that product is
largest and drops the rest of its *key* channels (values are untouched). Upstream code
(SalesforceAIResearch/ThinK, ``key_pruner_query_driven``) ranks by ``mean(q²) · mean(k²)`` per
channel over the last 32 queries — the same order as the product of norms.

Here, per KV head:

* queries: the last ``window`` queries of the chunk, of every query head of the KV head's group
  (GQA) stacked, so ``||Q[:, c]||² = sum over group heads and window rows of q[c]²``;
* keys: the keys being pruned;
* kept: the top ``ceil((1 − ratio) · D)`` channels, indices sorted ascending.

Layouts: pruned keys ``[B, Hkv, L, Dk]`` with, per token, the channel indices of the segment
that pruned it; :func:`unprune` puts them back as a ``[B, Hkv, L, D]`` key with zeros in the
pruned channels, so ``q · unprune(k) = q[kept] · k[kept]`` exactly (the dropped terms are zero).
Shape letters: B, H (query heads), Hkv, w (window), L (keys), D, Dk (kept channels), G (segments).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ThinKConfig", "channel_scores", "keep_channels", "prune", "unprune"]


@dataclass(frozen=True)
class ThinKConfig:
    ratio: float = 0.5      # fraction of key channels pruned (0 keeps all)
    window: int = 32        # queries that score the channels; keys left whole until the next chunk

    def kept_channels(self, head_dim: int) -> int:
        """Channels kept per KV head: ceil((1 − ratio) · D), at least 1."""
        return max(1, min(head_dim, int(math.ceil((1.0 - self.ratio) * head_dim - 1e-9))))


def channel_scores(q_win: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """ThinK's channel score per KV head: ``||Q[:, c]|| · ||K[:, c]||``.

    q_win [B, H, w, D] (the window's rotated queries), keys [B, Hkv, L, D] (rotated keys)
    -> float32 [B, Hkv, D]. The queries of the H / Hkv heads sharing a KV head are pooled
    (their rows stacked)."""
    B, H, w, D = q_win.shape
    hkv = keys.shape[1]
    q2 = q_win.float().pow(2).sum(2)                                      # [B, H, D]
    q2 = q2.view(B, hkv, H // hkv, D).sum(2)                              # [B, Hkv, D]
    k2 = keys.float().pow(2).sum(2)                                       # [B, Hkv, D]
    return (q2 * k2).sqrt()


def keep_channels(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest-scoring channels per KV head, ascending.
    scores [B, Hkv, D] -> long [B, Hkv, Dk]."""
    return scores.topk(n_keep, dim=-1).indices.sort(-1).values


def prune(keys: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The kept channels of every key: keys [B, Hkv, L, D], channels long [B, Hkv, Dk]
    -> [B, Hkv, L, Dk] (a new, compact tensor)."""
    B, Hkv, L, _ = keys.shape
    idx = channels[:, :, None, :].expand(B, Hkv, L, channels.shape[-1])   # [B, Hkv, L, Dk]
    return keys.gather(-1, idx)


def unprune(pruned: torch.Tensor, channels: torch.Tensor, segment: torch.Tensor,
            head_dim: int) -> torch.Tensor:
    """Full-width keys with zeros in the pruned channels.

    pruned [B, Hkv, L, Dk]; channels long [B, Hkv, G, Dk] (the kept set of each segment);
    segment long [L] (the segment that pruned each key) -> [B, Hkv, L, D] in pruned's dtype."""
    B, Hkv, L, Dk = pruned.shape
    idx = channels[:, :, segment]                                         # [B, Hkv, L, Dk]
    out = pruned.new_zeros(B, Hkv, L, head_dim)
    return out.scatter_(-1, idx, pruned)
