"""A longfx KV cache HF models take as ``past_key_values``: the quantized KIVI state per layer.

:class:`QuantizedCache` is a transformers ``Cache`` whose layers (:class:`QuantizedKVLayer`)
hold the packed state of ``kernels/kv_quant`` (keys per channel, values per token, 8/4/2-bit
codes packed into bytes, compact scales, a full-precision ring of the most recent tokens;
layout in ``kernels/kv_quant/reference.py``, after KIVI, Liu et al. 2024, and its HF port
``transformers.cache_utils.QuantizedLayer``). Appends go through the custom op
``longfx::kv_quant_append`` (quantize-on-append: whole groups leaving the ring are packed; the
Triton kernel on CUDA, the reference elsewhere), so the cache really holds packed bytes:
:meth:`QuantizedCache.nbytes` and ``longfx.eval.infer.kv_bytes`` read them off its tensors.

What ``update`` returns to the model's attention (a transient full-precision copy):

* one new token (decode): the state *after* the append, dequantized — exactly what
  ``longfx::kv_quant_attention`` computes over the packed state;
* a chunk of ``s > 1`` tokens (prefill): the state as it was *before* the chunk, dequantized,
  followed by the chunk's own keys/values in full precision — prefill attention is computed
  in full precision and only the stored past is quantized (KIVI's prefill; HF
  ``QuantizedLayer`` does the same).

Storage grows in blocks of ``block`` tokens (the packed tensors are reallocated, the ring is
fixed), so the bytes held stay within one block of the tokens held. Under ``longfx.compile``
the growth is done before the traced forward (:meth:`QuantizedCache.reserve`). The sequence length is a
Python int on each layer (as ``cumulative_length`` in HF's quantized layers), so under
``torch.compile`` Dynamo guards on it and treats it as a dynamic size after the first change.

Attention sinks (``sink=n``): the first ``n`` tokens of the sequence carry a large share of the
attention mass (Xiao et al. 2023), so an error in their keys shifts every query's softmax. With
``sink > 0`` the layer keeps an exact copy of them (``sink_k``, ``sink_v``, model dtype, counted in
``nbytes``) and every read returns them exact; the packed state is unchanged (they are also
quantized there, as before; the copy costs ``n`` tokens of full-precision K + V per layer).

:class:`GearCache` / :class:`GearKVLayer` hold GEAR's correction (stored outliers and low-rank
factors of the quantization error, ``kernels/kv_quant/gear.py``) beside the same packed state.

Rotation (``KVQuantConfig(rotate=True)``; QuaRot, Ashkboos et al. 2024): the layer stores
``k·Q``, ``v·Q`` (``Q`` the fixed orthogonal Hadamard-with-signs matrix of
``reference.rotation``, built once per layer from the head dim, stored nowhere) and multiplies
what it reads by ``Qᵀ``, so attention sees keys and values in the model's own basis. The
rotation is the custom op ``longfx::kv_rotate`` (``reference.rotate_as``) around the unchanged
append (the Triton quantize-on-append on CUDA included) and read; it is computed in fp32, so
with a bf16 model the ring tokens pick up two bf16 roundings. The sink copy is stored
unrotated. Because the un-rotation of a decode read is one op node, the decode lowering
(``passes/kv_quant_decode.py``) rotates the query and the sink copy instead, attends over the
stored state and un-rotates the output (the read itself, unfused, is unchanged).
Clipping (``clip=True``): the per-group range search of ``reference.search_params``, through
the append op's ``clip`` argument (on CUDA the Triton append of ``kernels/kv_quant/triton_clip.py``,
elsewhere the reference).

Sliding-window layers (``window=W``; :class:`QuantizedCache` gives every layer the model's
config marks ``sliding_attention`` or ``chunked_attention`` the window transformers' own
``DynamicSlidingWindowLayer`` gets): no later query of such a layer sees a key more than W − 1
positions back, so after each call the layer drops the packed groups that lie wholly before
that point (:meth:`QuantizedKVLayer._trim`). Whole groups only: their codes and (scale, zero)
are moved, never re-quantized, so the tokens kept read back exactly as before (no drift). The
layer then holds at most W − 1 + group − 1 + ring tokens (Gemma-3: 512-token windows), where
before this it kept every token of the sequence in its sliding layers — more than the model's
own bf16 cache at long contexts. ``get_mask_sizes`` reports the held range (length, offset) so
the model's sliding mask lines up with the keys returned; ``get_seq_length`` counts every token
seen. The sink copy is dropped with the first group (those positions left the window).

Beam search works (``reorder_cache`` permutes the state); ``crop`` (assisted decoding) does not:
packed groups cannot be un-quantized.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longfx.kernels.kv_quant import gear as gear_ref
from longfx.kernels.kv_quant import op as kv_op
from longfx.kernels.kv_quant.gear import GearConfig
from longfx.kernels.kv_quant import reference as kv_ref
from longfx.kernels.kv_quant.reference import KVQuantConfig, QuantizedKV, n_packed

__all__ = ["QuantizedKVLayer", "QuantizedCache", "GearKVLayer", "GearCache", "DEFAULT_BLOCK",
           "init_layers", "layer_windows"]

DEFAULT_BLOCK = 256


def layer_windows(config, chunked: bool = True) -> list[int | None]:
    """Per decoder layer of an HF ``config``: the window its own dynamic cache keeps
    (``sliding_window`` for sliding layers, ``attention_chunk_size`` for chunked ones), or None
    (a full layer); [] without a config. Read from the config fields transformers' own
    ``DynamicCache(config=...)`` reads (``layer_types``, else every layer sliding when
    ``sliding_window`` is set, chunked when ``attention_chunk_size`` is); written out here
    because the helper transformers uses for it changed its return between 5.17 and 5.23.
    ``chunked=False``: chunked layers count as full (None), only sliding layers have a window."""
    if config is None:
        return []
    text = config.get_text_config(decoder=True)
    n = getattr(text, "num_hidden_layers", None) or 0
    window = getattr(text, "sliding_window", None)
    chunk = getattr(text, "attention_chunk_size", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        kind = ("sliding_attention" if window is not None else
                "chunked_attention" if chunk is not None else "full_attention")
        types = [kind] * n
    return [window if t == "sliding_attention" else
            chunk if t == "chunked_attention" and chunked else None for t in types]


class StateLayer(CacheLayerMixin):
    """What longfx's cache layers share: the state stays on its device (``offload`` and
    ``prefetch`` do nothing), and by default the layer holds ``self.length`` tokens from
    position 0 with no maximum; a windowed or evicting layer overrides the sizes."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def offload(self):          # the state stays where it is (no CPU offloading)
        pass

    def prefetch(self):
        pass


class QuantizedKVLayer(StateLayer):
    """One layer's quantized KV state (``QuantizedKV``) behind HF's cache-layer interface."""

    is_compileable = False      # capacity grows; HF's static-cache compile path is not for it
    is_croppable = False

    def __init__(self, config: KVQuantConfig = KVQuantConfig(), block: int = DEFAULT_BLOCK,
                 sink: int = 0, window: int | None = None):
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sink must be an integer >= 0, got {sink!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or window < 1):
            raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
        self.window = window                                       # sliding layer: keys kept
        self.offset = 0                                            # tokens dropped (windowed)
        self.config = config
        self.block = -(-block // config.group) * config.group     # whole groups
        self.sink = sink
        self.state: QuantizedKV | None = None
        self.sink_k: torch.Tensor | None = None                    # [B, Hkv, sink, D] exact
        self.sink_v: torch.Tensor | None = None
        self.rot: torch.Tensor | None = None                       # [D, D] fp32 (rotate=True)
        self.length = 0                                            # tokens held (all rows)

    # the names transformers reads off a cache layer (masking_utils, Cache.is_sliding)
    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def sliding_window(self) -> int | None:
        return self.window

    def __repr__(self):
        extra = f", sink={self.sink}" if self.sink else ""
        extra += f", window={self.window}, offset={self.offset}" if self.window else ""
        return f"{type(self).__name__}({self.config}{extra}, length={self.length})"

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds (the state's, the sink copy's), by name."""
        if self.state is None:
            return {}
        out = dict(zip(QuantizedKV.NAMES, self.state.tensors()))
        if self.sink_k is not None:
            out.update(sink_k=self.sink_k, sink_v=self.sink_v)
        return out

    def _set(self, name: str, t: torch.Tensor) -> None:
        if name.startswith("sink_"):
            setattr(self, name, t)
        else:
            setattr(self.state, name, t)

    # ------------------------------------------------------------------ state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, Hkv, _, D = key_states.shape
        self.config.check_head_dim(D)
        self.state = QuantizedKV.empty(B, Hkv, D, 0, self.config, self.dtype, self.device)
        if self.sink:
            self.sink_k = key_states.new_zeros(B, Hkv, self.sink, D)
            self.sink_v = value_states.new_zeros(B, Hkv, self.sink, D)
        if self.config.rotate:
            self.rot = kv_ref.rotation(D, self.device)                  # [D, D] fp32
        self.batch_size = B
        self.is_initialized = True

    def _reserve(self, total: int) -> None:
        """Grow the packed storage so that ``total`` tokens fit (whole blocks)."""
        st, c = self.state, self.config
        need = n_packed(total, c)
        have = st.k_codes.shape[2]
        if need <= have:
            return
        grow = -(-(need - have) // self.block) * self.block                  # tokens to add
        B, H, _, D = st.k_ring.shape

        def more(t: torch.Tensor, n: int) -> torch.Tensor:               # extend dim 2 by n
            pad = torch.zeros(*t.shape[:2], n, *t.shape[3:], dtype=t.dtype, device=t.device)
            return torch.cat((t, pad), 2)

        st.k_codes = more(st.k_codes, grow)                              # [B, Hkv, Sp, D·bits/8]
        st.k_params = more(st.k_params, grow // c.group)                 # [B, Hkv, Sp/g, 2, D]
        st.v_codes = more(st.v_codes, grow)
        st.v_params = more(st.v_params, grow)                            # [B, Hkv, Sp, 2, Jv]

    def _per_group(self) -> set[str]:
        """Names of the held tensors with one entry per packed group on dim 2 (the others with
        packed storage have one per packed token; the ring is per slot)."""
        return {"k_params"}

    def _trim(self) -> None:
        """Windowed layers: drop the whole packed groups that no later query sees (all their
        positions < seen − window + 1). Codes and params move to the front of fresh storage
        (rounded up to whole blocks, so the bytes held follow the window, not the sequence),
        the ring is re-indexed (slot = state index % ring), nothing is re-quantized."""
        if self.window is None or self.state is None:
            return
        st, c = self.state, self.config
        packed = n_packed(self.length, c)
        dead = self.length - (self.window - 1)                         # held, never seen again
        n = min(max(dead, 0), packed) // c.group                       # whole packed groups
        if n <= 0:
            return
        drop, keep = n * c.group, packed - n * c.group                  # tokens
        cap = -(-keep // self.block) * self.block                       # new packed capacity
        per_group = self._per_group()
        for name, t in self._tensors().items():
            if name in ("length", "sink_k", "sink_v"):
                continue
            if name in ("k_ring", "v_ring"):                            # slot i ← slot i + drop
                self._set(name, torch.roll(t, -(drop % t.shape[2]), 2))
                continue
            unit = c.group if name in per_group else 1                  # tokens per dim-2 entry
            fresh = t.new_zeros(*t.shape[:2], cap // unit, *t.shape[3:])
            fresh[:, :, :keep // unit] = t[:, :, drop // unit:(drop + keep) // unit]
            self._set(name, fresh)
        st.length.sub_(drop)
        self.length -= drop
        self.offset += drop
        self.sink_k = self.sink_v = None                                # positions 0.. are gone

    def _keep_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Copy the part of the chunk at positions < sink (the chunk starts at self.length)."""
        if self.sink_k is None:
            return
        n = min(self.sink - self.length, key_states.shape[2])
        if n > 0:
            self.sink_k[:, :, self.length:self.length + n] = key_states[:, :, :n]
            self.sink_v[:, :, self.length:self.length + n] = value_states[:, :, :n]

    def _with_sinks(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, L, D] with the first min(sink, L) positions replaced by the exact copy."""
        return kv_ref.with_sinks(k, v, self.sink_k, self.sink_v)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        st, c = self.state, self.config
        if self.rot is not None:                                         # store k·Q, v·Q
            key_states = kv_op.ROTATE(key_states, self.rot, False)
            value_states = kv_op.ROTATE(value_states, self.rot, False)
        # the overload, not the packet: a graph records what is called, and the overload's
        # mutable schema is what keeps dead-code passes from dropping the write (manager.py)
        kv_op.APPEND(*st.tensors(), key_states.contiguous(), value_states.contiguous(), c.bits,
                     c.group, c.clip)

    def _read_state(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        st, c = self.state, self.config
        # one custom op (kernels/kv_quant/op.py says why the unpacking is kept from Inductor)
        k, v = kv_op.READ(st.k_codes, st.k_params, st.v_codes, st.v_params, st.k_ring,
                          st.v_ring, length, c.bits, c.group, c.residual, c.scales)
        if self.rot is not None:                                         # back to the model's basis
            k, v = kv_op.ROTATE(k, self.rot, True), kv_op.ROTATE(v, self.rot, True)
        return k, v

    def _read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens of the state, [B, Hkv, length, D] in the model's dtype:
        packed groups dequantized, the rest from the ring, the sink tokens exact."""
        return self._with_sinks(*self._read_state(length))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token, [B, Hkv, length, D] in the model's dtype (what a decode step reads)."""
        return self._read(self.length)

    def replace(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Hold exactly ``key_states``, ``value_states`` [B, Hkv, K, D] instead of the current
        state, stored as one prefill chunk of K tokens would be (the first ``sink`` copied
        exactly, whole groups before the last ``residual`` packed, the rest in the ring). An
        evicting cache calls it with the tokens it keeps (``runtime/evict_cache.py``)."""
        self.reset()
        self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(n)
        if self.sink:
            self._keep_sinks(key_states, value_states)
        self._append(key_states, value_states)
        self.length = n

    # ------------------------------------------------------------------ HF interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype}, the model gave {key_states.dtype}")
        past, s = self.length, key_states.shape[-2]
        self._reserve(past + s)
        if self.sink:
            self._keep_sinks(key_states, value_states)
        if s == 1:                                   # decode: read the state after the append
            self._append(key_states, value_states)
            self.length = past + s
            out = self._read(past + s)
        else:
            k_past, v_past = self._read(past)        # prefill: stored past + the chunk in fp
            self._append(key_states, value_states)
            self.length = past + s
            out = torch.cat((k_past, key_states), 2), torch.cat((v_past, value_states), 2)
        if self.window is not None and not torch.compiler.is_compiling():
            self._trim()                             # compiled: QuantizedCache.reserve trims
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the next call's attention gets, position of the first): the held tokens."""
        return self.length + query_length, self.offset

    def get_seq_length(self) -> int:
        return self.offset + self.length

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.state = None
        self.sink_k = self.sink_v = None
        self.rot = None
        self.length = 0
        self.offset = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name, t in self._tensors().items():
            if name != "length":                                         # all but length
                self._set(name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is None:
            return
        for name, t in self._tensors().items():
            if name != "length":
                self._set(name, t.repeat_interleave(repeats, 0))
        self.batch_size = self.state.k_ring.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)
        if self.state is not None:
            self.batch_size = self.state.k_ring.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (packed groups "
                                  "cannot be un-quantized): assisted decoding is not supported")

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (codes, scales, ring, length, sink copy, any correction
        state) as allocated."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())


def init_layers(cache: Cache, config) -> None:
    """``Cache.__init__`` for a longfx cache whose layers come from ``cache._new_layer()``: one
    per decoder layer of ``config``, or added as ``update`` meets them when there is none."""
    n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None) \
        if config is not None else None
    if n:
        Cache.__init__(cache, layers=[cache._new_layer() for _ in range(n)])
    else:
        Cache.__init__(cache, layer_class_to_replicate=cache._new_layer)


class QuantizedCache(Cache):
    """``past_key_values`` holding a KIVI-quantized state per layer (``kv_quant(...)``).

    ``QuantizedCache(KVQuantConfig(bits=4), config=model.config)`` pre-creates one layer per
    decoder layer; without ``config`` layers are added as ``update`` meets them. ``layer_kv``
    ({layer index: config}) gives some layers their own config — layer-wise mixed precision
    (KVTuner, Li et al. 2025), e.g. wider keys (``key_bits``) in the most sensitive layers, as
    ``kv_quant(..., key_bits=4, key_layers=(...))`` builds it. The model's sliding-window layers
    (``layer_windows(config)``) keep only their window (module docstring)."""

    def __init__(self, kv: KVQuantConfig = KVQuantConfig(), config=None,
                 block: int = DEFAULT_BLOCK, sink: int = 0,
                 layer_kv: dict[int, KVQuantConfig] | None = None):
        self.kv = kv
        self.block = block
        self.sink = sink
        self.layer_kv = dict(layer_kv or {})
        self.windows = layer_windows(config)    # per layer: its window, or None (full)
        self._made = 0                          # layers made so far: the next one's index
        n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None) \
            if config is not None else None
        bad = sorted(i for i in self.layer_kv if not isinstance(i, int) or i < 0
                     or (n is not None and i >= n))
        if bad:
            raise ValueError(f"layer_kv names layer(s) {bad}, the model has "
                             f"{n if n is not None else 'an unknown number of'} layers "
                             f"(0 .. {n - 1 if n else '?'})")
        init_layers(self, config)

    def _new_layer(self) -> QuantizedKVLayer:
        """The next decoder layer's store: ``layer_kv[i]`` for layer ``i`` when given (layers
        are made in order, by ``init_layers`` or as ``update`` meets them), else ``kv``."""
        i, self._made = self._made, self._made + 1
        return QuantizedKVLayer(self.layer_kv.get(i, self.kv), self.block, self.sink,
                                self._window(i))

    def _window(self, i: int) -> int | None:
        return self.windows[i] if i < len(self.windows) else None

    def __repr__(self):
        extra = f", sink={self.sink}" if self.sink else ""
        return (f"{type(self).__name__}({self.kv}{extra}, layers={len(self.layers)}, "
                f"length={self.get_seq_length()})")

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens in every initialized layer. ``compiled_copy``
        calls it before each forward, outside the traced code, so the growth (a reallocation)
        never happens inside a Dynamo graph and the traced ``update`` has one path."""
        for layer in self.layers:
            if layer.is_initialized:
                layer._trim()                   # windowed layers: what the last call left
                layer._reserve(layer.length + int(tokens))

    def nbytes(self) -> int:
        """Bytes held by every layer's state, scales and ring included."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a plain (unquantized) K + V cache of the same tokens would hold."""
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                B, H, _, D = layer.state.k_ring.shape
                total += 2 * B * H * layer.length * D * layer.state.k_ring.element_size()
        return total


class GearKVLayer(QuantizedKVLayer):
    """A ``QuantizedKVLayer`` whose packed groups carry GEAR's correction (``gear.py``): the
    outliers of each group kept exactly and rank-r factors of the quantization error, stored
    beside the KIVI codes (same layout), grown with them and counted in ``nbytes``. Appends run
    the reference (``gear.append``: plain torch, any device); reads add the correction."""

    def __init__(self, gear: GearConfig, block: int = DEFAULT_BLOCK, sink: int = 0,
                 window: int | None = None):
        super().__init__(gear.kv, block, sink, window)
        self.gear = gear
        self.extras: dict[str, torch.Tensor] = {}

    def __repr__(self):
        extra = f", sink={self.sink}" if self.sink else ""
        return (f"GearKVLayer({self.config}, rank={self.gear.rank}, outliers={self.gear.outliers}"
                f"{extra}, length={self.length})")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, Hkv, _, D = key_states.shape
        self.extras = gear_ref.empty_extras(B, Hkv, D, 0, self.gear, self.device)

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = super()._tensors()
        if self.state is not None:
            out.update(self.extras)
        return out

    def _per_group(self) -> set[str]:
        return super()._per_group() | set(self.extras)                  # [B, Hkv, Gp, ...]

    def _set(self, name: str, t: torch.Tensor) -> None:
        if name in self.extras:
            self.extras[name] = t
        else:
            super()._set(name, t)

    def _reserve(self, total: int) -> None:
        super()._reserve(total)
        groups = self.state.k_codes.shape[2] // self.config.group
        for name, t in self.extras.items():                              # [B, Hkv, Gp, ...]
            if t.shape[2] < groups:
                pad = t.new_zeros(*t.shape[:2], groups - t.shape[2], *t.shape[3:])
                self.extras[name] = torch.cat((t, pad), 2)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c, g = self.config, self.gear
        kv_op.GEAR_APPEND(*self.state.tensors(), *(self.extras[n] for n in gear_ref.EXTRA_NAMES),
                          key_states.contiguous(), value_states.contiguous(), c.bits, c.group,
                          g.rank, float(g.outliers))

    def _read_state(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        st, c, g = self.state, self.config, self.gear
        return kv_op.GEAR_READ(st.k_codes, st.k_params, st.v_codes, st.v_params, st.k_ring,
                               st.v_ring, *(self.extras[n] for n in gear_ref.EXTRA_NAMES),
                               length, c.bits, c.group, c.residual, c.scales, g.rank,
                               float(g.outliers))

    def reset(self) -> None:
        super().reset()
        self.extras = {}


class GearCache(QuantizedCache):
    """``past_key_values`` holding a GEAR-corrected quantized state per layer (``gear(...)``)."""

    def __init__(self, gear: GearConfig | None = None, config=None, block: int = DEFAULT_BLOCK,
                 sink: int = 0):
        self.gear = gear if gear is not None else gear_ref.GearConfig()
        super().__init__(self.gear.kv, config, block, sink)

    def _new_layer(self) -> GearKVLayer:
        i, self._made = self._made, self._made + 1
        return GearKVLayer(self.gear, self.block, self.sink, self._window(i))
