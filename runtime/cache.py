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

Beam search works (``reorder_cache`` permutes the state); ``crop`` (assisted decoding) does not:
packed groups cannot be un-quantized.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longfx.kernels.kv_quant import op as kv_op  # noqa: F401 - registers longfx::kv_quant_*
from longfx.kernels.kv_quant.reference import (KVQuantConfig, QuantizedKV, dequantize_keys,
                                                dequantize_values, n_packed)

__all__ = ["QuantizedKVLayer", "QuantizedCache", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 256


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's quantized KV state (``QuantizedKV``) behind HF's cache-layer interface."""

    is_compileable = False      # capacity grows; HF's static-cache compile path is not for it
    is_croppable = False
    is_sliding = False

    def __init__(self, config: KVQuantConfig = KVQuantConfig(), block: int = DEFAULT_BLOCK):
        super().__init__()
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.config = config
        self.block = -(-block // config.group) * config.group     # whole groups
        self.state: QuantizedKV | None = None
        self.length = 0                                            # tokens held (all rows)

    def __repr__(self):
        return f"QuantizedKVLayer({self.config}, length={self.length})"

    # ------------------------------------------------------------------ state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, Hkv, _, D = key_states.shape
        self.config.check_head_dim(D)
        self.state = QuantizedKV.empty(B, Hkv, D, 0, self.config, self.dtype, self.device)
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

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        st, c = self.state, self.config
        torch.ops.longfx.kv_quant_append(*st.tensors(), key_states.contiguous(),
                                         value_states.contiguous(), c.bits, c.group)

    def _read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens of the state, [B, Hkv, length, D] in the model's dtype:
        packed groups dequantized, the rest from the ring."""
        st, c = self.state, self.config
        n = n_packed(length, c)
        k = dequantize_keys(st.k_codes[:, :, :n], st.k_params[:, :, :n // c.group], c)
        v = dequantize_values(st.v_codes[:, :, :n], st.v_params[:, :, :n], c)
        slots = torch.arange(n, length, device=k.device) % c.ring       # ring slot of each
        return (torch.cat((k.to(self.dtype), st.k_ring[:, :, slots]), 2),
                torch.cat((v.to(self.dtype), st.v_ring[:, :, slots]), 2))

    # ------------------------------------------------------------------ HF interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype}, the model gave {key_states.dtype}")
        past, s = self.length, key_states.shape[-2]
        self._reserve(past + s)
        if s == 1:                                   # decode: read the state after the append
            self._append(key_states, value_states)
            self.length = past + s
            return self._read(past + s)
        k_past, v_past = self._read(past)            # prefill: stored past + the chunk in fp
        self._append(key_states, value_states)
        self.length = past + s
        return torch.cat((k_past, key_states), 2), torch.cat((v_past, value_states), 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.length = 0
        self.is_initialized = False

    def offload(self):          # the state stays where it is (no CPU offloading)
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is None:
            return
        st = self.state
        for name in QuantizedKV.NAMES[:-1]:                              # all but length
            t = getattr(st, name)
            setattr(st, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is None:
            return
        st = self.state
        for name in QuantizedKV.NAMES[:-1]:
            setattr(st, name, getattr(st, name).repeat_interleave(repeats, 0))
        self.batch_size = st.k_ring.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)
        if self.state is not None:
            self.batch_size = self.state.k_ring.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (packed groups "
                                  "cannot be un-quantized): assisted decoding is not supported")

    def nbytes(self) -> int:
        """Bytes of the state's tensors (codes, scales, ring, length) as allocated."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors())


class QuantizedCache(Cache):
    """``past_key_values`` holding a KIVI-quantized state per layer (``kv_quant(...)``).

    ``QuantizedCache(KVQuantConfig(bits=4), config=model.config)`` pre-creates one layer per
    decoder layer; without ``config`` layers are added as ``update`` meets them."""

    def __init__(self, kv: KVQuantConfig = KVQuantConfig(), config=None,
                 block: int = DEFAULT_BLOCK):
        self.kv = kv
        self.block = block
        n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None) \
            if config is not None else None
        if n:
            super().__init__(layers=[QuantizedKVLayer(kv, block) for _ in range(n)])
        else:
            super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> QuantizedKVLayer:
        return QuantizedKVLayer(self.kv, self.block)

    def __repr__(self):
        return f"QuantizedCache({self.kv}, layers={len(self.layers)}, length={self.get_seq_length()})"

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens in every initialized layer. ``compiled_copy``
        calls it before each forward, outside the traced code, so the growth (a reallocation)
        never happens inside a Dynamo graph and the traced ``update`` has one path."""
        for layer in self.layers:
            if layer.is_initialized:
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
