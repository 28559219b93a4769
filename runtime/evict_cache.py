"""A longfx KV cache that evicts: SnapKV, H2O and StreamingLLM with compacted per-head storage.

:class:`EvictCache` is a transformers ``Cache`` whose layers (:class:`EvictLayer`) hold the
kept keys/values as compact tensors ``[B, Hkv, K, D]`` — every KV head keeps its own token set
(SnapKV, H2O) but the same number ``K`` of tokens, so eviction really frees memory (unlike a
mask over a full cache). Scoring and selection: ``kernels/kv_evict/reference.py``.

When ``update`` runs (one prefill chunk of ``s`` tokens, or one decode token):

1. attention of this step gets the stored past followed by the chunk — a transient
   ``[B, Hkv, K + s, D]`` (for ``streaming_kv`` a view of one buffer, its sinks moved: below);
2. the policy scores ``past + chunk`` and the layer *stores* only the kept tokens, so after a
   chunked prefill (``longfx.eval.infer.chunked_logits``) the cache — and the peak memory —
   follows the budget, not the prompt (NVIDIA/kvpress#167, #178 ask for this).

Policies and when they evict: SnapKV after every prefill chunk (``s > 1``; decode tokens are
appended, as in the paper); H2O after every chunk and every decode token; StreamingLLM after
every update.

Queries. SnapKV and H2O score keys with the model's *queries*, which HF attention does not pass
to ``Cache.update``. :func:`install_query_hooks` puts a forward pre-hook on every attention
module (modules with ``q_proj`` and ``layer_idx``, the HF decoder layout): when the call's
``past_key_values`` is an :class:`EvictCache`, it hands the layer the module, its
``hidden_states`` and ``position_embeddings``; ``update`` then recomputes only the query rows
it needs (``q_proj`` → optional ``q_norm`` → rotate-half RoPE with the same cos/sin: bit for
bit the model's rotated queries). For any other cache the hook does nothing.

Positions and masks. ``get_seq_length`` is the number of tokens *seen* (so HF gives queries
their true positions for RoPE), ``get_mask_sizes`` the *kept* length plus the chunk, with
offset ``seen − kept``: stored token ``j`` stands at mask position ``seen − kept + j`` (all
before the chunk, so all visible) and the chunk's keys at their true positions (causal inside
the chunk). StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): keys are stored as the model
rotated them, with their true positions, and read at exactly those mask positions, so the sinks
sit right before the window and attention sees contiguous positions inside the cache — relative
distances equal StreamingLLM's in-cache positions while queries keep their true ones. The
window is a contiguous run ending at the newest token, so its mask positions *are* its true
positions: only the ``sink`` sink keys are rotated on a read (by the number of tokens evicted so
far; ``R.rotate_sinks`` says why this is exact). Until 2026-11-24 every kept key was re-rotated
on every read (``R.rerotate_to_cache_positions``, kept as the tested reference), which made a
decode step cost more than a dense one.

Storage. The layer keeps its kept tokens in a *store* (``EvictLayer.store``): ``update(k, v)``
appends a step's tokens and returns what attention reads of the past followed by them,
``read()`` the stored tokens as attention reads them, ``keep(idx, keys, values)`` stores only the
tokens ``idx`` ([B, Hkv, K] per KV head, or [K] shared) of the tensors the last ``update`` /
``read`` returned, ``nbytes()`` what it holds. :class:`TensorStore` (the default of SnapKV and
H2O) holds plain tensors — the behaviour before stores existed, bit for bit.
:class:`StreamingTensorStore` (the default of ``streaming_kv``) holds StreamingLLM's set in one
buffer that a decode step writes into (its token and the moved sinks) and reads a view of, with
no copy of the kept tokens; every few steps (``slack``) the kept tokens move to its front. :class:`QuantizedStore` holds them
in a KIVI state (Liu et al. 2024, arXiv:2402.02750; ``runtime/cache.py``): appends are
``QuantizedKVLayer.update`` (quantize on append; attention reads the dequantized state exactly
as ``kv_quant`` alone), and ``keep`` gathers the kept tokens from the dequantized read and
re-stores them (``QuantizedKVLayer.replace``: packed again, the last ``residual`` and the first
``sink`` tokens full precision). Key scales are shared per channel across a group of tokens, so
a gather breaks the groups and the kept keys (and values) are quantized again: a token packed
before an eviction is rounded once more for every eviction it survives (SnapKV at the prompt's
end: twice in all); tokens still in the residual ring, the sinks or the step's chunk are exact
until then. ``snapkv(...) + kv_quant(...)`` uses it (``passes/kv_quant.py``).
:class:`StreamingQuantizedStore` is StreamingLLM's quantized store, with no second rounding: a
windowed quantized layer drops whole groups behind the window and the sinks are kept exactly
(``streaming_kv(...) + kv_quant(...)``). :class:`H2OQuantizedStore` is H2O's (``h2o(...) +
kv_quant(...)``), with no second rounding either: single tokens are evicted by moving the
survivors' codes; each keeps the index of its group's key-scale row in a per-head group table
(rows no kept token uses are dropped), so a read is ``kv_quant`` alone's read restricted to the
kept tokens, bit for bit.

Limits: batch rows are compacted independently, but left padding is not tracked (pad with
equal lengths or use B = 1); ``crop`` (assisted decoding) is not supported; the
streaming sinks' rotation assumes rotate-half RoPE (Llama, Mistral, Qwen, SmolLM...).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache

from longfx.kernels.kv_evict import reference as R
from longfx.kernels.kv_quant import gear as gear_ref
from longfx.kernels.kv_quant import reference as kv_ref
from longfx.kernels.kv_quant.reference import KVQuantConfig, n_packed
from longfx.runtime.cache import StateLayer, init_layers

__all__ = ["EvictLayer", "EvictCache", "TensorStore", "StreamingTensorStore", "QuantizedStore",
           "StreamingQuantizedStore", "H2OQuantizedStore",
           "install_query_hooks",
           "remove_query_hooks", "attention_modules"]

Policy = R.SnapKVConfig | R.H2OConfig | R.StreamingConfig


class TensorStore:
    """The default storage of an :class:`EvictLayer` (SnapKV, H2O): the kept keys/values as
    plain tensors ``[B, Hkv, K, D]`` (contiguous, compacted by every ``keep``)."""

    plain = True
    reads_are_copies = True     # after keep(), nothing here aliases what update() returned

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        self.keys = key_states.new_empty(B, Hkv, 0, D)
        self.values = value_states.new_empty(B, Hkv, 0, value_states.shape[-1])

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def update(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = torch.cat((self.keys, key_states), 2)               # [B, Hkv, K + s, D]
        self.values = torch.cat((self.values, value_states), 2)
        return self.keys, self.values

    def keep(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = _take(keys, idx), _take(values, idx)

    def reserve(self, tokens: int) -> None:
        pass

    def reset(self) -> None:
        self.keys = self.values = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class StreamingTensorStore:
    """StreamingLLM's kept tokens (Xiao et al. 2023, arXiv:2309.17453) in one buffer, the
    default store of ``streaming_kv``: a decode step writes its token and the ``sink`` moved
    sink keys and copies nothing else.

    ``buf_k``/``buf_v`` ``[B, Hkv, cap, D]`` hold the kept tokens, in order, at
    ``[a, b)``: ``ns = min(sink, seen)`` slots for the sinks at ``[a, a + ns)``, then the window,
    its keys as the model rotated them (true positions). ``sink_k``/``sink_v`` keep the sinks'
    true-position keys and their values (once tokens are evicted, the sink slots are rewritten
    from them at every read). A step of ``s`` tokens that fits (``b + s ≤ cap``):

    1. writes the step at ``[b, b + s)`` and, once tokens have been evicted (``shift > 0``),
       the sinks moved by ``shift`` (``R.rotate_sinks``' rotation of ``sink_k``: the same keys
       as moving every kept key, ``R.rerotate_to_cache_positions``) and their values at
       ``[a, a + ns)``;
    2. returns the views ``[a, b + s)``: the past at contiguous in-cache positions, then the
       step — the values the re-rotating read built by copying the cache;
    3. evicts by moving ``a`` past the oldest window tokens (the next read writes the sinks
       right before the surviving window, over the evicted tokens' slots).

    ``cap`` grows up to ``sink + window + 1 + slack`` (``slack = (sink + window) // 64``: 32
    tokens at 2048 kept, 1.6% more memory) and once ``b`` reaches it the kept tokens are moved
    to the front (one copy of the kept tokens every ``slack + 1`` decode steps; outside a
    traced forward, in ``reserve``, under ``longfx.compile``). A prefill chunk that does not fit
    is read through a transient ``[B, Hkv, kept + s, D]`` copy, as before, and the kept tokens
    are then written to the front of the buffer.

    Order and values are those of the re-rotating read, so masks (``get_mask_sizes``) and
    attention see the same tensors."""

    plain = False

    def __init__(self, sink: int, window: int, slack: int | None = None):
        self.sink, self.window = int(sink), int(window)
        self.slack = (self.sink + self.window) // 64 if slack is None else int(slack)
        self.buf_k: torch.Tensor | None = None              # [B, Hkv, cap, D]
        self.buf_v: torch.Tensor | None = None
        self.sink_k: torch.Tensor | None = None             # [B, Hkv, sink, D], true positions
        self.sink_v: torch.Tensor | None = None
        self.a = self.b = 0                                 # the kept tokens: buf[:, :, a:b]
        self.seen = 0

    @property
    def max_cap(self) -> int:
        return self.sink + self.window + 1 + self.slack

    @property
    def cap(self) -> int:
        return 0 if self.buf_k is None else self.buf_k.shape[2]

    @property
    def kept(self) -> int:
        return self.b - self.a

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        self.buf_k = key_states.new_empty(B, Hkv, 0, D)
        self.buf_v = value_states.new_empty(B, Hkv, 0, value_states.shape[-1])
        self.sink_k = key_states.new_zeros(B, Hkv, self.sink, D)
        self.sink_v = value_states.new_zeros(B, Hkv, self.sink, value_states.shape[-1])
        self.a = self.b = self.seen = 0

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens with true-position keys (a contiguous copy): [B, Hkv, K, D]."""
        ns = min(self.sink, self.seen)
        return (torch.cat((self.sink_k[:, :, :ns], self.buf_k[:, :, self.a + ns:self.b]), 2),
                torch.cat((self.sink_v[:, :, :ns], self.buf_v[:, :, self.a + ns:self.b]), 2))

    def _relayout(self, cap: int) -> None:
        """The kept tokens to the front of a new buffer of ``cap`` tokens."""
        n, (B, Hkv, _, D) = self.kept, self.buf_k.shape
        k = self.buf_k.new_empty(B, Hkv, cap, D)
        v = self.buf_v.new_empty(B, Hkv, cap, self.buf_v.shape[-1])
        k[:, :, :n] = self.buf_k[:, :, self.a:self.b]
        v[:, :, :n] = self.buf_v[:, :, self.a:self.b]
        self.buf_k, self.buf_v, self.a, self.b = k, v, 0, n

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more after ``b`` when they fit in ``max_cap`` with the kept ones
        (grow geometrically, or move the kept tokens to the front); a larger chunk is read
        through a transient copy. Called before a traced forward (``longfx.compile``) and at
        the start of every eager update."""
        if self.buf_k is None or self.b + tokens <= self.cap:
            return
        need = self.kept + int(tokens)
        if need <= self.max_cap:
            self._relayout(min(self.max_cap, max(need, 2 * self.cap)))

    def stream(self, key_states: torch.Tensor, value_states: torch.Tensor, ns: int, shift: int,
               inv_freq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One update: the kept past at contiguous in-cache positions (its first ``ns`` keys
        moved by ``shift``), then the step's tokens, ``[B, Hkv, kept + s, D]``; afterwards the
        store holds the first ``sink`` and the last ``window`` of those tokens."""
        n0, s = self.seen, key_states.shape[2]
        m = min(self.sink - n0, s)
        if m > 0:                                                    # the step holds sinks
            self.sink_k[:, :, n0:n0 + m] = key_states[:, :, :m]
            self.sink_v[:, :, n0:n0 + m] = value_states[:, :, :m]
        self.seen = n0 + s
        T, K = self.kept + s, self.sink + self.window
        if not torch.compiler.is_compiling():
            self.reserve(s)
        a, b = self.a, self.b
        moved = None
        if ns:                                       # [B, Hkv, ns, D]: the sinks, moved
            moved = R.rotate_sinks(self.sink_k[:, :, :ns], ns, shift, inv_freq)
        if b + s <= self.cap:                        # in place: views of the buffer
            self.buf_k[:, :, b:b + s] = key_states
            self.buf_v[:, :, b:b + s] = value_states
            if moved is not None:
                self.buf_k[:, :, a:a + ns] = moved
                self.buf_v[:, :, a:a + ns] = self.sink_v[:, :, :ns]
            keys, values = self.buf_k[:, :, a:b + s], self.buf_v[:, :, a:b + s]
            self.b = b + s
            self.a = a + max(T - K, 0)               # evict the oldest window tokens
            return keys, values
        # a chunk larger than the room: a transient copy, then the kept tokens to the front
        keys = torch.cat(((moved,) if moved is not None else ())
                         + (self.buf_k[:, :, a + ns:b], key_states), 2)        # [B, Hkv, T, D]
        values = torch.cat((self.buf_v[:, :, a:a + ns] if moved is None else self.sink_v[:, :, :ns],
                            self.buf_v[:, :, a + ns:b], value_states), 2)
        kept = min(T, K)
        nk = min(self.sink, T)                       # sinks kept, then the newest kept − nk
        if self.cap < kept:
            B, Hkv, _, D = self.buf_k.shape
            cap = self.max_cap if T > K else kept
            self.buf_k = self.buf_k.new_empty(B, Hkv, cap, D)
            self.buf_v = self.buf_v.new_empty(B, Hkv, cap, self.buf_v.shape[-1])
        self.buf_k[:, :, :nk] = keys[:, :, :nk]
        self.buf_v[:, :, :nk] = values[:, :, :nk]
        self.buf_k[:, :, nk:kept] = keys[:, :, T - (kept - nk):]
        self.buf_v[:, :, nk:kept] = values[:, :, T - (kept - nk):]
        self.a, self.b = 0, kept
        return keys, values

    def reset(self) -> None:
        self.buf_k = self.buf_v = self.sink_k = self.sink_v = None
        self.a = self.b = self.seen = 0

    def nbytes(self) -> int:
        """Bytes held: the buffers (``cap`` tokens, ≤ ``sink + window + 1 + slack``) and the
        sinks' true-position copy."""
        return sum(t.numel() * t.element_size()
                   for t in (self.buf_k, self.buf_v, self.sink_k, self.sink_v) if t is not None)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for n in ("buf_k", "buf_v", "sink_k", "sink_v"):
            t = getattr(self, n)
            if t is not None:
                setattr(self, n, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for n in ("buf_k", "buf_v", "sink_k", "sink_v"):
            t = getattr(self, n)
            if t is not None:
                setattr(self, n, t.repeat_interleave(repeats, 0))


class QuantizedStore:
    """KIVI storage (Liu et al. 2024, arXiv:2402.02750) of an :class:`EvictLayer`: the kept
    tokens live in a :class:`~longfx.runtime.cache.QuantizedKVLayer` (or a ``GearKVLayer``).

    ``update`` is the quantized layer's own (a chunk: the stored past dequantized + the chunk in
    full precision; a decode token: the state after the append, dequantized), so with nothing
    evicted the layer reads exactly like ``kv_quant`` alone. ``keep`` gathers the kept tokens
    from the tensors attention just read and re-stores them (``QuantizedKVLayer.replace``);
    tokens that were packed are then quantized a second time (module docstring)."""

    plain = False

    def __init__(self, layer):
        self.layer = layer

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.layer.lazy_initialization(key_states, value_states)

    @property
    def kept(self) -> int:
        return self.layer.length

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.read()

    def update(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.update(key_states, value_states)

    def keep(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer.replace(_take(keys, idx), _take(values, idx))

    def reserve(self, tokens: int) -> None:
        if self.layer.is_initialized:
            self.layer._reserve(self.layer.length + int(tokens))

    def reset(self) -> None:
        self.layer.reset()

    def nbytes(self) -> int:
        return self.layer.nbytes() if self.layer.is_initialized else 0

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.layer.batch_repeat_interleave(repeats)


class StreamingQuantizedStore(QuantizedStore):
    """StreamingLLM's kept set (Xiao et al. 2023, arXiv:2309.17453) stored KIVI-quantized with
    nothing ever quantized twice (``streaming_kv(...) + kv_quant(...)`` / ``+ gear(...)``).

    A gather-and-re-store (``QuantizedStore.keep``) would re-quantize the whole window at every
    decode token, since KIVI's key scales are shared by a group of tokens. StreamingLLM's set is
    the first ``sink`` tokens plus the newest ``window``, so this store needs no gather:

    * the quantized layer is *windowed* (``QuantizedKVLayer._trim``, the sliding-layer path of
      ``runtime/cache.py``, with window ``window + 1``): after each call it drops the whole
      packed groups older than the newest ``window`` tokens, moving codes and scales, never
      re-quantizing. It holds at most ``window + group − 1`` tokens past the ring
      (``window + group − 1 + residual`` in all);
    * the first ``sink`` tokens are copied exactly (``sink_k``, ``sink_v``, the model's dtype;
      they leave the packed groups when the window moves past them). The quantization
      recipe's own ``sink`` is not used: StreamingLLM's sinks replace it;
    * what attention reads is exactly the policy's set: the sink copy, then the layer's read
      from position max(sink, seen − window) on. The layer's extra (up to a group of) older
      tokens are held but not read, so ``EvictLayer`` sees the same token set — and moves the
      same sink keys — as ``streaming_kv`` alone; each key reads back the same dequantized value
      for as long as it is kept.

    ``keep`` checks that the policy kept that set (the streaming path of ``EvictLayer.update``
    calls it with ``streaming_keep``'s indices) and trims the layer (outside a traced forward;
    under ``longfx.compile`` ``reserve`` trims, as ``QuantizedCache.reserve`` does)."""

    reads_are_copies = True     # update() returns new tensors (the sink copy + the layer's read)

    def __init__(self, layer, sink: int, window: int):
        if layer.is_initialized:
            raise ValueError("StreamingQuantizedStore takes a fresh (empty) quantized layer")
        super().__init__(layer)
        layer.sink = 0                  # the store keeps StreamingLLM's sinks exactly itself
        layer.window = window + 1       # keep >= the newest `window` tokens after each call
        self.sink, self.window = sink, window
        self.sink_k: torch.Tensor | None = None                  # [B, Hkv, sink, D] exact
        self.sink_v: torch.Tensor | None = None
        self.seen = 0

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().init(key_states, value_states)
        B, Hkv = key_states.shape[:2]
        self.sink_k = key_states.new_zeros(B, Hkv, self.sink, key_states.shape[-1])
        self.sink_v = value_states.new_zeros(B, Hkv, self.sink, value_states.shape[-1])
        self.seen = 0

    def _first(self, n: int) -> int:
        """Position of the first non-sink token attention reads after ``n`` tokens."""
        return max(min(self.sink, n), n - self.window)

    @property
    def kept(self) -> int:
        return min(self.sink, self.seen) + self.seen - self._first(self.seen)

    def _present(self, k: torch.Tensor, v: torch.Tensor, start: int, n: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: the layer's tokens from position ``start`` on -> the sinks (exact) followed by
        the tokens from ``_first(n)`` on: [B, Hkv, min(sink, n) + len − (_first(n) − start), D]."""
        s, i = min(self.sink, n), self._first(n) - start
        return (torch.cat((self.sink_k[:, :, :s], k[:, :, i:]), 2),
                torch.cat((self.sink_v[:, :, :s], v[:, :, i:]), 2))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._present(*self.layer.read(), self.layer.offset, self.seen)

    def update(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n0, s = self.seen, key_states.shape[2]
        m = min(self.sink - n0, s)
        if m > 0:                                                  # the chunk holds sinks
            self.sink_k[:, :, n0:n0 + m] = key_states[:, :, :m]
            self.sink_v[:, :, n0:n0 + m] = value_states[:, :, :m]
        start = self.layer.offset            # the layer's update returns positions start..
        k, v = self.layer.update(key_states, value_states)         # (and may trim after)
        self.seen = n0 + s
        # the past as attention read it before this step (policy set at n0), then the step
        return self._present(k, v, start, n0)

    def keep(self, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        if idx.dim() != 1 or idx.numel() != self.kept:
            raise RuntimeError(f"StreamingQuantizedStore holds StreamingLLM's set ({self.kept} "
                               f"tokens); the policy kept {tuple(idx.shape)}")
        if not torch.compiler.is_compiling():
            self.layer._trim()

    def reserve(self, tokens: int) -> None:
        if self.layer.is_initialized:
            self.layer._trim()
        super().reserve(tokens)

    def reset(self) -> None:
        super().reset()
        self.sink_k = self.sink_v = None
        self.seen = 0

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v)
                    if t is not None)
        return super().nbytes() + extra

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        super().reorder_cache(beam_idx)
        self.sink_k = self.sink_k.index_select(0, beam_idx.to(self.sink_k.device))
        self.sink_v = self.sink_v.index_select(0, beam_idx.to(self.sink_v.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.sink_k = self.sink_k.repeat_interleave(repeats, 0)
        self.sink_v = self.sink_v.repeat_interleave(repeats, 0)


_EAGER = ("H2OQuantizedStore runs eagerly: which tokens each head keeps, and so the sizes of "
          "its packed tensors, depend on the data")


class H2OQuantizedStore:
    """H2O's kept tokens (Zhang et al. 2023, arXiv:2306.14048) stored KIVI-quantized (Liu et al.
    2024, arXiv:2402.02750) with no token ever quantized twice (``h2o(...) + kv_quant(...)`` /
    ``+ gear(...)``).

    H2O evicts arbitrary tokens, per KV head, after every chunk and every decode token. KIVI's key
    (scale, zero) is shared per channel by a group of ``group`` tokens, so ``QuantizedStore``'s
    gather-and-re-store would round every kept key again at every step (docs/kv_eviction.md:
    5.5× one rounding's RMS error after 200 steps). Evicting whole groups instead
    (``StreamingQuantizedStore``'s way) would not be H2O: its heavy hitters are single tokens.
    This store evicts single tokens and moves, never re-computes, what they were quantized to:

    * codes are integers, so dropping a token from a packed group only moves the survivors'
      codes (a gather of whole code bytes: each token's codes are its own row; nothing is
      unpacked). A group's key (scale, zero) row stays valid for its surviving tokens, so the
      group rows live in a *group table* (per KV head, ``k_params [B, Hkv, G, 2, D]``, and GEAR's
      per-group outliers and low-rank factors) and each kept packed token carries ``grp``, the
      table row its scales are in, and ``row``, its place in that group (GEAR's low-rank row
      and outliers are indexed by it; with the table's ``gid`` it also gives the true
      position, ``gid · group + row``). A table row no kept token refers to is dropped;
    * values are per-token quantized (codes and (scale, zero) per token): they move with
      their token;
    * the full-precision ring holds the newest ``seen − n_packed(seen)`` tokens exactly as
      ``kv_quant`` alone does (``ring`` slots, position ``p`` at slot ``p % ring``), evicted
      ones included, with a per-head ``ring_kept`` flag. When a group leaves the ring it is
      quantized as ``kv_quant`` alone quantizes it (the same tokens, so the same scales; the
      reference functions of ``kernels/kv_quant``) and only the kept tokens' codes are stored.
      The ring is a fixed cost (``kv_quant`` alone holds it too), so keeping its evicted tokens
      until their group is packed costs nothing and makes the scales those of ``kv_quant``
      alone; H2O's ``recent`` tokens overlap it;
    * the first ``sink`` tokens (``kv_quant``'s exact sink copy) are read exactly, as there.

    So a read returns, bit for bit, the ``kv_quant`` layer alone's read (keys and values
    dequantized from the same codes and scales, ring and sinks exact) restricted to the tokens
    H2O kept, and a kept token reads back the same value after any number of evictions. Memory
    really shrinks: evicted tokens' codes are gone (each heavy hitter costs its codes, its value
    scales, 4 bytes of ``grp`` and 1 of ``row``; plus one table row per group that keeps a
    token). Every head holds the same number ``K`` of tokens but splits them differently between
    the packed part and the ring, so the packed part is padded to the largest head's count (at
    most ``ring`` tokens of padding; ``n_pk`` counts each head's).

    Order (what ``EvictLayer`` relies on): the kept tokens are held and read in true-position
    order per head — the packed ones, then the ring's. ``update`` returns them followed by the
    step's tokens (a chunk: the past as read before it, then the chunk in full precision; a
    decode token: the state after its append, as ``QuantizedKVLayer.update`` does), and
    ``keep(idx, ...)`` takes ascending indices into that (``R.h2o_keep``'s), ignoring the
    tensors: the kept tokens are taken from the stored codes.

    Limits: the bookkeeping is data-dependent (per-head counts), so under ``longfx.compile``
    ``update`` and ``keep`` run eagerly (a graph break per layer; results are the same) and the
    fused ``kv_quant`` decode lowering does not apply (attention reads the dequantized copy).
    Quantization uses the reference functions on every device (``kv_quant`` alone uses the
    Triton append on CUDA). ``layer`` (a fresh ``QuantizedKVLayer`` or ``GearKVLayer``) only
    gives the config; it is never filled."""

    plain = False
    reads_are_copies = True     # update() and read() return new tensors
    eager = True                # EvictLayer runs its whole update outside traced graphs

    def __init__(self, layer):
        if layer.is_initialized:
            raise ValueError("H2OQuantizedStore takes a fresh (empty) quantized layer")
        if layer.window is not None:
            raise ValueError("H2OQuantizedStore needs a full (not sliding-window) quantized layer")
        self.layer = layer
        self.config: KVQuantConfig = layer.config
        self.gear = getattr(layer, "gear", None)                # GearConfig, or None
        self.sink = layer.sink
        self._clear()

    def _clear(self) -> None:
        self.tok: dict[str, torch.Tensor] = {}      # per kept packed token: [B, Hkv, P, ...]
        self.groups: dict[str, torch.Tensor] = {}   # per group-table row: [B, Hkv, G, ...]
        self.n_pk: torch.Tensor | None = None       # [B, Hkv] packed tokens kept per head
        self.k_ring: torch.Tensor | None = None     # [B, Hkv, ring, D] stored form (rotated)
        self.v_ring: torch.Tensor | None = None
        self.ring_kept: torch.Tensor | None = None  # [B, Hkv, ring] bool, by slot
        self.sink_k: torch.Tensor | None = None     # [B, Hkv, sink, D] exact, model basis
        self.sink_v: torch.Tensor | None = None
        self.rot: torch.Tensor | None = None        # [D, D] fp32 (rotate=True, KIVI only)
        self.seen = 0                               # tokens seen (the next true position)
        self._kept = 0                              # tokens kept per head

    # ------------------------------------------------------------------ state

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self.config
        B, H, _, D = key_states.shape
        c.check_head_dim(D)
        dev, dt = key_states.device, key_states.dtype
        self.k_ring = key_states.new_zeros(B, H, c.ring, D)
        self.v_ring = value_states.new_zeros(B, H, c.ring, D)
        self.ring_kept = torch.zeros(B, H, c.ring, dtype=torch.bool, device=dev)
        if self.sink:
            self.sink_k = key_states.new_zeros(B, H, self.sink, D)
            self.sink_v = value_states.new_zeros(B, H, self.sink, D)
        if c.rotate and self.gear is None:        # GearKVLayer does not rotate either
            self.rot = kv_ref.rotation(D, dev)
        pd, jv = c.params_dtype, c.value_groups(D)
        row_dtype = torch.uint8 if c.group <= 256 else torch.int32
        self.tok = {"k_codes": torch.zeros(B, H, 0, D * c.kbits // 8, dtype=torch.uint8, device=dev),
                    "v_codes": torch.zeros(B, H, 0, D * c.bits // 8, dtype=torch.uint8, device=dev),
                    "v_params": torch.zeros(B, H, 0, 2, jv, dtype=pd, device=dev),
                    "grp": torch.zeros(B, H, 0, dtype=torch.int32, device=dev),
                    "row": torch.zeros(B, H, 0, dtype=row_dtype, device=dev)}
        self.groups = {"k_params": torch.zeros(B, H, 0, 2, D, dtype=pd, device=dev),
                       "gid": torch.zeros(B, H, 0, dtype=torch.int32, device=dev)}
        if self.gear is not None:
            self.groups.update(gear_ref.empty_extras(B, H, D, 0, self.gear, dev))
        self.n_pk = torch.zeros(B, H, dtype=torch.long, device=dev)
        self.dtype = dt
        self.seen = self._kept = 0

    @property
    def kept(self) -> int:
        return self._kept

    @property
    def batch_size(self) -> int:
        return 0 if self.k_ring is None else self.k_ring.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, by name (per-token ones prefixed ``tok.``, group rows ``grp.``)."""
        out = {f"tok.{n}": t for n, t in self.tok.items()}
        out.update({f"grp.{n}": t for n, t in self.groups.items()})
        for n in ("n_pk", "k_ring", "v_ring", "ring_kept", "sink_k", "sink_v"):
            t = getattr(self, n)
            if t is not None:
                out[n] = t
        return out

    def _set(self, name: str, t: torch.Tensor) -> None:
        if name.startswith("tok."):
            self.tok[name[4:]] = t
        elif name.startswith("grp."):
            self.groups[name[4:]] = t
        else:
            setattr(self, name, t)

    def nbytes(self) -> int:
        """Bytes held: packed codes, value scales, ``grp``/``row`` of the kept packed tokens, the
        group table (key scales, GEAR corrections, ``gid``), ring, flags, counts, sink copy."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    # ------------------------------------------------------------------ layout helpers

    @staticmethod
    def _compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sel bool [B, Hkv, N] -> (order long [B, Hkv, N'], counts long [B, Hkv]): per head, the
        indices of the selected entries first, in order, N' = the largest count (the tail of
        a head with fewer is padding: unselected indices)."""
        counts = sel.sum(-1)
        n = int(counts.max()) if counts.numel() else 0
        order = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        return order, counts

    def _ring_positions(self) -> torch.Tensor:
        """True positions the ring holds now, ascending: long [Rn] (Rn ≤ ring)."""
        return torch.arange(n_packed(self.seen, self.config), self.seen, device=self.k_ring.device)

    def _ring_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot [B, Hkv, Rn'] of each head's kept ring tokens in position order (padded),
        their count [B, Hkv], their positions [B, Hkv, Rn'])."""
        pos = self._ring_positions()                                        # [Rn]
        slots = pos % self.config.ring
        kept = self.ring_kept[:, :, slots]                                  # [B, Hkv, Rn]
        order, count = self._compact(kept)                                  # [B, Hkv, Rn']
        return slots[order], count, pos[order]

    def _packed_positions(self) -> torch.Tensor:
        """True positions of the packed part's tokens, long [B, Hkv, P] (padding: garbage)."""
        gid = self.groups["gid"].long().gather(2, self.tok["grp"].long())  # [B, Hkv, P]
        return gid * self.config.group + self.tok["row"].long()

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, pos), long [B, Hkv, K]: per head, kept token i is entry ``src[i]`` of the packed
        part followed by the ring's tokens in position order ([B, Hkv, P + Rn, ...]), at true
        position ``pos[i]``."""
        P, K = self.tok["grp"].shape[2], self._kept
        i = torch.arange(K, device=self.n_pk.device).expand(*self.n_pk.shape, K)   # [B, Hkv, K]
        pos = self._packed_positions().gather(2, i.clamp(max=P - 1)) if P else i.clone()
        src = i
        _, _, rpos = self._ring_order()                                     # [B, Hkv, Rn']
        if rpos.shape[2]:
            in_pk = i < self.n_pk[..., None]
            rank = (i - self.n_pk[..., None]).clamp(0, rpos.shape[2] - 1)   # [B, Hkv, K]
            ring_pos = rpos.gather(2, rank)
            first = n_packed(self.seen, self.config)                        # the ring's first
            src = torch.where(in_pk, i, P + ring_pos - first)
            pos = torch.where(in_pk, pos, ring_pos)
        return src, pos

    def positions(self) -> torch.Tensor:
        """True positions of the kept tokens, in read order: long [B, Hkv, K] (ascending)."""
        return self._layout()[1]

    # ------------------------------------------------------------------ dequantize

    def _dequantize_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed part's keys and values, fp32 [B, Hkv, P, D] (the stored basis): the same
        element-wise arithmetic as ``reference.dequantize_keys/values`` (and
        ``gear.decompress``) on the whole groups, applied to the kept tokens only."""
        c, t = self.config, self.tok
        grp = t["grp"].long()                                               # [B, Hkv, P]
        kp = R.gather_tokens(self.groups["k_params"], grp)                  # [B, Hkv, P, 2, D]
        a, b = kv_ref.affine(kp.transpose(-1, -2), c.kbits)                 # [B, Hkv, P, D]
        k = kv_ref.unpack(t["k_codes"], c.kbits, torch.float32) * a + b
        v = kv_ref.dequantize_values(t["v_codes"], t["v_params"], c)        # [B, Hkv, P, D]
        if self.gear is None:
            return k, v
        g, D = c.group, k.shape[-1]
        row = t["row"].long()
        out = []
        for p, x in (("k_", k), ("v_", v)):
            la = self.groups[p + "lr_a"]                                    # [B, Hkv, G, g, r]
            if la.shape[-1]:
                la = la.flatten(2, 3).gather(                               # [B, Hkv, P, r]
                    2, (grp * g + row)[..., None].expand(*grp.shape, la.shape[-1]))
                lb = R.gather_tokens(self.groups[p + "lr_b"], grp)          # [B, Hkv, P, r, D]
                x = x + (la.float()[..., None, :] @ lb.float())[..., 0, :]  # [B, Hkv, P, D]
            oi = R.gather_tokens(self.groups[p + "out_idx"], grp).long()    # [B, Hkv, P, n]
            if oi.shape[-1]:
                ov = R.gather_tokens(self.groups[p + "out_val"], grp).float()
                hit = oi // D == row[..., None]                             # outlier in my row
                col = torch.where(hit, oi % D, D)                           # others -> spare col
                x = torch.cat((x, x.new_zeros(*x.shape[:-1], 1)), -1)       # [B, Hkv, P, D + 1]
                x = x.scatter(-1, col, torch.where(hit, ov, 0.0))[..., :D]
            out.append(x)
        return out[0], out[1]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens as attention reads them, [B, Hkv, K, D] in the model's dtype, in
        position order: the packed ones dequantized, the ring's exact, the sinks exact."""
        if self.k_ring is None:
            raise RuntimeError("H2OQuantizedStore: read before the first update")
        k, v = self._dequantize_packed()
        slots = self._ring_positions() % self.config.ring                   # [Rn]
        k = torch.cat((k.to(self.dtype), self.k_ring[:, :, slots]), 2)      # [B, Hkv, P + Rn, D]
        v = torch.cat((v.to(self.dtype), self.v_ring[:, :, slots]), 2)
        if self.rot is not None:                                            # the model's basis
            k, v = kv_ref.unrotate(k, self.rot), kv_ref.unrotate(v, self.rot)
        src, pos = self._layout()
        k, v = R.gather_tokens(k, src), R.gather_tokens(v, src)             # [B, Hkv, K, D]
        if self.sink:
            is_sink = (pos < self.sink)[..., None]                          # [B, Hkv, K, 1]
            at = pos.clamp(max=self.sink - 1)
            k = torch.where(is_sink, R.gather_tokens(self.sink_k, at), k)
            v = torch.where(is_sink, R.gather_tokens(self.sink_v, at), v)
        return k, v

    # ------------------------------------------------------------------ append / evict

    def _pack(self, xk: torch.Tensor, xv: torch.Tensor, keep: torch.Tensor, n0: int) -> None:
        """Quantize the whole groups xk, xv [B, Hkv, n, D] (positions n0 .. n0 + n − 1, the
        stored basis) as ``kv_quant`` alone does, then store the codes of the tokens ``keep``
        [B, Hkv, n] marks (the others are dropped at once) and the groups' table rows."""
        c, g = self.config, self.config.group
        B, H, n, _ = xk.shape
        if self.gear is not None:
            kc, kp, *kx = gear_ref.compress(xk, "keys", self.gear)
            vc, vp, *vx = gear_ref.compress(xv, "values", self.gear)
            extra = dict(zip(gear_ref.EXTRA_NAMES, (*kx, *vx)))
        else:
            kc, kp = kv_ref.quantize_keys(xk, c)          # [B, Hkv, n, Dk], [B, Hkv, n/g, 2, D]
            vc, vp = kv_ref.quantize_values(xv, c)        # [B, Hkv, n, Dv], [B, Hkv, n, 2, Jv]
            extra = {}
        dev = xk.device
        G0, P0 = self.groups["gid"].shape[2], self.tok["grp"].shape[2]
        gid = torch.arange(n0 // g, (n0 + n) // g, dtype=torch.int32, device=dev)
        new_groups = {"k_params": kp, "gid": gid.expand(B, H, -1), **extra}
        for name, t in new_groups.items():
            self.groups[name] = torch.cat((self.groups[name], t.to(self.groups[name].dtype)), 2)
        j = torch.arange(n, device=dev)
        new_tok = {"k_codes": kc, "v_codes": vc, "v_params": vp,
                   "grp": (G0 + j // g).to(torch.int32).expand(B, H, n),
                   "row": (j % g).to(self.tok["row"].dtype).expand(B, H, n)}
        sel = torch.cat((torch.arange(P0, device=dev) < self.n_pk[..., None], keep), 2)
        for name, t in new_tok.items():
            self.tok[name] = torch.cat((self.tok[name], t), 2)            # [B, Hkv, P0 + n, ...]
        self._keep_tokens(sel)

    def _keep_tokens(self, sel: torch.Tensor) -> None:
        """Keep the packed tokens ``sel`` [B, Hkv, P] marks (moved, in order, to the front of
        compact tensors), then drop the group-table rows no kept token uses."""
        order, self.n_pk = self._compact(sel)                               # [B, Hkv, P']
        self.tok = {name: R.gather_tokens(t, order) for name, t in self.tok.items()}
        P, G = order.shape[2], self.groups["gid"].shape[2]
        valid = torch.arange(P, device=order.device) < self.n_pk[..., None]  # [B, Hkv, P']
        grp = self.tok["grp"].long()
        uses = torch.zeros(*grp.shape[:2], G, dtype=torch.int32, device=grp.device)
        alive = uses.scatter_add_(2, grp, valid.to(torch.int32)) > 0       # [B, Hkv, G]
        rows, _ = self._compact(alive)                                      # [B, Hkv, G']
        renum = alive.long().cumsum(-1) - 1                                 # old row -> new row
        self.tok["grp"] = torch.where(valid, renum.gather(2, grp), 0).to(torch.int32)
        self.groups = {name: R.gather_tokens(t, rows) for name, t in self.groups.items()}

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``reference.append``'s schedule on the stored forms k, v [B, Hkv, s, D]: whole groups
        leaving the ring are packed (``_pack``: kept tokens only), the rest goes to the ring."""
        c, L, s = self.config, self.seen, k.shape[2]
        Rg = c.ring
        n0, n1 = n_packed(L, c), n_packed(L + s, c)
        if n1 > n0:
            old = torch.arange(n0, min(n1, L), device=k.device) % Rg       # ring slots packed now
            fresh = max(0, n1 - L)                                          # step tokens packed now
            xk = torch.cat((self.k_ring[:, :, old], k[:, :, :fresh]), 2)   # [B, Hkv, n1 − n0, D]
            xv = torch.cat((self.v_ring[:, :, old], v[:, :, :fresh]), 2)
            keep = torch.cat((self.ring_kept[:, :, old],                    # [B, Hkv, n1 − n0]
                              self.ring_kept.new_ones(*k.shape[:2], fresh)), 2)
            self._pack(xk, xv, keep, n0)
            self.ring_kept[:, :, old] = False
        to_ring = torch.arange(max(L, n1), L + s, device=k.device)          # positions
        self.k_ring[:, :, to_ring % Rg] = k[:, :, to_ring - L]
        self.v_ring[:, :, to_ring % Rg] = v[:, :, to_ring - L]
        self.ring_kept[:, :, to_ring % Rg] = True
        self.seen, self._kept = L + s, self._kept + s

    @torch.compiler.disable(reason=_EAGER)
    def update(self, key_states: torch.Tensor,
               value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a step; return the kept past followed by the step's tokens, [B, Hkv, K + s, D]
        (a chunk: the past read before the append + the chunk in full precision; a decode
        token: the read after the append — ``QuantizedKVLayer.update``'s two cases)."""
        if key_states.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype}, the model gave {key_states.dtype}")
        n0, s = self.seen, key_states.shape[2]
        m = min(self.sink - n0, s)
        if m > 0:                                                           # the step holds sinks
            self.sink_k[:, :, n0:n0 + m] = key_states[:, :, :m]
            self.sink_v[:, :, n0:n0 + m] = value_states[:, :, :m]
        k, v = key_states, value_states
        if self.rot is not None:                                            # store k·Q, v·Q
            k, v = kv_ref.rotate(k, self.rot), kv_ref.rotate(v, self.rot)
        if s == 1:
            self._append(k, v)
            return self.read()
        past_k, past_v = self.read()
        self._append(k, v)
        return torch.cat((past_k, key_states), 2), torch.cat((past_v, value_states), 2)

    @torch.compiler.disable(reason=_EAGER)
    def keep(self, idx: torch.Tensor, keys: torch.Tensor | None = None,
             values: torch.Tensor | None = None) -> None:
        """Keep the tokens ``idx`` (long [B, Hkv, K] ascending per head, or [K]) of the kept set
        as the last ``update`` returned it; ``keys``/``values`` are not used (nothing is
        re-stored: the survivors' codes move, the ring's flags change)."""
        B, H = self.n_pk.shape
        T, K = self._kept, idx.shape[-1]
        idx = idx.to(self.n_pk.device).expand(B, H, K)
        if K > 1 and bool((idx[..., 1:] <= idx[..., :-1]).any()):
            raise ValueError("H2OQuantizedStore.keep: indices must be ascending per head")
        chosen = torch.zeros(B, H, T, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
        P = self.tok["grp"].shape[2]                                        # P ≤ T
        in_pk = torch.arange(P, device=idx.device) < self.n_pk[..., None]   # [B, Hkv, P]
        slots, count, _ = self._ring_order()                                # [B, Hkv, Rn']
        if slots.shape[2]:
            rank = torch.arange(slots.shape[2], device=idx.device)
            at = (self.n_pk[..., None] + rank).clamp(max=T - 1)             # index in the set
            stay = chosen.gather(2, at) & (rank < count[..., None])         # [B, Hkv, Rn']
            self.ring_kept = torch.zeros_like(self.ring_kept).scatter_(2, slots, stay)
        self._keep_tokens(chosen[:, :, :P] & in_pk)
        self._kept = K

    def reserve(self, tokens: int) -> None:
        pass                    # storage is re-made at every append and eviction

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for name, t in self._tensors().items():
            self._set(name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name, t in self._tensors().items():
            self._set(name, t.repeat_interleave(repeats, 0))


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, T, D] -> its tokens idx: [B, Hkv, K] per head (gather) or [K] shared."""
    return x[:, :, idx] if idx.dim() == 1 else R.gather_tokens(x, idx)


class EvictLayer(StateLayer):
    """One layer's kept keys/values ``[B, Hkv, K, D]`` (in ``store``: plain tensors by default,
    a quantized state with :class:`QuantizedStore`) and the policy's own state."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, policy: Policy, inv_freq: torch.Tensor | None = None,
                 store: TensorStore | QuantizedStore | None = None):
        self.store = TensorStore()          # CacheLayerMixin.__init__ assigns keys/values = None
        super().__init__()
        if store is not None:
            self.store = store
        elif isinstance(policy, R.StreamingConfig):
            self.store = StreamingTensorStore(policy.sink, policy.window)
        self.policy = policy
        self.inv_freq = inv_freq
        self.head_dim = 0
        self.acc: torch.Tensor | None = None        # H2O: accumulated attention [B, Hkv, K]
        self.seen = 0                               # tokens seen (= the next true position)
        self.pending: tuple | None = None           # (module, hidden_states, (cos, sin))
        self.window_q: tuple | None = None          # SnapKV "prompt": (queries, scaling)
        self.prompt_seen = 0                        # ... and the tokens seen when it was taken

    def __repr__(self):
        return f"EvictLayer({self.policy}, kept={self.kept}, seen={self.seen})"

    @property
    def kept(self) -> int:
        return self.store.kept

    @property
    def pos(self) -> torch.Tensor | None:
        """StreamingLLM: the true positions of the kept tokens, long [K] — the first
        ``min(sink, seen)`` and a contiguous run ending at ``seen − 1`` (None for other
        policies; computed, not stored)."""
        if not isinstance(self.policy, R.StreamingConfig) or not self.is_initialized:
            return None
        ns = min(self.policy.sink, self.seen)
        return torch.cat((torch.arange(ns, device=self.device),
                          torch.arange(self.seen - (self.kept - ns), self.seen, device=self.device)))

    # the stored tokens as attention reads them, [B, Hkv, K, D] (None before the first update);
    # a TensorStore's own tensors, a QuantizedStore's dequantized copy (read-only)
    @property
    def keys(self) -> torch.Tensor | None:
        if self.store.plain:
            return self.store.keys
        return self.store.read()[0] if self.is_initialized else None

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._plain_store("keys").keys = t

    @property
    def values(self) -> torch.Tensor | None:
        if self.store.plain:
            return self.store.values
        return self.store.read()[1] if self.is_initialized else None

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._plain_store("values").values = t

    def _plain_store(self, name: str) -> TensorStore:
        if not self.store.plain:
            raise AttributeError(f"{name} of a {type(self.store).__name__} cannot be assigned: "
                                 "use store.keep / store.update")
        return self.store

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, Hkv, _, D = key_states.shape
        self.head_dim, self.kv_heads, self.value_dim = D, Hkv, value_states.shape[-1]
        self.store.init(key_states, value_states)
        if isinstance(self.policy, R.H2OConfig):
            self.acc = torch.zeros(B, Hkv, 0, dtype=torch.float32, device=self.device)
        self.batch_size = B
        self.is_initialized = True

    # ------------------------------------------------------------------ queries

    def _queries(self, rows: int) -> tuple[torch.Tensor, float]:
        """The model's rotated queries of the chunk's last ``rows`` tokens, [B, H, rows, D],
        and the attention scaling, recomputed from what the pre-hook captured."""
        if self.pending is None:
            raise RuntimeError(f"{type(self.policy).__name__}: eviction scores need the model's "
                               "queries and none were captured; build the cache with "
                               "EvictCache(..., model=model) (or longfx.compile(model, recipe)) "
                               "so its query hooks are installed")
        module, hidden, pe = self.pending
        self.pending = None
        if pe is None:
            raise RuntimeError("the attention module got no position_embeddings: eviction "
                               "supports HF decoders that pass (cos, sin) to attention")
        cos, sin = pe
        h = hidden[:, -rows:]                                                # [B, rows, E]
        B = h.shape[0]
        q = module.q_proj(h)                                                 # [B, rows, H·D]
        D = self.head_dim
        q = q.view(B, rows, -1, D)                                           # [B, rows, H, D]
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(1, 2)                                                # [B, H, rows, D]
        cos, sin = cos[:, -rows:].unsqueeze(1), sin[:, -rows:].unsqueeze(1)  # [B, 1, rows, D]
        if cos.shape[-1] != D:
            raise RuntimeError(f"partial rotary (cos has {cos.shape[-1]} of {D} channels) is not "
                               "supported by the eviction query hook")
        q = q * cos + R.rotate_half(q) * sin
        scaling = getattr(module, "scaling", None) or D ** -0.5
        return q, float(scaling)

    # ------------------------------------------------------------------ HF interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self.store, "eager", False):
            return self._eager_update(key_states, value_states)
        return self._update(key_states, value_states)

    @torch.compiler.disable(reason="the layer's store runs eagerly (data-dependent sizes)")
    def _eager_update(self, key_states: torch.Tensor,
                      value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole update outside any traced graph (a store with ``eager = True``): one graph
        break per layer, and the policy's Python ints (seen, kept, budget) are not guarded on,
        so a compiled decode step does not recompile as they change."""
        return self._update(key_states, value_states)

    def _update(self, key_states: torch.Tensor,
                value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        p, s, past = self.policy, key_states.shape[-2], self.kept
        seen0 = self.seen
        self.seen = seen0 + s
        if isinstance(p, R.SnapKVConfig) and p.when == "prompt":
            return self._snapkv_at_prompt_end(key_states, value_states, s)
        if isinstance(p, R.StreamingConfig):
            return self._streaming_update(key_states, value_states, seen0, past)
        # the stored past as attention reads it, then the step's tokens: [B, Hkv, past + s, D]
        keys, values = self.store.update(key_states, value_states)
        T = past + s
        budget = p.budget_for(self.seen)

        if isinstance(p, R.H2OConfig):
            q, scaling = self._queries(s)
            acc = torch.cat((self.acc, self.acc.new_zeros(*self.acc.shape[:2], s)), 2)
            acc = acc + R.h2o_accumulate(q, keys, scaling)               # [B, Hkv, T]
            if T > budget:
                idx = R.h2o_keep(acc, budget, p.recent_for(budget))      # [B, Hkv, K]
                self.store.keep(idx, keys, values)
                self.acc = acc.gather(2, idx)
            else:
                self.acc = acc
            return keys, values

        # SnapKV "chunk": compress after every prefill chunk; decode tokens are appended
        if s > 1 and T > budget:
            w = min(p.window, s)
            q, scaling = self._queries(w)
            scores = R.snapkv_scores(q, keys, scaling, p.kernel, p.pool)     # [B, Hkv, T − w]
            idx = R.snapkv_keep(scores, budget, w)                           # [B, Hkv, K]
            self.store.keep(idx, keys, values)
        self.pending = None
        return keys, values

    def _streaming_update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                          seen0: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): attention reads the kept past at
        contiguous in-cache positions, then the step's tokens; the layer keeps the first
        ``sink`` and the last ``window`` tokens.

        Keys are stored as the model rotated them (true positions). The kept past is the sinks
        followed by a contiguous run of the newest tokens, so placing it right before the chunk
        (cache positions ``seen0 − past ..``) leaves every window key where it is and moves only
        the sinks, all by ``shift = seen0 − past`` (the tokens evicted so far):
        ``R.rotate_sinks`` rotates ``min(sink, past)`` keys per read, not ``past`` — the same
        scores as re-rotating every kept key (``R.rerotate_to_cache_positions``, the reference;
        the docstring of ``rotate_sinks`` says why it is exact)."""
        p = self.policy
        self.pending = None
        shift = seen0 - past                                  # tokens evicted so far
        ns = min(p.sink, past) if shift else 0                # sink keys to move
        if ns and self.inv_freq is None:
            raise RuntimeError("streaming_kv needs the model's RoPE inv_freq to re-rotate "
                               "keys: build the cache with EvictCache(..., model=model)")
        if isinstance(self.store, StreamingTensorStore):      # the default: one buffer
            return self.store.stream(key_states, value_states, ns, shift, self.inv_freq)
        # another store (StreamingQuantizedStore, ...): the past as attention reads it with
        # true-position keys, then the step's tokens, [B, Hkv, past + s, D]
        keys, values = self.store.update(key_states, value_states)
        idx = R.streaming_keep(keys.shape[2], p.sink, p.window, device=keys.device)   # [K]
        self.store.keep(idx, keys, values)
        # a store that keeps no reference to what update() returned is written in place
        return R.rotate_sinks(keys, ns, shift, self.inv_freq,
                              inplace=getattr(self.store, "reads_are_copies", False)), values

    def _snapkv_at_prompt_end(self, key_states: torch.Tensor, value_states: torch.Tensor,
                              s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SnapKV as published: prefill chunks are stored whole (each keeps the queries of its
        last ``window`` positions; the last chunk's are the prompt's observation window, the
        question included); the first decode step compresses the prompt with them before it
        attends. ``get_mask_sizes`` announces the compressed length for that step."""
        p = self.policy
        if s > 1:
            self.window_q = self._queries(min(p.window, s))
            self.prompt_seen = self.seen
            return self.store.update(key_states, value_states)
        self.pending = None
        keep = self._prompt_keep()
        if keep is not None:
            q, scaling = self.window_q
            keys, values = self.store.read()                                    # [B, Hkv, P, D]
            scores = R.snapkv_scores(q, keys, scaling, p.kernel, p.pool)        # [B, Hkv, P]
            idx = R.snapkv_keep(scores, keep, q.shape[2])                       # [B, Hkv, K]
            self.store.keep(idx, keys, values)
        self.window_q = None
        return self.store.update(key_states, value_states)

    def _prompt_keep(self) -> int | None:
        """Tokens the prompt keeps at the first decode step ("prompt" SnapKV), or None when
        nothing is to be compressed (already done, or within the budget)."""
        if self.window_q is None:
            return None
        budget = self.policy.budget_for(self.prompt_seen)
        return budget if self.kept > budget else None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.kept
        if query_length == 1 and isinstance(self.policy, R.SnapKVConfig):
            kept = self._prompt_keep() or kept           # this step compresses first
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.store.reset()
        self.acc = None
        self.seen = 0
        self.pending = self.window_q = None
        self.is_initialized = False

    def _per_row(self):
        """Names of the layer's per-batch-row tensors (a plain store's keys/values included; a
        quantized store permutes its own state)."""
        names = ("keys", "values", "acc") if self.store.plain else ("acc",)
        return [n for n in names if getattr(self, n) is not None]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for n in self._per_row():
            t = getattr(self, n)
            setattr(self, n, t.index_select(0, beam_idx.to(t.device)))
        if not self.store.plain:
            self.store.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for n in self._per_row():
            setattr(self, n, getattr(self, n).repeat_interleave(repeats, 0))
        if not self.store.plain:
            self.store.batch_repeat_interleave(repeats)
        self._sync_batch_size()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)
        self._sync_batch_size()

    def _sync_batch_size(self) -> None:
        if self.store.plain:
            if self.keys is not None:
                self.batch_size = self.keys.shape[0]
        elif isinstance(self.store, StreamingTensorStore):
            if self.store.buf_k is not None:
                self.batch_size = self.store.buf_k.shape[0]
        elif isinstance(self.store, H2OQuantizedStore):
            if self.store.k_ring is not None:
                self.batch_size = self.store.batch_size
        elif self.store.layer.is_initialized:
            self.batch_size = self.store.layer.batch_size

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting KV cache cannot be cropped (evicted tokens are "
                                  "gone): assisted decoding is not supported")

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (the store's kept keys and values — packed codes, scales,
        ring and sink copy for a quantized store — and H2O's scores)."""
        return self.store.nbytes() + (0 if self.acc is None
                                      else self.acc.numel() * self.acc.element_size())


class EvictCache(Cache):
    """``past_key_values`` that evicts with ``policy`` (a config of
    ``kernels/kv_evict/reference.py``) and stores compacted per-head K/V.

    ``EvictCache(SnapKVConfig(ratio=0.5), model=model)`` sizes the layer list from
    ``model.config``, installs the query hooks (SnapKV, H2O) and reads RoPE's ``inv_freq``
    (StreamingLLM's sink rotation).

    ``store``: a factory of each layer's storage (called once per layer; None: plain tensors,
    :class:`TensorStore`, or :class:`StreamingTensorStore` for StreamingLLM). ``store=lambda: QuantizedStore(QuantizedKVLayer(KVQuantConfig(bits=4),
    sink=4))`` keeps the kept tokens KIVI-quantized (``snapkv(...) + kv_quant(...)``);
    ``H2OQuantizedStore(...)`` and ``StreamingQuantizedStore(...)`` are the H2O and
    StreamingLLM ones (no token quantized twice)."""

    def __init__(self, policy: Policy, config=None, model: torch.nn.Module | None = None,
                 store: Callable[[], TensorStore | QuantizedStore] | None = None):
        self.policy = policy
        self.store_factory = store
        if config is None and model is not None:
            config = getattr(model, "config", None)
        self.inv_freq = _inv_freq(model) if model is not None else None
        if model is not None and not isinstance(policy, R.StreamingConfig):
            install_query_hooks(model)
        init_layers(self, config)

    def _new_layer(self) -> EvictLayer:
        store = self.store_factory() if self.store_factory is not None else None
        return EvictLayer(self.policy, self.inv_freq, store)

    def __repr__(self):
        store = ""
        if self.layers and hasattr(self.layers[0].store, "layer"):
            store = f", store={self.layers[0].store.layer.config}"
        return (f"EvictCache({self.policy}{store}, layers={len(self.layers)}, "
                f"seen={self.get_seq_length()})")

    def reserve(self, tokens: int) -> None:
        """Let every initialized layer's store make room for ``tokens`` more (a quantized
        store grows its packed storage; ``compiled_copy`` calls this outside the traced code)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.store.reserve(tokens)

    def capture(self, layer_idx: int, module: torch.nn.Module, hidden: torch.Tensor,
                position_embeddings: Any) -> None:
        """Called by the attention pre-hook: what ``update`` needs to recompute the queries."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        self.layers[layer_idx].pending = (module, hidden, position_embeddings)

    def kept(self) -> int:
        """Tokens each KV head holds (layer 0; every layer holds the same number)."""
        return self.layers[0].kept if self.layers else 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a plain K + V cache of every seen token would hold (in the model's dtype)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                per_token = layer.kv_heads * (layer.head_dim + layer.value_dim) * layer.dtype.itemsize
                total += layer.batch_size * layer.seen * per_token
        return total


# ---------------------------------------------------------------------------------- hooks


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention modules of an HF decoder: those with a ``q_proj`` and a ``layer_idx``."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "q_proj", None), torch.nn.Module)
            and isinstance(getattr(m, "layer_idx", None), int)]


def _capture_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if isinstance(cache, EvictCache):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache.capture(module.layer_idx, module, hidden, kwargs.get("position_embeddings"))
    return None


_HOOKED: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def install_query_hooks(model: torch.nn.Module) -> int:
    """Put the query-capturing pre-hook on every attention module of ``model`` (once; a hook is
    inert unless the call's cache is an :class:`EvictCache`). Returns the modules hooked."""
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention module with q_proj and "
                         "layer_idx: SnapKV/H2O eviction cannot capture queries")
    for m in mods:
        if m not in _HOOKED:
            _HOOKED[m] = m.register_forward_pre_hook(_capture_hook, with_kwargs=True)
    return len(mods)


def remove_query_hooks(model: torch.nn.Module) -> None:
    for m in attention_modules(model):
        handle = _HOOKED.pop(m, None)
        if handle is not None:
            handle.remove()


def _inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The (first) RoPE frequency table of ``model``: a module buffer named ``inv_freq``."""
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            return buf.detach().clone()
    return None
