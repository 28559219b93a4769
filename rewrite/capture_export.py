"""Export capture: an HF causal LM as a ``torch.export`` program with explicit KV state.

The exported forward is flat and state-explicit, so that later passes (and the ONNX export)
see the KV append as dataflow between graph inputs and outputs::

    dynamic cache:  (input_ids, attention_mask, position_ids, past.0.key, past.0.value, ...)
                 -> (logits, present.0.key, present.0.value, ...)
    static cache:   (input_ids, attention_mask, cache_position, past.0.key, past.0.value, ...)
                 -> (logits, present.0.key, present.0.value, ...)

Inside the forward a transformers ``DynamicCache`` (or ``StaticCache``) is built from the flat
tensors, the model runs unmodified, and the cache's tensors are returned. No transformers code
is patched; the model's ``forward`` is shadowed on the instance only while exporting, so module
paths in ``nn_module_stack`` are the model's own (``model.layers.0.self_attn``).

Modes and shapes (B batch, S new tokens, P past tokens, M ``max_cache_len``, Hkv/D per layer):

=============  ===========================================================  =================
mode / cache   inputs                                                       dynamic dims
=============  ===========================================================  =================
prefill/dyn.   ids [B,S], mask [B,S], position_ids [B,S]; no past           B, S
decode/dyn.    ids [B,1], mask [B,P+1], position_ids [B,1], past [B,Hkv,P,D] B, P
prefill/static ids [B,S], mask [B,M], cache_position [S], past [B,Hkv,M,D]  B, S
decode/static  ids [B,1], mask [B,M], cache_position [1], past [B,Hkv,M,D]  B
step/dyn.      ids [B,S], mask [B,P+S], position_ids [B,S], past [B,Hkv,P,D] B, S, P (P >= 0)
=============  ===========================================================  =================

``present`` is ``cat(past, new)`` ([B,Hkv,P+S,D]) for the dynamic cache and the updated buffers
([B,Hkv,M,D], written in place by ``index_copy_`` and also returned) for the static cache.
Prefill with a dynamic cache has no past inputs: transformers starts each layer from an empty
``torch.tensor([])``, which export keeps as a lifted constant (``cat(lift_fresh_copy(c), k)``).

Notes:
* The dynamic cache uses plain ``DynamicLayer`` s for every layer, sliding or not: the whole past
  is kept and the sliding window is applied by the attention mask (the logits equal those of
  transformers' default trimmed ``DynamicSlidingWindowLayer``; only the returned state is longer).
  With ``windows=`` (mode "step"), a sliding layer keeps only its last ``window − 1`` tokens,
  as ``DynamicSlidingWindowLayer`` does (:class:`WindowLayer`): its past is ``[B, Hkv, Pw, D]``
  with Pw = min(tokens seen, window − 1), its own dim ``window_past`` (``window_past_<W>``
  when the model has several windows), and the tokens seen are read off the mask
  (``attention_mask.shape[1] − S``), not off the state.
* The static cache replaces ``StaticSlidingWindowLayer`` by a full ``StaticLayer(M)`` (same as
  ``transformers.integrations.executorch``: the sliding layer has Python control flow on its
  fill level); the window is again applied by the mask.
* ``step`` is prefill and decode in one program (what an ONNX decoder needs): S new tokens
  after P past ones, both dynamic, P = 0 allowed at run time (prefill with an empty past).
  The mask's length P+S is a sum of two dims, which ``Dim`` cannot state; it is marked
  ``Dim.AUTO`` and export records the relation as runtime asserts.
* A dynamic dim is traced at size >= 2 (export specializes sizes 0 and 1); the program accepts
  size 1 at run time. ``example_inputs`` are at the requested sizes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


class CaptureError(RuntimeError):
    """The model (or one mode of it) could not be captured faithfully; the message says what."""


@dataclass
class ExportCapture:
    """An exported, state-explicit program and how its inputs and outputs are named."""

    program: torch.export.ExportedProgram
    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple
    mode: str
    cache: str
    # input/output name -> {axis: symbol name}, for the dims that are dynamic ("batch", ...)
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    num_layers: int = 0
    # the exported form of a recipe's KV state (runtime/export_state.py), None: the plain cache
    state: Any = None
    # per layer: the window a sliding layer's state is trimmed to (``windows=``), else None
    windows: list = field(default_factory=list)
    _module: Any = field(default=None, repr=False)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the program on flat inputs (``input_names`` order); outputs in ``output_names``
        order. With a static cache the ``past`` buffers are updated in place, as in the model."""
        if not inputs:   # copies: a static cache's buffers are written in place
            inputs = tuple(x.clone() for x in self.example_inputs)
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, "
                            f"got {len(inputs)}")
        if self._module is None:
            self._module = self.program.module()
        with torch.no_grad():
            out = self._module(*inputs)
        return tuple(out)

    def input_node(self, name: str) -> fx.Node:
        """The placeholder of user input ``name`` (``"past.0.key"``...)."""
        i = self.input_names.index(name)
        return self.user_input_nodes()[i]

    def output_node(self, name: str) -> fx.Node:
        """The node producing output ``name`` (``"present.1.value"``...)."""
        i = self.output_names.index(name)
        return self.user_output_nodes()[i]

    def user_input_nodes(self) -> list[fx.Node]:
        by_name = {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}
        return [by_name[s.arg.name] for s in self.program.graph_signature.input_specs
                if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]

    def user_output_nodes(self) -> list[fx.Node]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        by_name = {n.name: n for n in out.all_input_nodes}
        return [by_name[s.arg.name] for s in self.program.graph_signature.output_specs
                if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]


# ----------------------------------------------------------------------------------------------
# Layout of the model's KV state


@dataclass(frozen=True)
class _KVLayout:
    num_layers: int
    shapes: tuple[tuple[int, int, int], ...]   # per layer: (Hkv, Dk, Dv)
    dtype: torch.dtype


def _kv_layout(model: torch.nn.Module, device: torch.device) -> _KVLayout:
    """Probe one eager token to learn each layer's KV heads and head dims (no config guessing)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{type(model).__name__}: an eager forward with a DynamicCache "
                           f"failed, so the KV layout is unknown: {type(e).__name__}: {e}") from e
    if getattr(out, "logits", None) is None:
        raise CaptureError(f"{type(model).__name__} returns no logits: capture_export takes a "
                           "causal LM (a ...ForCausalLM / LM-head model)")
    shapes = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None:
            raise CaptureError(f"{type(model).__name__}: cache layer {i} is "
                               f"{type(layer).__name__} (KV sharing, linear or recurrent state); "
                               "only attention layers with their own K/V are captured")
        k, v = layer.keys, layer.values
        if k.dim() != 4 or v.dim() != 4 or k.shape[1] != v.shape[1]:
            raise CaptureError(f"layer {i}: K/V of shapes {tuple(k.shape)}/{tuple(v.shape)} "
                               "are not [B, Hkv, S, D]")
        shapes.append((int(k.shape[1]), int(k.shape[-1]), int(v.shape[-1])))
    if not shapes:
        raise CaptureError(f"{type(model).__name__}: the model wrote no KV cache")
    return _KVLayout(len(shapes), tuple(shapes), cache.layers[0].keys.dtype)


# ----------------------------------------------------------------------------------------------
# The flat forward


def window_dim(window: int, windows: list[int | None]) -> str:
    """The name of a sliding layer's past dim: ``window_past``, or ``window_past_<W>`` when the
    model's sliding layers have more than one window."""
    return "window_past" if len({w for w in windows if w}) == 1 else f"window_past_{window}"


def window_export_dims(windows: list[int | None] | None) -> dict[int, Any]:
    """Per trimmed sliding layer (its index): the ``torch.export.Dim`` of its past, named by
    :func:`window_dim`, 0 .. window − 1; layers with one window share one Dim."""
    made: dict[str, Any] = {}
    out = {}
    for i, w in enumerate(windows or []):
        if w:
            name = window_dim(w, windows)
            out[i] = made.setdefault(name, torch.export.Dim(name, min=0, max=w - 1))
    return out


def _window_layer_class():
    from transformers.cache_utils import DynamicLayer

    class WindowLayer(DynamicLayer):
        """A sliding layer's state in an exported step: transformers'
        ``DynamicSlidingWindowLayer`` written without branches on sizes, so that one program
        serves every fill level. It holds the last Pw = min(seen, window − 1) tokens; ``seen``
        (tokens before this step, padding included) is a size read off the mask. ``update``
        returns the past and the step's tokens (what attention reads, as transformers' layer
        returns) and keeps the last min(Pw + S, window − 1) of them, gathered with
        ``index_select`` over ``arange(n) + (Pw + S − n)``: a slice with a negative start
        made torch.export guard on whether the window is full. ``get_mask_sizes`` gives
        (Pw + S, seen − Pw): stored token j stands at position seen − Pw + j, so the model's
        sliding mask and padding mask line up, exactly as transformers' (seen − window + 1
        once full, 0 before)."""

        is_sliding = True

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: int, seen):
            super().__init__()
            self.sliding_window = int(window)
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys, values
            self.seen = seen
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            full_k = torch.cat([self.keys, key_states], dim=-2)         # [B, Hkv, Pw + S, D]
            full_v = torch.cat([self.values, value_states], dim=-2)
            total = full_k.shape[-2]
            keep = torch.sym_min(total, self.sliding_window - 1)
            idx = torch.arange(keep, device=full_k.device) + (total - keep)
            self.keys = full_k.index_select(2, idx)                     # [B, Hkv, keep, D]
            self.values = full_v.index_select(2, idx)
            self.seen = self.seen + key_states.shape[-2]
            return full_k, full_v

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            held = self.keys.shape[-2]
            return held + query_length, self.seen - held

        def get_seq_length(self):
            return self.seen

        def get_max_length(self) -> int:
            return self.sliding_window

    return WindowLayer


def _dynamic_cache(past: list[torch.Tensor], windows: list[int | None] | None = None,
                   seen=None):
    """A ``DynamicCache`` over the flat past; with ``windows``, the sliding layers are
    :class:`WindowLayer` s that have seen ``seen`` tokens."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    window_layer = _window_layer_class() if windows and any(windows) else None
    cache = DynamicCache()
    for i in range(0, len(past), 2):
        w = windows[i // 2] if windows else None
        if w:
            cache.layers.append(window_layer(past[i], past[i + 1], w, seen))
            continue
        layer = DynamicLayer()
        # Set the state directly (not through update(), which would add a cat(empty, past)).
        layer.dtype, layer.device = past[i].dtype, past[i].device
        layer.keys, layer.values = past[i], past[i + 1]
        layer.is_initialized = True
        cache.layers.append(layer)
    return cache


def _static_cache(config, max_cache_len: int, past: list[torch.Tensor],
                  cache_position: torch.Tensor):
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(cache.layers) != len(past) // 2:
        raise CaptureError(f"StaticCache has {len(cache.layers)} layers, the model wrote "
                           f"{len(past) // 2}")
    for i in range(len(cache.layers)):
        layer = StaticLayer(max_cache_len)   # sliding layers too: see the module docstring
        k, v = past[2 * i], past[2 * i + 1]
        layer.dtype, layer.device = k.dtype, k.device
        layer.batch_size, layer.num_heads = k.shape[0], k.shape[1]
        layer.k_head_dim, layer.v_head_dim = k.shape[-1], v.shape[-1]
        layer.keys, layer.values = k, v
        # The layer computes its write positions as arange(S) + cumulative_length, in place.
        layer.cumulative_length = cache_position[0].clone()
        layer.is_initialized = True
        cache.layers[i] = layer
    return cache


def _state_names(num_layers: int, state) -> list[tuple[int, str]]:
    """(layer, tensor name) of every state input, in order: key/value, or the state's names."""
    roles = state.names() if state is not None else ("key", "value")
    return [(i, r) for i in range(num_layers) for r in roles]


def _make_forward(model, *, cache: str, num_layers: int, max_cache_len: int, has_past: bool,
                  state=None, windows: list[int | None] | None = None):
    """A forward with named flat parameters (export names placeholders after them)."""
    config = model.config.get_text_config(decoder=True)
    model_forward = type(model).forward
    third = "cache_position" if cache == "static" else "position_ids"
    past_params = [f"past_{i}_{r}" for i, r in _state_names(num_layers, state)]
    params = ["input_ids", "attention_mask", third] + (past_params if has_past else [])

    def body(self, input_ids, attention_mask, pos, past):
        if cache == "static":
            kv = _static_cache(config, max_cache_len, past, pos)
            # position_ids [B, S] from cache_position [S]
            position_ids = pos.unsqueeze(0).expand(input_ids.shape[0], -1)
        elif state is not None:
            kv = state.cache(past, num_layers)
            position_ids = pos
        else:
            seen = attention_mask.shape[1] - input_ids.shape[1] if windows else None
            kv = _dynamic_cache(past, windows, seen)
            position_ids = pos
        out = model_forward(self, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=kv, use_cache=True)
        logits = out.logits
        if state is not None:
            return (logits, *state.present(kv))
        present = []
        for layer in kv.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)

    src = (f"def forward(self, {', '.join(params)}):\n"
           f"    return body(self, input_ids, attention_mask, {third}, "
           f"[{', '.join(past_params) if has_past else ''}])\n")
    scope: dict[str, Any] = {"body": body}
    exec(src, scope)  # noqa: S102 - a fixed template; only the parameter names vary
    return scope["forward"], params


@contextlib.contextmanager
def _no_causal_skip_probe():
    """transformers' ``_ignore_causal_mask_sdpa`` answers False whenever it runs under
    ``torch.export`` (its padding mask is a traced tensor), but before answering it selects the
    padding mask's columns when the mask is longer than the keys, a branch on sizes. With a
    trimmed sliding layer that comparison is ``seen > Pw``, true once the window is full and
    false before, and export would keep the traced side as a runtime assert. Answering False
    at once is the same answer without the branch; restored afterwards."""
    from transformers import masking_utils

    probe = masking_utils._ignore_causal_mask_sdpa
    masking_utils._ignore_causal_mask_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = probe


@contextlib.contextmanager
def _shadow_forward(model: torch.nn.Module, forward):
    """Bind ``forward`` on the instance only (the class and other instances are untouched)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = forward.__get__(model)
    try:
        yield model
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


# ----------------------------------------------------------------------------------------------


def capture_export(model: torch.nn.Module, *, mode: str = "prefill", cache: str = "dynamic",
                   batch: int = 1, seq_len: int = 8, past_len: int = 8,
                   max_cache_len: int = 64, dynamic: bool = True,
                   check: bool = True, state: Any = None,
                   windows: list[int | None] | None = None) -> ExportCapture:
    """Export ``model`` (an HF causal LM) with its KV state as explicit inputs and outputs.

    ``mode``: "prefill" (``seq_len`` new tokens, no past / empty static buffers), "decode"
    (one new token after ``past_len`` past tokens) or "step" (``seq_len`` new tokens after
    ``past_len`` past ones, both dynamic; dynamic cache only). ``cache``: "dynamic" (past grows by ``cat``)
    or "static" (``max_cache_len`` buffers written by ``index_copy_``). ``dynamic``: mark the
    batch, new-token and past dims dynamic (see the module docstring for which, per mode).
    ``check``: run the program once against the eager forward and raise :class:`CaptureError`
    if it differs (an export that silently specialized something).
    ``state``: the exported form of a recipe's KV state (``runtime/export_state.py``:
    ``QuantizedState`` for ``kv_quant``) in place of the ``DynamicCache``; mode "step" only.
    Its inputs are ``past.{i}.{name}`` for each of its tensor names; the traced past is sized
    by the state (``trace_tokens``), ``past_len`` tokens appended to an empty state are the
    examples.
    ``windows``: per layer, the window of a sliding layer (``runtime.cache.layer_windows(config,
    chunked=False)``) or None; those layers keep only their last window − 1 tokens
    (:class:`WindowLayer`, module docstring). Mode "step" with the plain dynamic cache only.
    """
    if mode not in ("prefill", "decode", "step"):
        raise ValueError(f"mode must be 'prefill', 'decode' or 'step', not {mode!r}")
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")
    if getattr(model, "config", None) is None or not hasattr(model.config, "get_text_config"):
        raise CaptureError(f"{type(model).__name__} is not a transformers PreTrainedModel "
                           "(no config): capture_export builds transformers caches")
    decode = mode == "decode"
    step = mode == "step"
    if step and cache != "dynamic":
        raise ValueError("mode='step' takes the dynamic cache")
    if state is not None and not step:
        raise ValueError("a recipe's state (state=...) is captured in mode='step' only")
    windows = list(windows) if windows and any(windows) else None
    if windows is not None and (not step or state is not None):
        raise ValueError("windows=... (trimmed sliding layers) is captured in mode='step' "
                         "with the plain dynamic cache only")
    seq = 1 if decode else seq_len
    past = past_len if (decode or step) else 0
    if cache == "static" and past + seq > max_cache_len:
        raise ValueError(f"past_len + new tokens ({past + seq}) exceed max_cache_len "
                         f"({max_cache_len})")
    if seq < 1 or batch < 1 or (decode and cache == "dynamic" and past < 1) or past < 0:
        raise ValueError("batch, seq_len and past_len (decode) must be >= 1")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        layout = _kv_layout(model, device)
        has_past = cache == "static" or decode or step
        if state is not None:
            state.check(layout.num_layers)
        forward, params = _make_forward(model, cache=cache, num_layers=layout.num_layers,
                                        max_cache_len=max_cache_len, has_past=has_past,
                                        state=state, windows=windows)

        # Dims marked dynamic are traced at >= 2 (0/1 specialization); examples keep the sizes
        # that were asked for.
        t_batch = max(batch, 2) if dynamic else batch
        t_seq = seq if (decode or not dynamic) else max(seq, 2)
        t_past = max(past, 2) if (dynamic and (decode or step) and cache == "dynamic") \
            else past
        if cache == "static" and t_past + t_seq > max_cache_len:
            t_seq = seq
        if state is not None and dynamic:     # a full tail, so that the traced step packs
            t_seq = max(t_seq, state.trace_seq(t_batch))
            seq = max(seq, t_seq)
            t_past = state.trace_tokens(t_batch, t_seq)
            # the program's guards carry the trace's >= 2 bounds (P + S >= 4 groups + 4 ...):
            # examples at the traced past; the ONNX export runs the guard-free copy at P = 0
            past = max(past, t_past)
        gen = torch.Generator(device="cpu").manual_seed(0)
        if windows is not None and len(windows) != layout.num_layers:
            raise ValueError(f"windows has {len(windows)} entries, the model "
                             f"{layout.num_layers} layers")
        trace_inputs = _inputs(model, layout, cache, t_batch, t_seq, t_past, max_cache_len,
                               has_past, device, gen, state, windows)
        examples = _inputs(model, layout, cache, batch, seq, past, max_cache_len, has_past,
                           device, torch.Generator(device="cpu").manual_seed(0), state, windows)
        dyn_shapes, dyn_dims = _dynamic_shapes(params, cache, decode, has_past, step, state,
                                               windows) if dynamic else (None, {})

        skip_probe = _no_causal_skip_probe() if windows else contextlib.nullcontext()
        with _shadow_forward(model, forward), torch.no_grad(), skip_probe:
            try:
                # Deferred runtime asserts: export's range check cannot simplify the
                # Min(...) stride guards that cat's contiguity check adds on the past length.
                program = torch.export.export(
                    model, tuple(trace_inputs), dynamic_shapes=dyn_shapes, strict=False,
                    prefer_deferred_runtime_asserts_over_guards=True)
            except CaptureError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a named CaptureError
                raise CaptureError(_explain(model, mode, cache, e)) from e

        input_names = ["input_ids", "attention_mask",
                       "cache_position" if cache == "static" else "position_ids"]
        output_names = ["logits"]
        for i, r in _state_names(layout.num_layers, state):
            if has_past:
                input_names.append(f"past.{i}.{r}")
            output_names.append(f"present.{i}.{r}")
        dyn_named = {_dotted(k): v for k, v in dyn_dims.items()}
        for i in range(layout.num_layers):   # what the outputs carry, for the reader
            if dynamic and state is not None:
                for r, axes in state.dims().items():
                    dyn_named[f"present.{i}.{r}"] = dict(axes)
            elif dynamic:
                axis2 = None if cache == "static" else \
                    ("past+1" if decode else "past+seq" if step else "seq")
                if windows and windows[i]:              # min(Pw + S, window − 1)
                    axis2 = window_dim(windows[i], windows)
                for r in ("key", "value"):
                    dyn_named[f"present.{i}.{r}"] = {0: "batch",
                                                     **({2: axis2} if axis2 else {})}
        if dynamic:
            dyn_named["logits"] = {0: "batch", **({} if decode else {1: "seq"})}

        cap = ExportCapture(program=program, gm=program.graph_module,
                            input_names=input_names, output_names=output_names,
                            example_inputs=tuple(examples), mode=mode, cache=cache,
                            dynamic_dims=dyn_named, num_layers=layout.num_layers,
                            state=state, windows=windows or [])
        n_out = len(cap.user_output_nodes())
        if n_out != len(output_names):
            raise CaptureError(f"the program has {n_out} outputs, expected {len(output_names)} "
                               f"({output_names[:3]}...)")
        if check:
            _check(model, forward, cap, trace_inputs, mode, cache)
            if [x.shape for x in examples] != [x.shape for x in trace_inputs]:
                _check(model, forward, cap, examples, mode, cache)
    finally:
        model.train(was_training)
    return cap


def _dotted(param: str) -> str:
    if param.startswith("past_"):
        _, i, r = param.split("_", 2)
        return f"past.{i}.{r}"
    return param


def _inputs(model, layout: _KVLayout, cache: str, batch: int, seq: int, past: int,
            max_cache_len: int, has_past: bool, device, gen, state=None,
            windows: list[int | None] | None = None) -> list[torch.Tensor]:
    vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", 0) or 2)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    total = max_cache_len if cache == "static" else past + seq
    mask = torch.ones(batch, total, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device)
    third = positions if cache == "static" else positions.unsqueeze(0).expand(batch, -1).clone()
    out = [ids, mask, third]
    if state is not None:                      # `past` random tokens appended to an empty state
        return out + state.example(layout.shapes, layout.dtype, batch, past, device, gen)
    if has_past:
        for i, (hkv, dk, dv) in enumerate(layout.shapes):
            length = max_cache_len if cache == "static" else past
            filled = past
            if windows and windows[i]:    # a trimmed sliding layer holds its last window − 1
                length = filled = min(past, windows[i] - 1)
            for d in (dk, dv):
                t = torch.zeros(batch, hkv, length, d, dtype=layout.dtype)
                if filled:   # a filled prefix (static: the first `past` slots, rest zeros)
                    t[:, :, :filled] = torch.randn(batch, hkv, filled, d, generator=gen)
                out.append(t.to(device))
    return out


def _dynamic_shapes(params: list[str], cache: str, decode: bool, has_past: bool,
                    step: bool = False, state=None, windows: list[int | None] | None = None):
    """Named dims shared by every input that carries them: ``batch``, ``seq`` (prefill, step)
    and ``past`` (decode with a dynamic cache, the mask's length is then ``past + 1``; step,
    ``past + seq``); a trimmed sliding layer's past is ``window_past`` (≤ window − 1)."""
    Dim = torch.export.Dim
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0 if step else 1)
    shapes: dict[str, Any] = {}
    names: dict[str, dict[int, str]] = {}
    seq_dyn = not decode
    state_dims = state.export_dims(batch) if state is not None else {}
    window_dims = window_export_dims(windows)
    for p in params:
        if p in ("input_ids", "position_ids"):      # [B, S]
            shapes[p] = {0: batch, 1: seq} if seq_dyn else {0: batch}
            names[p] = {0: "batch", 1: "seq"} if seq_dyn else {0: "batch"}
        elif p == "attention_mask":
            if cache == "static":                   # [B, M]
                shapes[p], names[p] = {0: batch}, {0: "batch"}
            elif step:                              # [B, P+S]: a sum of dims, AUTO
                shapes[p], names[p] = {0: batch, 1: Dim.AUTO}, {0: "batch", 1: "past+seq"}
            elif decode:                            # [B, P+1]
                shapes[p], names[p] = {0: batch, 1: past + 1}, {0: "batch", 1: "past+1"}
            else:                                   # [B, S]
                shapes[p], names[p] = {0: batch, 1: seq}, {0: "batch", 1: "seq"}
        elif p == "cache_position":                 # [S]
            shapes[p] = {0: seq} if seq_dyn else None
            names[p] = {0: "seq"} if seq_dyn else {}
        elif state is not None:                     # past.{i}.{name}: the state's own dims
            name = p.split("_", 2)[2]
            shapes[p], names[p] = state_dims[name], state.dims()[name]
        elif cache == "dynamic" and int(p.split("_")[1]) in window_dims:
            dim = window_dims[int(p.split("_")[1])]         # past [B, Hkv, Pw, D], Pw < window
            shapes[p], names[p] = {0: batch, 2: dim}, {0: "batch", 2: dim.__name__}
        elif cache == "dynamic":                    # past [B, Hkv, P, D]
            shapes[p], names[p] = {0: batch, 2: past}, {0: "batch", 2: "past"}
        else:                                       # static buffer [B, Hkv, M, D]
            shapes[p], names[p] = {0: batch}, {0: "batch"}
    return shapes, names


def _explain(model, mode: str, cache: str, e: Exception) -> str:
    """A one-paragraph reason naming what export could not capture."""
    msg = str(e).strip()
    first = "\n".join(msg.splitlines()[:12])
    name = type(e).__name__
    what = f"{type(model).__name__} ({mode}, {cache} cache)"
    where = _user_frame(e)
    if where:
        what += f" at {where}"
    if "GuardOnDataDependentSymNode" in name or "data-dependent" in msg or "data dependent" in msg:
        why = "a data-dependent branch or size (Python control flow on tensor values)"
    elif "specialized" in msg or "Constraints violated" in msg:
        why = "a dimension marked dynamic was specialized (code branches on its size)"
    elif "Unsupported" in name or "graph break" in msg.lower():
        why = "an operation torch.export cannot trace"
    else:
        why = "torch.export failed"
    return f"could not export {what}: {why}: {name}: {first}"


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch and longfx: the model code that failed."""
    import os
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    best = ""
    for frame in traceback.extract_tb(e.__traceback__):
        f = os.path.abspath(frame.filename)
        if f.startswith(torch_dir) or f.startswith(here) or frame.filename == "<string>":
            continue
        line = (frame.line or "").strip()
        best = f"{os.path.basename(f)}:{frame.lineno} in {frame.name} ({line})"
    return best


def _check(model, forward, cap: ExportCapture, inputs, mode: str, cache: str) -> None:
    """Program vs eager on the same inputs; a mismatch means export baked in something wrong."""
    clone = lambda xs: [x.clone() for x in xs]  # noqa: E731 - static buffers are written
    with torch.no_grad():
        ref = forward(model, *clone(inputs))
        got = cap.run(*clone(inputs))
    for name, r, g in zip(cap.output_names, ref, got):
        if r.shape != g.shape:
            raise CaptureError(f"{type(model).__name__} ({mode}, {cache}): output {name} has "
                               f"shape {tuple(g.shape)} in the program, {tuple(r.shape)} eager")
        scale = r.abs().max().clamp_min(1e-6)
        err = ((r - g).abs().max() / scale).item()
        tol = 1e-4 if r.dtype == torch.float32 else 5e-2
        if not err <= tol:
            raise CaptureError(f"{type(model).__name__} ({mode}, {cache}): output {name} "
                               f"differs from eager by {err:.2e} (relative) at the example "
                               f"inputs of shapes {[tuple(x.shape) for x in inputs]}")


__all__ = ["CaptureError", "ExportCapture", "capture_export", "window_dim",
           "window_export_dims"]
