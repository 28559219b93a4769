"""Decode steps of a ``longfx.compile``-d model replayed as a CUDA graph.

A one-token decode step of a small or medium model at batch 1 is host-bound: on an H100 an
8-layer Llama-8B-shaped model with ``kv_quant(bits=4)`` spent ~10 ms a step of which 4.6 ms
were GPU kernels, the rest Python, the custom-op wrappers and Triton launches
(docs/kv_compression.md). A CUDA graph records every kernel of one step once and replays
them with one launch (the technique HF's static cache and ``torch.compile(mode=
"reduce-overhead")`` use for dense caches; PyTorch's ``torch.cuda.graph``).

A replay repeats the recorded kernels with the recorded arguments: same buffers, same
integers. That is right only when nothing a step computes depends on a value the host
changes between steps. This runner replays a step only when that is shown, not assumed:

* **The step's graph reads no host integer that changes.** Dynamo hands the compiled step the
  cache's Python-int lengths as SymInt inputs; ``Backend.int_inputs_read`` lists those that
  reach a tensor computation (rewrite/capture.py), and ``Backend.calls`` their values at each
  call. One that changed between the warm-up steps refuses the recording. A steady one (a
  batch size or storage capacity Dynamo made dynamic, or ``bits`` once two recipes ran in
  one process) is baked in; the runner records again when the ids' shape or the storage
  changes. The longfx cache layers' only per-step host change is their length, so no read
  integer changes every few steps unseen. A lowered ``kv_quant`` decode step reads none: its
  ops (``longfx::kv_quant_append``, ``longfx::kv_quant_attention``) read the length the state
  keeps on the device, and the only integer work left is the new Python length Dynamo writes
  back. An unlowered step (``fuse=false``, GEAR, a site another recipe took) reads the length
  (``kv_quant_read``) and is refused, naming the reason.
* **The same compiled graph ran for two steps in a row**, so Dynamo's guards and automatic
  dynamic shapes have settled (a graph that recompiles every step bakes its lengths in as
  constants, which no input check can see).
* **The step never makes the host wait for the GPU** (CUDA's sync debug mode watches the
  warm-up steps that compiled nothing: compiling reads example values): an op that falls back to a path reading the length on the host (the
  dequantized decode for shapes the Triton kernels do not take) would break a recording.
* **Positions are inputs**: the runner passes ``position_ids`` (and ``cache_position`` where
  the model takes it) from static buffers it refills before each replay.
* **The storage does not move**: before warming up the runner reserves ``headroom`` tokens
  (``QuantizedCache.reserve``); after that many replays, or if a layer's state tensors were
  replaced, it drops the graph, reserves again, warms up and records a new one.
* **The host bookkeeping of a step is integer increments.** Capturing runs the step's Python
  once (kernels are recorded, not run); the runner compares every layer's attributes before
  and after, restores them, and applies the integer differences (a ``QuantizedKVLayer``'s
  ``length`` += 1) after each replay. Any other change refuses.

Sliding-window layers are refused (their cache trims, that is reallocates, between calls), as
are padded batches (no attention mask is passed). Everything refused runs the normal compiled
step instead, so results never depend on whether a graph was used; ``reason`` says why.

    fast = longfx.compile(model, "kv_quant(bits=4)")
    runner = DecodeGraph(fast, fast.longfx_new_cache())
    tokens = runner.generate(input_ids, max_new_tokens=256)     # greedy
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch

__all__ = ["DecodeGraph", "DecodeGraphError"]


@contextlib.contextmanager
def _host_syncs():
    """Collect the warnings of CUDA's sync debug mode (``torch.cuda.set_sync_debug_mode``)
    raised inside: every operation that makes the host wait for the GPU (``.item()``, a
    device-to-host copy) — what a CUDA graph recording refuses. Nothing is collected off CUDA."""
    found: list[str] = []
    if not torch.cuda.is_available():
        yield found
        return
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(old)
    mark = "called a synchronizing CUDA operation"
    found += [str(w.message) for w in caught if mark in str(w.message)]
    for w in caught:                                 # hand the others on
        if mark not in str(w.message) and "Synchronization debug mode" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class DecodeGraphError(ValueError):
    """The model or cache cannot be driven by :class:`DecodeGraph` at all."""


class DecodeGraph:
    """Run one-token decode steps of ``model`` (from ``longfx.compile``) over ``cache`` (a
    longfx ``QuantizedCache``), replaying a CUDA graph once the step is proven replayable.

    ``headroom``: tokens of storage reserved per recording (a new recording after that many
    steps); ``warmup``: normal steps that must run the same compiled graph before recording.
    Counters: ``normal_steps``, ``replays``, ``captures``; ``reason`` is why the last step ran
    normally (None while replaying)."""

    def __init__(self, model: torch.nn.Module, cache: Any, *, headroom: int = 1024,
                 warmup: int = 2):
        backend = getattr(model, "longfx_backend", None)
        if backend is None:
            raise DecodeGraphError("DecodeGraph drives a model from longfx.compile(...) "
                                   "(it reads which compiled graphs a step runs)")
        if not callable(getattr(cache, "reserve", None)) or not hasattr(cache, "layers"):
            raise DecodeGraphError(f"DecodeGraph needs a longfx cache that reserves storage "
                                   f"(QuantizedCache), got {type(cache).__name__}")
        windowed = [i for i, layer in enumerate(cache.layers)
                    if getattr(layer, "window", None) is not None]
        if windowed:
            raise DecodeGraphError(f"layers {windowed} keep a sliding window: their storage "
                                   f"is trimmed (reallocated) between calls, which a recorded "
                                   f"graph cannot follow")
        if headroom < 1 or warmup < 2:
            raise DecodeGraphError(f"headroom must be >= 1 and warmup >= 2, got {headroom}, "
                                   f"{warmup}")
        self.model, self.cache, self.backend = model, cache, backend
        self.headroom, self.warmup = headroom, warmup
        self.takes_cache_position = "cache_position" in inspect.signature(
            model.forward).parameters
        self.normal_steps = self.replays = self.captures = 0
        self.reason: str | None = "not recorded yet"
        self._failed: str | None = None      # why no recording can work: not tried again
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids = self._pos = self._cpos = None
        self._logits: torch.Tensor | None = None
        self._runs: list[list[tuple[int, dict[int, int]]]] = []   # calls of recent steps
        self._left = 0                       # replays the reserved storage still holds
        self._storage: list[Any] = []        # each layer's state tensors when recorded
        self._deltas: list[tuple[Any, str, int]] = []              # (object, attr, +n) a step

    # ------------------------------------------------------------------ public

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``input_ids`` [B, 1] -> logits [B, 1, vocab]. The returned tensor
        is the graph's output buffer when replayed: the next step overwrites it (clone it to
        keep it)."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"a decode step takes input_ids [B, 1], got {tuple(input_ids.shape)}")
        if self._graph is not None and self._still_valid(input_ids):
            self._fill(input_ids)
            self._graph.replay()
            for obj, attr, n in self._deltas:
                setattr(obj, attr, getattr(obj, attr) + n)
            self._left -= 1
            self.replays += 1
            return self._logits
        return self._normal(input_ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 prefill_chunk: int | None = None) -> torch.Tensor:
        """Greedy decoding: prefill ``input_ids`` [B, L] through the compiled model (in
        ``prefill_chunk``-token calls when given), then ``max_new_tokens`` steps. Returns the
        new tokens [B, max_new_tokens]."""
        chunk = prefill_chunk or input_ids.shape[1]
        for s in range(0, input_ids.shape[1], chunk):
            out = self.model(input_ids=input_ids[:, s:s + chunk], past_key_values=self.cache,
                             use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        new = [tok]
        for _ in range(max_new_tokens - 1):
            tok = self.step(tok).argmax(-1)
            new.append(tok)
        return torch.cat(new, 1)

    # ------------------------------------------------------------------ steps

    def _kwargs(self) -> dict[str, Any]:
        kw = dict(input_ids=self._ids, position_ids=self._pos, past_key_values=self.cache,
                  use_cache=True)
        if self.takes_cache_position:
            kw["cache_position"] = self._cpos
        return kw

    def _fill(self, input_ids: torch.Tensor) -> None:
        pos = self.cache.get_seq_length()
        self._ids.copy_(input_ids)
        self._pos.fill_(pos)
        self._cpos.fill_(pos)

    def _buffers(self, input_ids: torch.Tensor) -> None:
        if self._ids is None or self._ids.shape != input_ids.shape \
                or self._ids.device != input_ids.device:
            self._ids = torch.empty_like(input_ids)
            self._pos = torch.empty_like(input_ids)
            self._cpos = torch.empty(1, dtype=input_ids.dtype, device=input_ids.device)
            self._runs.clear()

    @torch.no_grad()
    def _normal(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A step through the compiled model (recording which graphs ran), then a recording
        for the next step when the last ``warmup`` steps show it is replayable."""
        if self._graph is not None:                       # storage used up or moved
            self._graph = None
            self._runs.clear()
        if not self._runs:
            self.cache.reserve(self.headroom + self.warmup)
        self._buffers(input_ids)
        self._fill(input_ids)
        self.backend.calls = []
        compiled = len(self.backend.int_inputs_read)
        try:
            with _host_syncs() as syncs:
                out = self.model(**self._kwargs())
        finally:
            calls, self.backend.calls = self.backend.calls, None
        if len(self.backend.int_inputs_read) > compiled:
            syncs = []     # compiling reads example values on the host: says nothing of a step
        if syncs:          # e.g. an op's fallback that reads the length on the host
            self._failed = (f"a step waits for the GPU on the host ({syncs[0][:160]}), which a "
                            f"recording cannot do (an op runs a fallback for these shapes?)")
        self._runs = (self._runs + [calls])[-self.warmup:]
        self.normal_steps += 1
        self.reason = self._failed or self._replayable(input_ids)
        if self.reason is None:
            self.reason = self._capture()
            if self.reason is not None and self.reason.startswith("recording failed"):
                self._failed = self.reason              # it would fail every step: stop trying
        return out.logits

    def _replayable(self, input_ids: torch.Tensor) -> str | None:
        """None when the recent steps show a recorded step would be right; else why not."""
        if not input_ids.is_cuda:
            return "CUDA graphs need a CUDA device"
        if len(self._runs) < self.warmup:
            return f"warming up ({len(self._runs)} of {self.warmup} steps)"
        graphs = [[i for i, _ in calls] for calls in self._runs]
        if not graphs[-1]:
            return "the step ran no compiled graph"
        if any(g != graphs[-1] for g in graphs):
            return (f"the compiled graphs changed between steps ({graphs}): Dynamo recompiles, "
                    f"so a step's integers may be baked in")
        for index in graphs[-1]:
            changing = self._reads_changing_ints(index)
            if changing:
                return (f"compiled graph {index} reads host integers (inputs "
                        f"{changing}): its decode is not lowered onto a "
                        f"state that keeps its length on the device (e.g. fuse=false, gear, "
                        f"or a site another recipe took)")
        if any(getattr(layer, "sink", 0) > getattr(layer, "length", 0)
               for layer in self.cache.layers):
            return "the sink copy is still filling"
        return None

    def _reads_changing_ints(self, index: int) -> list[int]:
        """Integer inputs of compiled graph ``index`` that a tensor computation reads and whose
        value changed over the warm-up steps (a length: it changes every step). A steady one
        is a batch or capacity Dynamo made dynamic, or a recipe constant it made dynamic
        after another recipe in the process used another value (``bits``): the recording
        bakes it in, and is dropped when the ids' shape or the storage changes."""
        seen = [args for calls in self._runs for i, args in calls if i == index]
        return [p for p in self.backend.int_inputs_read[index]
                if len({args.get(p) for args in seen}) != 1]

    def _snapshot(self) -> dict[tuple[int, str], Any]:
        out = {}
        for obj in (self.cache, *self.cache.layers):
            for attr, value in vars(obj).items():
                out[(id(obj), attr)] = value
        return out

    def _capture(self) -> str | None:
        """Record one step (kernels are recorded, not run), put the host state back as it was
        and keep the per-step integer differences. None when recorded, else why not."""
        objects = {id(o): o for o in (self.cache, *self.cache.layers)}
        before = self._snapshot()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        self.backend.calls = []
        try:
            with torch.cuda.graph(graph, stream=stream):
                out = self.model(**self._kwargs())
        except Exception as e:  # noqa: BLE001 - e.g. a host sync inside the step: not recordable
            torch.cuda.current_stream().wait_stream(stream)
            for key, value in before.items():          # the step's Python ran part-way
                setattr(objects[key[0]], key[1], value)
            return f"recording failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        finally:
            calls, self.backend.calls = self.backend.calls, None
        torch.cuda.current_stream().wait_stream(stream)
        after = self._snapshot()
        deltas, bad = [], []
        for key, value in after.items():
            old = before.get(key, object())
            if old is value:
                continue
            obj, attr = objects[key[0]], key[1]
            if isinstance(value, int) and isinstance(old, int) \
                    and not isinstance(value, bool) and not isinstance(old, bool):
                if value != old:
                    deltas.append((obj, attr, value - old))
                    setattr(obj, attr, old)
            else:
                bad.append(f"{type(obj).__name__}.{attr}")
        if bad:
            for key, value in before.items():          # put everything back
                setattr(objects[key[0]], key[1], value)
            return f"a step changes {sorted(set(bad))} on the host, not only integers"
        if [i for i, _ in calls] != [i for i, _ in self._runs[-1]]:
            return "recording ran other compiled graphs than the step before it"
        self._graph = graph
        self._logits = out.logits
        self._deltas = deltas
        self._left = self.headroom
        self._storage = self._held()
        self.captures += 1
        return None

    def _held(self) -> list[Any]:
        """Each layer's packed-code tensors: growth (``_reserve``), a trim, beam reordering or
        a reset replace them, and a recorded graph would write to the old ones."""
        out = []
        for layer in self.cache.layers:
            st = getattr(layer, "state", None)
            out += [getattr(st, "k_codes", None), getattr(st, "v_codes", None)]
        return out

    def _fits(self) -> bool:
        """Whether every layer's packed storage takes one more token (the append kernels do
        not check: kernels/kv_quant/op.py)."""
        from longfx.kernels.kv_quant.reference import n_packed

        for layer in self.cache.layers:
            st = getattr(layer, "state", None)
            if st is not None and n_packed(layer.length + 1, layer.config) > st.k_codes.shape[2]:
                return False
        return True

    def _still_valid(self, input_ids: torch.Tensor) -> bool:
        if self._left <= 0:
            self.reason = "the reserved storage is used up: recording again"
            return False
        if input_ids.shape != self._ids.shape or input_ids.device != self._ids.device:
            self.reason = "the batch changed: recording again"
            return False
        if any(a is not b for a, b in zip(self._held(), self._storage)):
            self.reason = "the cache's storage moved (grown or replaced): recording again"
            return False
        if not self._fits():
            self.reason = "the next token does not fit the storage (another caller appended)"
            return False
        self.reason = None
        return True
