"""The front door: inspect, diff, compile, backend.

Every entry point goes through the same machinery: Dynamo captures the model's graphs, the
:class:`~longfx.rewrite.capture.Backend` analyzes and rewrites a copy of each, and the
:class:`~longfx.rewrite.report.RewriteReport` says what was found and done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longfx.rewrite.capture import Backend, graph_breaks, new_graph_breaks, capture_config
from longfx.rewrite.report import RewriteReport
from longfx.runtime.hf import compiled_copy, example_inputs


def _pipeline(recipe: Any):
    from longfx import recipes

    if isinstance(recipe, recipes.Pipeline):
        return recipe
    if isinstance(recipe, recipes.Recipe):
        return recipes.Pipeline((recipe,))
    return recipes.parse(recipe)


def _rules(pipeline) -> list:
    return [rule for r in pipeline.recipes for rule in r.rules()]


def backend(recipe: Any = None, *, inner: str = "eager", model: torch.nn.Module | None = None) -> Backend:
    """A torch.compile backend applying ``recipe``:
    ``torch.compile(model, backend=longfx.backend("...", model=model))``. Its ``.report``
    fills as Dynamo hands it graphs. Passing ``model`` lets recipes read what its config
    states (the trained context length, for ``extend(to=N)``) and recipes that need the model
    bind to it (``duo_heads`` finds the calibration made for it)."""
    pipeline = _pipeline(recipe)
    if model is not None and any(hasattr(r, "bind") for r in pipeline.recipes):
        from longfx.recipes import Pipeline

        pipeline = Pipeline(tuple(r.bind(model) if hasattr(r, "bind") else r
                                  for r in pipeline.recipes))
    return Backend(_rules(pipeline), recipe=str(pipeline), inner=inner,
                   model_facts=model_facts(model) if model is not None else None)


def model_facts(model: torch.nn.Module) -> dict[str, Any]:
    """Facts a config states and a graph cannot show: the trained context length and the
    layers that attend a sliding window."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        rope = next(iter(rope.values()))          # per-layer-type parameters (Gemma 3)
    trained = (rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None) \
        or getattr(config, "max_position_embeddings", None)
    facts: dict[str, Any] = {"trained_length": int(trained)} if trained else {}
    windows = layer_windows(config)
    if windows:
        facts["layer_windows"] = windows
    return facts


def layer_windows(config: Any) -> dict[int, int]:
    """{layer: window} for layers the config declares sliding-window (Gemma 2/3 local layers,
    Mistral): what a mask evaluated on a short example cannot show."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return {}
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        return {i: window for i, t in enumerate(types) if t == "sliding_attention"}
    if getattr(config, "use_sliding_window", True) is False:
        return {}
    n = getattr(config, "num_hidden_layers", 0) or 0
    return {i: window for i in range(n)}


def _model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(model, "longfx_name", "")
    return name or type(model).__name__


def _run_once(model: torch.nn.Module, be: Backend, inputs: Any, seq_len: int = 16) -> None:
    if inputs is None:
        inputs = example_inputs(model, seq_len=seq_len)
    compiled = torch.compile(model, backend=be)
    before = graph_breaks()
    with torch.no_grad(), capture_config():
        if isinstance(inputs, dict):
            compiled(**inputs)
        elif isinstance(inputs, (tuple, list)):
            compiled(*inputs)
        else:
            compiled(inputs)
    for reason in new_graph_breaks(before):
        be.report.warnings.append(f"graph break (that part runs unrewritten): {reason}")
    if not be.report.graphs and not be.report.warnings:
        be.report.warnings.append("Dynamo captured no graph: nothing could be analyzed")


def inspect(model: torch.nn.Module, inputs: Any = None, *, seq_len: int = 16) -> RewriteReport:
    """Find the attention, RoPE and KV sites of ``model`` without changing anything.

    ``inputs``: a dict of keyword arguments, a tuple of positional ones, or one tensor;
    made from the config for transformers models when omitted (``seq_len`` tokens). Mask
    meanings are read off these inputs: a sliding window shows only when ``seq_len``
    exceeds it.
    """
    be = Backend([], canonicalize=False)
    be.report.model = _model_name(model)
    _run_once(model, be, inputs, seq_len)
    return be.report


@dataclass
class Diff:
    """What ``recipe`` changes in ``model``: the report, and the graph-code diff as text."""

    report: RewriteReport

    @property
    def text(self) -> str:
        return self.report.diff()

    def __str__(self) -> str:
        return self.text + "\n" + self.report.summary()


def diff(model: torch.nn.Module, recipe: Any = None, inputs: Any = None, *,
         seq_len: int = 16, context: int = 8192) -> Diff:
    """Canonicalize ``model`` and apply ``recipe`` on example inputs; return the diff.

    A KV-cache recipe (``kv_quant``, ``gear``, eviction, or both) changes the runtime cache, not
    the graph: its bytes per layer at ``context`` tokens, before → after, are read from the
    recipe's own storage (``runtime/state_bytes.py``) and end the diff text."""
    be = backend(recipe, model=model)
    be.report.model = _model_name(model)
    _run_once(model, be, inputs, seq_len)
    from longfx.passes.kv_quant import cache_recipe
    from longfx.runtime.state_bytes import kv_state_bytes

    kv = cache_recipe(_pipeline(recipe))
    if kv is not None:
        rows, note = kv_state_bytes(model, kv, context)
        be.report.kv_state = {"context": context, "recipe": str(kv), "layers": rows, "note": note}
    return Diff(be.report)


def compile(model: torch.nn.Module, recipe: Any = None, *, inner: str = "eager",
            dynamic: bool | None = None) -> torch.nn.Module:
    """A copy of ``model`` (sharing its weights) whose forward runs the rewritten graph.

    It takes the same arguments and returns the same output type as ``model``;
    ``generate()`` works on it. ``.longfx_backend.report`` says what each captured graph
    became. The empty recipe only canonicalizes: outputs are unchanged.
    """
    be = backend(recipe, inner=inner, model=model)
    be.report.model = _model_name(model)
    from longfx.passes.kv_quant import cache_recipe   # a recipe that owns the runtime KV cache
    pipeline = _pipeline(recipe)
    kv = cache_recipe(pipeline)
    new_cache = (lambda: kv.make_cache(model)) if kv is not None else None
    if kv is None:           # decode_topk: a cache that keeps Quest's block bounds with the keys
        bounds = next((r for r in pipeline.recipes if hasattr(r, "make_bounds_cache")), None)
        if bounds is not None:
            new_cache = lambda: bounds.make_bounds_cache(model)  # noqa: E731
    return compiled_copy(model, be, dynamic=dynamic, new_cache=new_cache)
