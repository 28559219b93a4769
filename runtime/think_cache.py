"""A longfx KV cache that prunes key channels: ThinK, with the pruned keys stored compactly.

:class:`ThinKCache` is a transformers ``Cache`` (an :class:`~longfx.runtime.evict_cache.EvictCache`
subclass, so it shares the query pre-hook, :func:`~longfx.runtime.evict_cache.install_query_hooks`)
whose layers (:class:`ThinKLayer`) hold

* ``k_pruned`` [B, Hkv, L, Dk]: the keys of the first L tokens, only their kept channels
  (Dk = ceil((1 − ratio) · D));
* ``channels`` long [B, Hkv, G, Dk]: the kept channel indices of each of the G *segments* (one
  per compression), and ``segment`` long [L]: the segment of each pruned key;
* ``keys`` [B, Hkv, R, D]: the most recent keys, whole (the last ``window`` keys of the last
  prefill chunk, then the decode tokens);
* ``values`` [B, Hkv, T, D]: every value, whole (ThinK prunes keys only).

Scoring and layouts: ``kernels/kv_think/reference.py`` (ThinK, Xu et al. 2024, arXiv:2407.21018).

When ``update`` runs (one prefill chunk of ``s`` tokens, or one decode token):

1. attention of this step gets the stored keys with their pruned channels as zeros (a transient
   ``[B, Hkv, L, D]``: ``q · k`` over it equals ``q[kept] · k[kept]``), then the whole recent
   keys, then the chunk's keys — the chunk itself is attended in full;
2. after a prefill chunk (``s > 1``), the keys waiting whole (the previous recent keys and the
   chunk) except the last ``window`` are pruned **once**, with the channel set chosen by this
   chunk's last ``window`` queries (``||Q[:, c]|| · ||K[:, c]||`` over the keys being pruned),
   and appended to ``k_pruned`` as a new segment. A key is never re-pruned: each chunk (with
   the window / decode tokens left from before it) gets its own channel set. Decode tokens are
   appended whole, as in ThinK (its decode keeps new keys unpruned).

Positions and masks are those of a full cache (``get_seq_length`` = tokens seen, mask offset
0): no token is dropped. Stored key bytes fall by about ``ratio`` (plus the small ``channels`` /
``segment`` index tensors); ``nbytes()`` and ``dense_nbytes()`` read them off the tensors.

Limits: as :mod:`longfx.runtime.evict_cache` (queries recomputed by the pre-hook: HF decoder
layout with ``q_proj``, ``position_embeddings``, full rotary; ``crop`` unsupported).
"""
from __future__ import annotations

import torch

from longfx.kernels.kv_think import reference as R
from longfx.runtime.evict_cache import EvictCache, EvictLayer

__all__ = ["ThinKLayer", "ThinKCache"]


class ThinKLayer(EvictLayer):
    """One layer's ThinK state: pruned keys + channel sets, recent whole keys, all values."""

    def __init__(self, policy: R.ThinKConfig):
        super().__init__(policy)
        self.k_pruned: torch.Tensor | None = None    # [B, Hkv, L, Dk]
        self.channels: torch.Tensor | None = None    # long [B, Hkv, G, Dk]
        self.segment: torch.Tensor | None = None     # long [L]

    def __repr__(self):
        return f"ThinKLayer({self.policy}, pruned={self.pruned}, seen={self.seen})"

    @property
    def kept(self) -> int:
        """Tokens held: all of them (ThinK drops channels, not tokens)."""
        return self.seen

    @property
    def pruned(self) -> int:
        """Tokens whose keys are stored pruned."""
        return 0 if self.k_pruned is None else self.k_pruned.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, Hkv, _, D = key_states.shape
        dk = self.policy.kept_channels(D)
        self.k_pruned = key_states.new_empty(B, Hkv, 0, dk)
        self.channels = torch.empty(B, Hkv, 0, dk, dtype=torch.long, device=self.device)
        self.segment = torch.empty(0, dtype=torch.long, device=self.device)

    def full_keys(self) -> torch.Tensor:
        """Every stored key at full width, pruned channels as zeros: [B, Hkv, seen, D]."""
        D = self.keys.shape[-1]
        past = R.unprune(self.k_pruned, self.channels, self.segment, D)   # [B, Hkv, L, D]
        return torch.cat((past, self.keys), 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        p, s = self.policy, key_states.shape[-2]
        self.seen += s
        keys = torch.cat((self.full_keys(), key_states), 2)              # [B, Hkv, T, D]
        values = torch.cat((self.values, value_states), 2)
        self.values = values
        waiting = torch.cat((self.keys, key_states), 2)                  # [B, Hkv, R + s, D]
        n = waiting.shape[2] - p.window                                  # keys to prune now
        if s > 1 and n > 0:
            q, _ = self._queries(min(p.window, s))                       # [B, H, w, D]
            old = waiting[:, :, :n]
            chosen = R.keep_channels(R.channel_scores(q, old),
                                     self.k_pruned.shape[-1])            # [B, Hkv, Dk]
            G = self.channels.shape[2]
            self.k_pruned = torch.cat((self.k_pruned, R.prune(old, chosen)), 2)
            self.channels = torch.cat((self.channels, chosen[:, :, None]), 2)
            self.segment = torch.cat((self.segment, self.segment.new_full((n,), G)))
            self.keys = waiting[:, :, n:].clone()                        # own storage: [B, Hkv, w, D]
        else:
            self.keys = waiting
        self.pending = None
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.k_pruned = self.channels = self.segment = None

    def _per_row(self):
        return [n for n in ("keys", "values", "k_pruned", "channels") if getattr(self, n) is not None]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ThinK KV cache cannot be cropped (pruned key channels are "
                                  "gone): assisted decoding is not supported")

    def key_nbytes(self) -> int:
        """Bytes of the stored keys: pruned keys, their channel indices and segments, recent keys."""
        return sum(t.numel() * t.element_size()
                   for t in (self.k_pruned, self.channels, self.segment, self.keys) if t is not None)

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (keys in both forms, index tensors, values)."""
        v = 0 if self.values is None else self.values.numel() * self.values.element_size()
        return self.key_nbytes() + v


class ThinKCache(EvictCache):
    """``past_key_values`` that prunes key channels with ThinK (``think(...)``).

    ``ThinKCache(ThinKConfig(ratio=0.5), model=model)`` sizes the layer list from
    ``model.config`` and installs the query hooks (shared with ``EvictCache``)."""

    def __init__(self, policy: R.ThinKConfig, config=None, model: torch.nn.Module | None = None):
        super().__init__(policy, config=config, model=model)

    def _new_layer(self) -> ThinKLayer:
        return ThinKLayer(self.policy)

    def __repr__(self):
        return f"ThinKCache({self.policy}, layers={len(self.layers)}, seen={self.get_seq_length()})"

    def key_nbytes(self) -> int:
        return sum(layer.key_nbytes() for layer in self.layers)

    def dense_key_nbytes(self) -> int:
        """Bytes a plain key cache of every seen token would hold."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                B, H, _, D = layer.keys.shape
                total += B * H * layer.seen * D * layer.keys.element_size()
        return total

    # nbytes() (sum over layers) and dense_nbytes() (K + V of every seen token) come from EvictCache
