"""Export a rewritten causal LM to ONNX: one decoder graph for prefill and decode, KV state
explicit, plus a JSON file that describes the state.

    capture (torch.export, mode="step")  ──►  rewrite (canonical + recipe rules)
        ──►  torch.export of the rewritten graph  ──►  torch.onnx (dynamo) with a translation
             for each longfx op (kernels/*/onnx.py)  ──►  DIR/model.onnx + DIR/longfx_onnx.json

The graph (B batch, S new tokens, P past tokens; all three dynamic, P = 0 at prefill)::

    input_ids [B, S] int64, attention_mask [B, P+S] int64 (1 = real token, 0 = padding),
    position_ids [B, S] int64, past.{i}.key / past.{i}.value [B, Hkv_i, P, D_i]
      -> logits [B, S, V], present.{i}.key / present.{i}.value [B, Hkv_i, P+S, D_i]

One graph for both phases: prefill is a step with an empty past (P = 0). ``torch.export``
specializes a dim it *traces* at 0 or 1, so the program is traced at B=2, S=3, P=4 with P
declared ``min=0``; nothing in the decoder branches on P, onnxruntime accepts 0-sized dims
(``Concat`` of an empty past is the new keys), and the parity tests run prefill at P = 0
exactly that way. ``present`` is ``concat(past, new)`` on axis 2: the next step's ``past``.

What the recipes change survives: sparse sites become a mask built from the run-time lengths
(kernels/sparse_attention/onnx.py), RoPE recipes rewrote the frequency table the graph
computes, and models whose own masks slide (Mistral, Gemma 2/3 local layers) keep them because
transformers' mask code is in the exported graph. A sliding layer's state holds only its last
window − 1 tokens, as transformers' own ``DynamicSlidingWindowLayer`` does
(``past.{i}.key`` [B, Hkv_i, Pw, D_i] with Pw = min(tokens seen, window − 1), dim
``window_past``; rewrite/capture_export.py ``WindowLayer``): on Gemma 3, 5 of every 6 layers stop
growing with the context. Full and chunked layers keep the whole past.

With ``kv_quant(...)`` in the recipe the state is the quantized one instead
(runtime/export_state.py, kernels/kv_quant/concat_state.py): per layer packed codes, scales, a
full-precision tail and the sink copy, quantized on append inside the graph
(``past.{i}.k_codes`` ... ``present.{i}.sink_v``; docs/onnx.md lists them). Other recipes that
replace the runtime cache (gear, eviction, think, minicache) raise :class:`OnnxExportError`.

Nothing is half-written: the files are made in a temporary folder beside the destination and
moved into place at the end. An op without an ONNX translation raises
:class:`OnnxExportError` naming it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

META_FILE = "longfx_onnx.json"
MODEL_FILE = "model.onnx"
FORMAT = "longfx-onnx/1"
OPSET = 23
TARGETS = ("opset23", "decomposed")

# Trace sizes: every dynamic dim >= 2 (export specializes 0 and 1), all different.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 4


class OnnxExportError(RuntimeError):
    """The model (or an op in its rewritten graph) cannot be exported; the message says what."""


def translation_table(target: str = "opset23") -> dict[Any, Callable]:
    """{longfx op: onnxscript translation} for ``torch.onnx.export(custom_translation_table=)``.

    ``"opset23"``: attention and sparse attention as ONNX ``Attention`` (opset 23) nodes.
    ``"decomposed"``: as MatMul / Softmax / Where (runtimes without ``Attention``-23).
    RoPE is element-wise math in both (see kernels/rope/onnx.py for why).
    """
    from longfx.kernels.attention import onnx as attention_onnx
    from longfx.kernels.attention.op import OP as ATTENTION
    from longfx.kernels.rope import onnx as rope_onnx
    from longfx.kernels.rope.op import OP as ROPE
    from longfx.kernels.sparse_attention import onnx as sparse_onnx
    from longfx.kernels.sparse_attention.op import OP as SPARSE

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    decomposed = target == "decomposed"
    return {
        ATTENTION: attention_onnx.attention_decomposed if decomposed else attention_onnx.attention,
        SPARSE: sparse_onnx.sparse_attention_decomposed if decomposed
        else sparse_onnx.sparse_attention,
        ROPE: rope_onnx.rope,
    }


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and what it was made from."""

    path: Path                                # the folder
    onnx_path: Path
    meta: dict[str, Any]
    graph: fx.GraphModule = field(repr=False)  # the rewritten graph (flat inputs -> outputs)
    report: Any = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.meta["outputs"]]

    def run_torch(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rewritten torch graph on flat inputs (``input_names`` order): what the ONNX
        file must compute."""
        with torch.no_grad():
            return tuple(self.graph(*inputs))


# ----------------------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, recipe: Any = "", *,
                target: str = "opset23", tokenizer: Any = None, check: bool = True,
                optimize: bool = True, verbose: bool = False) -> OnnxExport:
    """Rewrite ``model`` (an HF causal LM) with ``recipe`` and write it to ONNX.

    ``path``: a folder (created; ``model.onnx`` and ``longfx_onnx.json`` go in it), or a file
    name ending in ``.onnx`` (the JSON goes beside it, in the same folder). ``tokenizer``: an HF
    tokenizer saved beside the model (``tokenizer.json``...) so the folder is self-contained;
    taken from ``model.longfx_tokenizer`` when the model was loaded with :func:`longfx.load`.
    ``target``: see :func:`translation_table`. ``check``: run the file once in onnxruntime
    (prefill with an empty past, then a decode step) against the rewritten torch graph and
    raise if the logits differ by more than 1e-4 relative (fp32). ``optimize``: the ONNX
    exporter's graph optimization (constant folding; onnxruntime optimizes again at load).
    """
    from longfx.api import _pipeline, model_facts
    from longfx.rewrite.capture_export import CaptureError, capture_export
    from longfx.rewrite.engine import rewrite_graph
    from longfx.runtime.cache import layer_windows
    from longfx.runtime.export_state import state_for

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    pipeline = _pipeline(recipe)
    table = translation_table(target)
    dest_dir, onnx_name = _destination(path)
    try:
        state = state_for(pipeline)       # kv_quant(...): the quantized state, else the plain cache
    except ValueError as e:
        raise OnnxExportError(str(e)) from None

    # 1. capture: S new tokens after P past ones, both dynamic
    t0 = time.perf_counter()
    try:
        # the plain state trims sliding layers to their window; a recipe's state keeps them whole
        windows = layer_windows(getattr(model, "config", None), chunked=False) \
            if state is None else None
        cap = capture_export(model, mode="step", cache="dynamic", batch=TRACE_BATCH,
                             seq_len=TRACE_SEQ, past_len=TRACE_PAST, check=check, state=state,
                             windows=windows)
    except (CaptureError, ValueError) as e:
        raise OnnxExportError(f"capture failed: {e}") from e
    timings["capture_s"] = time.perf_counter() - t0

    # 2. rewrite: canonical ops, then the recipe's transforms
    t0 = time.perf_counter()
    facts = model_facts(model)
    # a KV-cache recipe's rules lower the runtime cache's ops, which the exported state has not
    rules = [rule for r in pipeline.recipes if not callable(getattr(r, "make_cache", None))
             for rule in r.rules()]
    graph, report = rewrite_graph(cap.program.module(), list(cap.example_inputs),
                                  rules=rules, name="decoder", model_facts=facts)
    _check_ops(graph, table)
    _drop_guards(graph)
    if cap.state is not None:
        _tie_state_sizes(graph, cap)
    timings["rewrite_s"] = time.perf_counter() - t0

    # 3. export the rewritten graph again (torch.onnx takes an ExportedProgram), then ONNX
    t0 = time.perf_counter()
    program = _reexport(graph, cap)
    timings["reexport_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx_program = _to_onnx(program, cap, table, optimize, verbose,
                            skip_rules=SLOW_RULES if cap.state is not None else ())
    _rename_dims(onnx_program.model, cap)
    timings["onnx_s"] = time.perf_counter() - t0

    meta = _meta(model, cap, graph, report, pipeline, target, onnx_name, facts)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".longfx-onnx-", dir=dest_dir.parent))
    try:
        t0 = time.perf_counter()
        onnx_program.save(tmp / onnx_name)
        timings["save_s"] = time.perf_counter() - t0
        tok = tokenizer if tokenizer is not None else getattr(model, "longfx_tokenizer", None)
        if tok is not None:
            tok.save_pretrained(str(tmp))
            meta["tokenizer"] = "tokenizer.json" if (tmp / "tokenizer.json").exists() else None
        result = OnnxExport(path=dest_dir, onnx_path=dest_dir / onnx_name, meta=meta,
                            graph=graph, report=report, timings=timings)
        if check:
            t0 = time.perf_counter()
            meta["check"] = _check_file(tmp / onnx_name, result, cap)
            timings["check_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        meta["export_timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------
# steps


def _destination(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path)
    if p.suffix == ".onnx":
        return p.parent if str(p.parent) else Path("."), p.name
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{p} exists and is not a folder")
    return p, MODEL_FILE


def _check_ops(graph: fx.GraphModule, table: dict) -> None:
    """Every longfx op in the rewritten graph has a translation (else a clear error)."""
    missing = {}
    for n in graph.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target.namespace == "longfx" and n.target not in table:
            missing.setdefault(str(n.target), n.name)
    if missing:
        names = ", ".join(f"{op} (e.g. node {node})" for op, node in missing.items())
        raise OnnxExportError(f"no ONNX translation for {names}: the recipe produced an op "
                              f"that runtime/onnx_export.py cannot lower yet")


def _drop_guards(graph: fx.GraphModule) -> None:
    """Remove the unlifted program's input guard call (``_guards_fn``) from our copy.

    Its range checks carry a tracing artifact: export derives ``P + S >= 4`` for the mask from
    the internal ``>= 2`` bound of the symbols it traced past and seq with, before the declared
    ``past: min=0`` applies, so the torch graph would refuse a prefill of 3 tokens that the ONNX
    file (which has no guards) runs correctly. The shapes are fixed by the caller's loop.

    The deferred runtime asserts inside the graph (``aten._assert_scalar``) go too, for the
    same reason: a quantized state's step traced with a group packed asserts that the packed
    chunk is not empty (``1 <= B·Hkv·n_new·D``), which a prefill of 3 tokens breaks; the ONNX
    file has no asserts, and tests/runtime/test_onnx_kv_quant.py compares both with the eager
    runtime cache at the sizes the traced ones were not."""
    import operator

    assert_scalar = torch.ops.aten._assert_scalar.default
    for n in list(graph.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards") and not n.users:
            graph.graph.erase_node(n)
        elif n.op == "call_function" and n.target is assert_scalar and not n.users:
            graph.graph.erase_node(n)
    # the integer arithmetic that only fed them (it may divide by a size that is 0 at run time)
    for n in reversed(list(graph.graph.nodes)):
        scalar = getattr(n.target, "__module__", "") in ("_operator", "torch") and \
            (n.target in vars(operator).values() or getattr(n.target, "__name__", "").startswith(
                "sym_"))
        if n.op == "call_function" and scalar and not n.users:
            graph.graph.erase_node(n)
    graph.recompile()


def _tie_state_sizes(graph: fx.GraphModule, cap) -> None:
    """Assert at the top of ``graph`` that every layer's state sizes (batch, packed,
    packed_groups, tail) equal layer 0's, as ``QuantizedState.tie_sizes`` does for the capture.

    The re-export and the ONNX exporter's decomposition trace this graph again, and each gives
    every input size a symbol of its own; the shared ``Dim`` names only become runtime asserts
    checked afterwards. An assert at the top ties the symbols before any layer uses them, so
    the layers share one set of sizes instead of each adding facts of its own (the tracing
    time grew with the square of the layers). The asserts hold for every valid input; the ONNX
    file carries none."""
    import operator

    places = [n for n in graph.graph.nodes if n.op == "placeholder"]
    by_name = dict(zip(cap.input_names, places))
    layers = sum(name.startswith("past.") for name in cap.input_names) // len(cap.state.names())
    sym_size, assert_scalar = torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default
    first: dict[str, fx.Node] = {}
    anchor = places[-1]
    for layer, name, axis, dim in cap.state.sized_axes(layers):
        what = f"layer {layer} {name}: {dim}"
        with graph.graph.inserting_after(anchor):
            size = graph.graph.call_function(sym_size, (by_name[f"past.{layer}.{name}"], axis))
        anchor = size
        if dim not in first:
            first[dim] = size
            continue
        with graph.graph.inserting_after(anchor):
            same = graph.graph.call_function(operator.eq, (size, first[dim]))
        with graph.graph.inserting_after(same):
            anchor = graph.graph.call_function(assert_scalar,
                                               (same, f"{what} differs from layer 0's"))
    graph.recompile()


def _dynamic_shapes(cap) -> list[dict[int, Any]]:
    """Dims of the flat inputs, in order: batch, seq, past (min 0); the mask's P+S is AUTO.
    A recipe's state (``cap.state``) has its own dims (runtime/export_state.py)."""
    from longfx.rewrite.capture_export import window_export_dims

    Dim = torch.export.Dim
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
    state_dims = cap.state.export_dims(batch) if cap.state is not None else {}
    windowed = window_export_dims(cap.windows)        # layer -> its trimmed past's Dim
    shapes = []
    for name in cap.input_names:
        if name in ("input_ids", "position_ids"):
            shapes.append({0: batch, 1: seq})
        elif name == "attention_mask":
            shapes.append({0: batch, 1: Dim.AUTO})
        elif cap.state is not None:
            shapes.append(state_dims[name.split(".", 2)[2]])
        elif int(name.split(".")[1]) in windowed:
            shapes.append({0: batch, 2: windowed[int(name.split(".")[1])]})
        else:
            shapes.append({0: batch, 2: past})
    return shapes


def _reexport(graph: fx.GraphModule, cap) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(graph, tuple(cap.example_inputs),
                                       dynamic_shapes=tuple(_dynamic_shapes(cap)), strict=False,
                                       prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"torch.export of the rewritten graph failed: {type(e).__name__}: "
                              f"{_first_lines(e)}") from e


# onnxscript rewrite rules left out of the exporter's optimization of a graph that carries a
# quantized state. SlicesSplit (two Slices of one tensor's last axis -> one Split) is a
# two-node pattern, and onnxscript 0.7.2 searches the whole graph for the second Slice of every
# Slice it tries: quadratic in the graph's size. On a SmolLM2-shaped kv_quant export it took
# 1.5 s of the rewrite pass at 2 layers, 23 s at 8, and most of the 1256 s ONNX step at 30.
# onnxruntime does not need the Split.
SLOW_RULES = ("SlicesSplit",)


@contextlib.contextmanager
def _without_rules(names: Sequence[str]):
    """The exporter's optimizer (``onnxscript.optimizer.optimize_ir``) applies
    ``onnxscript.rewriter._DEFAULT_REWRITE_RULES``, read when it runs. Leave the rules named
    ``names`` out of it for the duration; nothing happens if that name is gone in another
    onnxscript version (the export is then only slower)."""
    try:
        from onnxscript import rewriter
    except ImportError:                                      # pragma: no cover
        yield
        return
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not names or rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules
                                            if getattr(r, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _to_onnx(program, cap, table, optimize: bool, verbose: bool, skip_rules: Sequence[str] = ()):
    import io
    import logging

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    if not verbose:
        log.setLevel(logging.ERROR)          # "torchvision is not installed" x4
    try:
        with quiet, _without_rules(skip_rules):
            return torch.onnx.export(program, dynamo=True, custom_translation_table=table,
                                     input_names=cap.input_names, output_names=cap.output_names,
                                     opset_version=OPSET, optimize=optimize, verbose=verbose)
    except Exception as e:  # noqa: BLE001
        raise OnnxExportError(f"torch.onnx.export failed: {type(e).__name__}: "
                              f"{_first_lines(e)}") from e
    finally:
        log.setLevel(level)


def _first_lines(e: BaseException, n: int = 12) -> str:
    """The root cause first (torch.onnx wraps it in several layers of generic advice)."""
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = "\n".join(str(e).strip().splitlines()[:3])
    if root is not e:
        text = f"{type(root).__name__}: " + "\n".join(str(root).strip().splitlines()[:n]) + \
            f"\n(raised inside: {text})"
    return text


def _rename_dims(model, cap) -> None:
    """Name the symbolic dims of the graph's inputs/outputs batch / seq / past / past+seq
    (the exporter names them after torch's symbols, s0, s70...)."""
    import onnx_ir as ir

    from longfx.rewrite.capture_export import window_dim

    rename: dict[str, str] = {}
    want = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {1: "past_seq"}}
    state_axes = cap.state.dims() if cap.state is not None else {}
    for v in model.graph.inputs:
        if v.name.startswith("past.") and cap.state is not None:
            axes = {a: d for a, d in state_axes[v.name.split(".", 2)[2]].items() if a != 0}
        elif v.name.startswith("past.") and cap.windows and cap.windows[int(v.name.split(".")[1])]:
            axes = {2: window_dim(cap.windows[int(v.name.split(".")[1])], cap.windows)}
        else:
            axes = want.get(v.name, {2: "past"} if v.name.startswith("past.") else {})
        for axis, name in axes.items():
            dim = v.shape[axis] if v.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                rename.setdefault(dim.value, name)
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len,
                                                                   reverse=True))) + r")\b")

    def fix(v) -> None:
        if v.shape is None:
            return
        dims = []
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value:
                text = pattern.sub(lambda m: rename[m.group(1)], d.value)
                dims.append(ir.SymbolicDim("past_seq" if text in ("past + seq", "seq + past")
                                           else text))
            else:
                dims.append(d)
        v.shape = ir.Shape(dims)

    for v in (*model.graph.inputs, *model.graph.outputs):
        fix(v)


def _meta(model, cap, graph, report, pipeline, target: str, onnx_name: str,
          facts: dict) -> dict[str, Any]:
    """The JSON that describes the file: IO names and shapes, the KV state, the model."""
    import onnx
    import onnxscript
    import transformers

    import longfx
    from longfx.rewrite.capture_export import window_dim

    config = model.config.get_text_config(decoder=True)
    gen = getattr(model, "generation_config", None)
    layers = []
    kv_inputs = [n for n in cap.input_names if n.startswith("past.")]
    vals = dict(zip(cap.input_names, cap.example_inputs))
    for i in range(cap.num_layers if cap.state is None else 0):
        k, v = vals[f"past.{i}.key"], vals[f"past.{i}.value"]
        w = cap.windows[i] if cap.windows else None
        held = window_dim(w, cap.windows) if w else "past"
        layers.append({
            "layer": i,
            "window": w,
            "key": {"input": f"past.{i}.key", "output": f"present.{i}.key",
                    "shape": ["batch", int(k.shape[1]), held, int(k.shape[3])],
                    "dtype": str(k.dtype).replace("torch.", "")},
            "value": {"input": f"past.{i}.value", "output": f"present.{i}.value",
                      "shape": ["batch", int(v.shape[1]), held, int(v.shape[3])],
                      "dtype": str(v.dtype).replace("torch.", "")},
        })
    full = [layer["layer"] for layer in layers if not layer["window"]]
    dtype = str(cap.example_inputs[len(cap.input_names) - len(kv_inputs)].dtype)
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_seq"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    if cap.state is not None:                   # kv_quant: the state describes its tensors
        shapes = [tuple(vals[f"past.{i}.k_tail"].shape[j] for j in (1, 3, 3))
                  for i in range(cap.num_layers)]
        dtype = str(vals["past.0.k_tail"].dtype)
        state = cap.state.describe(shapes, vals["past.0.k_tail"].dtype, cap.num_layers)
        tensors = [t for layer in state["layers"] for t in layer["tensors"]]
    else:
        state = {
            "layout": "concat",
            "description": "present.{i}.* = concat(past.{i}.*, new) on axis 2; feed it back as "
                           "the next step's past. Prefill: past of length 0. attention_mask "
                           "covers every token seen + new tokens (1 = real, 0 = padding); "
                           "position_ids are the new tokens' positions. A layer with a "
                           "`window` keeps only the last window - 1 of those (its dim "
                           "window_past = min(tokens seen, window - 1)).",
            "seq_axis": 2,
            # tokens seen: a full layer's past; with none (every layer sliding) the state does
            # not hold it and the attention_mask must be given
            "length": [{"input": f"past.{full[0]}.key", "axis": 2}] if full else [],
            "layers": layers,
        }
        tensors = [{"input": layer[r]["input"], "output": layer[r]["output"],
                    "dtype": layer[r]["dtype"], "shape": layer[r]["shape"],
                    "out_shape": [*layer[r]["shape"][:2],
                                  layer[r]["shape"][2] if layer["window"] else "past_seq",
                                  layer[r]["shape"][3]]}
                   for layer in layers for r in ("key", "value")]
    outputs = [{"name": "logits", "dtype": dtype.replace("torch.", ""),
                "shape": ["batch", "seq", int(getattr(config, "vocab_size", 0) or 0)]}]
    for t in tensors:
        inputs.append({"name": t["input"], "dtype": t["dtype"], "shape": t["shape"]})
        outputs.append({"name": t["output"], "dtype": t["dtype"],
                        "shape": t.get("out_shape", t["shape"])})

    def ids(x):
        if x is None:
            return []
        return [int(t) for t in (x if isinstance(x, (list, tuple)) else [x])]

    eos = ids(getattr(gen, "eos_token_id", None)) or ids(getattr(config, "eos_token_id", None))
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    return {
        "format": FORMAT,
        "model_file": onnx_name,
        "opset": OPSET,
        "target": target,
        "recipe": str(pipeline),
        "inputs": inputs,
        "outputs": outputs,
        "state": state,
        "attention": _attention_sites(graph, report),
        "model": {
            "name": getattr(config, "_name_or_path", "") or getattr(model, "longfx_name", ""),
            "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(config, "model_type", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "num_layers": cap.num_layers,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "trained_length": facts.get("trained_length"),
            "layer_windows": {str(k): v for k, v in (facts.get("layer_windows") or {}).items()},
            "bos_token_id": getattr(gen, "bos_token_id", None) or getattr(config, "bos_token_id",
                                                                          None),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "dtype": dtype.replace("torch.", ""),
        },
        "tokenizer": None,
        "exported_with": {
            "longfx": longfx.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _attention_sites(graph: fx.GraphModule, report) -> list[dict[str, Any]]:
    """One row per attention op in the exported graph: layer, dense or sparse, the spec."""
    from longfx.kernels.attention.op import OP as ATTENTION
    from longfx.kernels.sparse_attention.op import OP as SPARSE

    layer_of = {s.key: s.layer for s in getattr(report, "sites", [])}
    rows = []
    for n in graph.graph.nodes:
        if n.op != "call_function" or n.target not in (ATTENTION, SPARSE):
            continue
        site = (n.meta.get("longfx") or {}).get("site")
        row: dict[str, Any] = {"layer": layer_of.get(site), "op": n.target.name()}
        if n.target is SPARSE:
            _, _, _, _, scale, softcap, sink, window, cap, _, _ = n.args
            row.update(sink=sink, window=window, cap=cap)
        rows.append(row)
    return rows


def empty_state(meta: dict[str, Any], batch: int) -> list[torch.Tensor]:
    """The state inputs before prefill, as ``longfx_onnx.json`` describes them."""
    out = []
    for spec in meta["inputs"][3:]:
        shape = [batch if d == "batch" else d if isinstance(d, int) else 0 for d in spec["shape"]]
        out.append(torch.zeros(shape, dtype=getattr(torch, spec["dtype"])))
    return out


def _check_file(onnx_path: Path, result: OnnxExport, cap) -> dict[str, Any]:
    """Prefill (empty past) + one decode step in onnxruntime vs the rewritten torch graph; with
    a quantized state the prefill is followed by a chunk that packs groups, then the step."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = cap.input_names
    vals = dict(zip(names, cap.example_inputs))
    b, s = vals["input_ids"].shape
    s = min(s, TRACE_SEQ)
    chunk = 0 if cap.state is None else cap.state.config.ring + 2 * cap.state.config.group
    gen = torch.Generator().manual_seed(0)
    vocab = int(result.meta["model"].get("vocab_size") or 2)
    n = s + chunk + 1
    ids = torch.randint(0, vocab, (b, n), generator=gen)
    mask = torch.ones(b, n, dtype=torch.long)
    past = empty_state(result.meta, b)
    worst = 0.0
    cuts = [0, s] + ([s + chunk] if chunk else []) + [n]
    steps = [(ids[:, i:j], mask[:, :j], torch.arange(i, j).expand(b, j - i).contiguous())
             for i, j in zip(cuts, cuts[1:])]
    for step_ids, step_mask, pos in steps:
        flat = [step_ids, step_mask, pos, *past]
        ref = result.run_torch(*[x.clone() for x in flat])
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, flat)})
        r, g = ref[0].numpy(), got[0]
        err = float(np.abs(r - g).max() / max(float(np.abs(r).max()), 1e-6))
        worst = max(worst, err)
        past = [torch.from_numpy(x) for x in got[1:]]
    if not worst <= 1e-4:
        raise OnnxExportError(f"the ONNX file's logits differ from the rewritten torch graph by "
                              f"{worst:.2e} (relative; budget 1e-4) on a prefill + decode check")
    return {"max_rel_logits_error": worst,
            "steps": ", ".join(f"S={j - i} P={i}" for i, j in zip(cuts, cuts[1:])) +
            f", batch {b}"}


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished files into ``dest`` (the whole folder at once when it is new)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    for f in tmp.iterdir():
        os.replace(f, dest / f.name)


__all__ = ["OnnxExport", "OnnxExportError", "export_onnx", "translation_table", "empty_state",
           "META_FILE", "MODEL_FILE", "TARGETS"]
