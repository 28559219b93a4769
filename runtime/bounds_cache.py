"""A KV cache that keeps Quest's per-block key bounds beside the keys (``decode_topk``).

Quest (Tang et al. 2024, arXiv:2406.10774, §3.2) ranks a decode step's key blocks ("pages") by
the channel-wise minimum and maximum of each block's keys, which it keeps as page metadata and
updates when a token is appended. Before this cache, ``decode_topk`` recomputed them from all
of K on every decode step — a full read of K that made a decode step slower than dense SDPA
over the same cache (docs/sparse.md). :class:`QuestCache` holds, per decoder layer
(:class:`QuestLayer`), explicit tensors::

    k_store, v_store   [B, Hkv, capacity, D]          the keys and values (the first ``length``)
    kmin, kmax         [B, Hkv, capacity / block, D]  per block of ``block`` keys: channel min/max

An append writes the new keys and values into the stores (``store[:, :, a:b].copy_(new)``, the
static-cache write the KV-site analysis recognises, so every other recipe sees an ordinary KV
cache) and then calls the custom op ``longfx::quest_bounds_append(kmin, kmax, k_store, a, b,
block)``, which recomputes only the blocks keys ``[a, b)`` touch — the last partial block and
the new ones (a decode step: one block per KV head; Triton on CUDA). The attention reads
``k_store[:, :, :b]``. In the captured graph that op names the state, and the lowering rule
``sparse.decode_topk_bounds`` (passes/block_sparse.py) hands ``kmin``/``kmax`` to the site's
``longfx::block_sparse_attention`` when its keys are exactly that read — so a decode step
reads 2·D numbers per block of 16 keys (1/8 of K) instead of K.

Why this design (a runtime cache plus a lowering rule, the way ``kv_quant`` reaches its
graph, docs/kv_compression.md) and not something simpler: the bounds are state that must live
as long as the keys, be reordered with them under beam search, cropped with them, reset with
them and survive ``torch.compile`` — a side table keyed by tensor identity, or bounds cached
inside the op, would break on the first reallocation, beam reorder or Dynamo replay. Held by
the cache layer they go wherever the keys go (``reorder_cache``, ``batch_repeat_interleave``,
``batch_select_indices``, ``crop``, ``reset`` below) and are ordinary graph inputs under
Dynamo; the update being one custom op with a mutable schema keeps it out of dead-code passes
and makes it the link the lowering needs. Invariant (tested): after any sequence of appends,
crops and reorders, ``kmin/kmax[:, :, :ceil(length / block)]`` equal the bounds recomputed
from ``k_store[:, :, :length]``.

Storage grows in steps of ``grow`` tokens (reallocated, like ``QuantizedCache``); under
``longfx.compile`` the growth runs before the traced forward (:meth:`QuestCache.reserve`), so
the traced ``update`` has one path and a decode step copies nothing but its own token. The
bounds cost 2·D values per ``block`` keys: +1/16 of the K + V bytes at 16-token blocks.

``longfx.compile(model, "decode_topk(...)")`` makes the model use this cache when no other
recipe owns the KV cache (``longfx/api.py``). With ``kv_quant``, ``gear`` or an eviction recipe
their cache is used and ``decode_topk`` recomputes the bounds from the keys it is given, as
before. The model's sliding-window layers are transformers' own windowed layers (no bounds:
``decode_topk`` leaves those sites dense), so the cache keeps no more than ``DynamicCache``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from longfx.kernels.block_sparse import op as bs_op
from longfx.kernels.block_sparse import reference as bs_ref
from longfx.runtime.cache import StateLayer, init_layers, layer_windows

__all__ = ["QuestLayer", "QuestCache", "DEFAULT_GROW"]

DEFAULT_GROW = 1024          # tokens of capacity added at a time (a multiple of the block)


class QuestLayer(StateLayer):
    """One layer's keys, values and per-block key bounds (module docstring)."""

    is_compileable = False      # capacity grows; HF's static-cache compile path is not for it
    is_croppable = True
    is_sliding = False

    def __init__(self, block: int = 16, grow: int = DEFAULT_GROW):
        super().__init__()
        bs_ref.check_block(block)
        if not isinstance(grow, int) or grow < 1:
            raise ValueError(f"grow must be an integer >= 1, got {grow!r}")
        self.block = block
        self.grow = -(-grow // block) * block                     # whole blocks
        self.k_store: torch.Tensor | None = None                  # [B, Hkv, cap, D]
        self.v_store: torch.Tensor | None = None                  # [B, Hkv, cap, Dv]
        self.kmin: torch.Tensor | None = None                     # [B, Hkv, cap / block, D]
        self.kmax: torch.Tensor | None = None
        self.length = 0                                           # tokens held (all rows)

    def __repr__(self):
        return f"QuestLayer(block={self.block}, length={self.length})"

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.k_store is None:
            return {}
        return {"k_store": self.k_store, "v_store": self.v_store, "kmin": self.kmin,
                "kmax": self.kmax}

    # ------------------------------------------------------------------ state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, Hkv, _, D = key_states.shape
        self.k_store = key_states.new_zeros(B, Hkv, 0, D)
        self.v_store = value_states.new_zeros(B, Hkv, 0, value_states.shape[-1])
        self.kmin = key_states.new_zeros(B, Hkv, 0, D)
        self.kmax = key_states.new_zeros(B, Hkv, 0, D)
        self.batch_size = B
        self.is_initialized = True

    def _reserve(self, total: int) -> None:
        """Grow the stores so that ``total`` tokens fit (steps of ``grow`` tokens)."""
        have = self.k_store.shape[2]
        if total <= have:
            return
        cap = -(-total // self.grow) * self.grow

        def more(t: torch.Tensor, n: int) -> torch.Tensor:                # extend dim 2 to n
            pad = t.new_zeros(*t.shape[:2], n - t.shape[2], *t.shape[3:])
            return torch.cat((t, pad), 2)

        self.k_store = more(self.k_store, cap)                           # [B, Hkv, cap, D]
        self.v_store = more(self.v_store, cap)
        self.kmin = more(self.kmin, cap // self.block)                   # [B, Hkv, cap/bs, D]
        self.kmax = more(self.kmax, cap // self.block)

    # ------------------------------------------------------------------ HF interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype}, the model gave {key_states.dtype}")
        past = self.length
        end = past + key_states.shape[-2]
        self._reserve(end)
        self.k_store[:, :, past:end].copy_(key_states)
        self.v_store[:, :, past:end].copy_(value_states)
        # the overload (a mutable schema in the graph: dead-code passes keep it, manager.py)
        bs_op.BOUNDS_APPEND(self.kmin, self.kmax, self.k_store, past, end, self.block)
        self.length = end
        return self.k_store[:, :, :end], self.v_store[:, :, :end]

    def reset(self) -> None:
        self.k_store = self.v_store = self.kmin = self.kmax = None
        self.length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name, t in self._tensors().items():
            setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name, t in self._tensors().items():
            setattr(self, name, t.repeat_interleave(repeats, 0))
        if self.k_store is not None:
            self.batch_size = self.k_store.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)
        if self.k_store is not None:
            self.batch_size = self.k_store.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end: ``-n`` removes n (transformers 5), ``n >= 0`` keeps the
        first n (the older convention). The last block left partial gets its bounds
        recomputed from the keys it still holds."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        keep = max(0, min(self.length, keep))
        start = keep // self.block * self.block                        # the partial block
        self.length = keep
        if keep > start:
            bs_op.update_bounds(self.k_store, self.kmin, self.kmax, start, keep, self.block)

    def nbytes(self) -> int:
        """Bytes of the layer's tensors as allocated (capacity included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())


class QuestCache(Cache):
    """``past_key_values`` whose layers keep Quest's per-block key bounds (``decode_topk``).

    ``QuestCache(block=16, config=model.config)`` pre-creates one layer per decoder layer;
    without ``config`` layers are added as ``update`` meets them. ``block`` must be the
    recipe's ``decode_topk(block=...)`` for the lowering to use the bounds.

    With a config, the model's sliding-window and chunked layers (``layer_windows``) are the
    layers transformers' own ``DynamicCache(config=...)`` builds for them, which keep only
    their window: ``decode_topk`` leaves those attention sites dense (their distances are
    bounded), so they need no bounds, and a replacement cache must not keep more than the
    cache it replaces (Gemma 3: 15 of its 18 layers are local)."""

    def __init__(self, block: int = 16, config=None, grow: int = DEFAULT_GROW):
        self.block = block
        self.grow = grow
        windows = layer_windows(config)
        if any(w is not None for w in windows):
            from transformers import DynamicCache

            own = DynamicCache(config=config).layers            # the model's own layer kinds
            Cache.__init__(self, layers=[
                layer if i < len(windows) and windows[i] is not None else self._new_layer()
                for i, layer in enumerate(own)])
        else:
            init_layers(self, config)

    def _new_layer(self) -> QuestLayer:
        return QuestLayer(self.block, self.grow)

    def __repr__(self):
        return (f"QuestCache(block={self.block}, layers={len(self.layers)}, "
                f"length={self.get_seq_length()})")

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens in every initialized layer. ``compiled_copy``
        calls it before each forward, outside the traced code (see QuantizedCache.reserve)."""
        for layer in self.layers:
            if isinstance(layer, QuestLayer) and layer.is_initialized:
                layer._reserve(layer.length + int(tokens))

    def nbytes(self) -> int:
        """Bytes of every layer's tensors as allocated (a windowed layer: its keys and values)."""
        return sum(layer.nbytes() if isinstance(layer, QuestLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                       if isinstance(t, torch.Tensor))
                   for layer in self.layers)
