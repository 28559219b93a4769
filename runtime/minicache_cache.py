"""A longfx KV cache that merges adjacent layers: MiniCache, one direction per token per pair.

:class:`MiniCache` is a transformers ``Cache``. From ``start_layer`` on, layers ``(l, l+1)``
(``l = start_layer, start_layer + 2, ...``) form a pair sharing one :class:`MergedPair`; the
layers before ``start_layer`` (and a last layer left without a partner) are plain HF
``DynamicLayer`` s. The pair stores, for keys and for values, a
:class:`~longfx.kernels.kv_minicache.reference.MergedKV`: one merged unit direction per token and
head, both layers' norms, the retention mask and layer l+1's exact vectors of the retained
tokens — about one direction set + two norm vectors for two layers. Math:
``kernels/kv_minicache/reference.py`` (MiniCache, Liu et al. 2024, arXiv:2405.14366).

When the layers of a pair ``update`` with a chunk (prefill chunk or decode token):

1. layer l: attention gets layer l's stored tokens restored (``merged direction × its norm``,
   retained tokens exact) followed by its chunk, exact; the chunk waits in the pair
   (``pending``) — layer l+1 has not computed its own yet;
2. layer l+1: the pair merges layer l's waiting chunk with layer l+1's chunk (SLERP at ``t``,
   retention above ``threshold``) and appends the result; attention of layer l+1 gets its own
   stored tokens restored followed by its chunk, exact.

So every layer attends to its own chunk exactly (as ``EvictCache`` does), and what is stored
after each forward is merged. Positions and masks are a full cache's (no token is dropped).
``nbytes()`` / ``dense_nbytes()`` read the bytes off the tensors; ``merged_fraction()`` says
how many (token, head) pairs were merged rather than retained.

Limits: the pairs need the number of layers (``MiniCache(..., config=model.config)``); the
retention mask makes the size of ``extra`` data-dependent, so under ``longfx.compile`` the
cache update is a Dynamo graph break (it runs eagerly; results are the same); ``crop``
(assisted decoding) is not supported; left padding is not tracked (pad tokens are merged like
others and masked by attention as usual).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from longfx.kernels.kv_minicache import reference as R
from longfx.runtime.cache import StateLayer

__all__ = ["MiniCacheConfig", "MergedPair", "MergedLayer", "MiniCache"]


@dataclass(frozen=True)
class MiniCacheConfig:
    start_layer: int | None = None     # None: half the layers
    t: float = 0.5                     # SLERP weight of layer l+1's direction
    threshold: float = 0.25            # normalized angle (Ω / π) above which a pair is retained

    def start_for(self, n_layers: int) -> int:
        return n_layers // 2 if self.start_layer is None else self.start_layer


class MergedPair:
    """The shared state of layers (l, l+1): merged keys and values, and layer l's chunk while
    layer l+1 has not stored its own."""

    def __init__(self, config: MiniCacheConfig):
        self.config = config
        self.k: R.MergedKV | None = None
        self.v: R.MergedKV | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        self.k = R.MergedKV.empty(B, Hkv, D, key_states.dtype, key_states.device)
        self.v = R.MergedKV.empty(B, Hkv, value_states.shape[-1], value_states.dtype,
                                  value_states.device)

    def read(self, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        return R.restore(self.k, which), R.restore(self.v, which)

    def store(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Merge layer l's waiting chunk with layer l+1's chunk (k1, v1) and append it."""
        if self.pending is None:
            raise RuntimeError("MiniCache: the second layer of a pair stored a chunk before the "
                               "first did (layers must run in order within a forward)")
        k0, v0 = self.pending
        self.pending = None
        if k0.shape != k1.shape or v0.shape != v1.shape:
            raise RuntimeError(f"MiniCache: a pair's chunks differ in shape ({tuple(k0.shape)} vs "
                               f"{tuple(k1.shape)}): merged layers need the same KV heads and "
                               "head dim")
        c = self.config
        self.k = R.concat(self.k, R.merge(k0, k1, c.t, c.threshold))
        self.v = R.concat(self.v, R.merge(v0, v1, c.t, c.threshold))

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in (self.k, self.v) if m is not None)


class MergedLayer(StateLayer):
    """Layer l (``which=0``) or l+1 (``which=1``) of a merged pair, behind HF's layer interface."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, pair: MergedPair, which: int):
        super().__init__()
        self.pair, self.which = pair, which
        self.length = 0

    def __repr__(self):
        return f"MergedLayer(which={self.which}, length={self.length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.pair.k is None:
            self.pair.init(key_states, value_states)
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_past, v_past = self.pair.read(self.which)                       # [B, Hkv, T, D]
        if self.which == 0:
            self.pair.pending = (key_states, value_states)
        else:
            self.pair.store(key_states, value_states)
        self.length += key_states.shape[-2]
        return torch.cat((k_past, key_states), 2), torch.cat((v_past, value_states), 2)

    def reset(self) -> None:
        self.pair.k = self.pair.v = self.pair.pending = None
        self.length = 0
        self.is_initialized = False

    def _apply(self, fn) -> None:
        """Per-row op on the pair's state (done once, by the pair's second layer). ``extra`` is
        token-major over rows, so it is rebuilt from the restored layer l+1."""
        if self.which == 0 or self.pair.k is None:
            return
        for name in ("k", "v"):
            m: R.MergedKV = getattr(self.pair, name)
            x1 = fn(R.restore(m, 1))                                      # [B', Hkv, T, D]
            d, keep = fn(m.dir), fn(m.keep)
            norm = torch.stack((fn(m.norm[0]), fn(m.norm[1])))
            extra = x1.permute(2, 0, 1, 3)[keep.permute(2, 0, 1)]         # [N', D]
            setattr(self.pair, name, R.MergedKV(d, norm, keep, extra))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, 0))
        self.batch_size *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])
        self.batch_size = len(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a MiniCache KV cache cannot be cropped: assisted decoding is "
                                  "not supported")

    def nbytes(self) -> int:
        """The pair's bytes, counted by its second layer (the first counts 0)."""
        return self.pair.nbytes() if self.which == 1 else 0


def _dense_layer_nbytes(layer: DynamicLayer) -> int:
    if not layer.is_initialized:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


class MiniCache(Cache):
    """``past_key_values`` merging adjacent layer pairs from ``start_layer`` on (``minicache(...)``).

    ``MiniCache(MiniCacheConfig(), config=model.config)``: the config gives the number of layers
    (and so the pairs); ``start_layer`` past the last pair leaves every layer plain."""

    def __init__(self, policy: MiniCacheConfig = MiniCacheConfig(), config=None):
        n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None) \
            if config is not None else None
        if not n:
            raise ValueError("MiniCache needs the model's config (num_hidden_layers) to pair "
                             "its layers: MiniCache(policy, config=model.config)")
        self.policy = policy
        self.start = policy.start_for(n)
        layers: list[CacheLayerMixin] = []
        i = 0
        while i < n:
            if i >= self.start and i + 1 < n:
                pair = MergedPair(policy)
                layers += [MergedLayer(pair, 0), MergedLayer(pair, 1)]
                i += 2
            else:
                layers.append(DynamicLayer())
                i += 1
        super().__init__(layers=layers)

    def __repr__(self):
        return (f"MiniCache({self.policy}, layers={len(self.layers)}, pairs={len(self.pairs())}, "
                f"length={self.get_seq_length()})")

    def pairs(self) -> list[MergedPair]:
        return [layer.pair for layer in self.layers
                if isinstance(layer, MergedLayer) and layer.which == 1]

    def nbytes(self) -> int:
        """Bytes held: plain layers' K + V, each pair's merged state."""
        return sum(layer.nbytes() if isinstance(layer, MergedLayer) else _dense_layer_nbytes(layer)
                   for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a plain K + V cache of the same tokens would hold (every layer)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, MergedLayer):
                if layer.is_initialized and layer.pair.k is not None:
                    m = layer.pair.k
                    B, H, _, D = m.dir.shape
                    Dv = layer.pair.v.dir.shape[-1]
                    total += B * H * layer.length * (D + Dv) * m.dir.element_size()
            else:
                total += _dense_layer_nbytes(layer)
        return total

    def merged_fraction(self) -> float:
        """Fraction of the pairs' (token, head) entries, keys and values, merged (not retained)."""
        n = kept = 0
        for pair in self.pairs():
            for m in (pair.k, pair.v):
                if m is not None:
                    n += m.keep.numel()
                    kept += int(m.keep.sum())
        return 1.0 - kept / n if n else 0.0
