"""Capture through Dynamo: a torch.compile backend that rewrites every graph it is given.

``Backend(rules)`` is what ``longfx.backend(recipe)`` returns. Dynamo hands it each graph it
captured (torch-level ops, ``nn_module_stack`` metadata, real example inputs); the backend
rewrites a copy (:func:`longfx.rewrite.engine.rewrite_graph`), keeps the report, and returns
the rewritten graph's forward — run eagerly by default, or through Inductor with
``inner="inductor"``. When rewriting fails the original graph runs unchanged and a
:class:`RewriteWarning` says why: never a silently wrong model. Graph breaks are read from
Dynamo's counters and reported, naming what was not captured.

The export path (``torch.export(strict=False)`` with explicit KV state) is in
``capture_export.py``.
"""
from __future__ import annotations

import traceback
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx as fx

from longfx.rewrite.engine import rewrite_graph, warn
from longfx.rewrite.report import RewriteReport
from longfx.rewrite.rule import Rule


class Backend:
    """A Dynamo backend: ``torch.compile(model, backend=Backend(rules))``."""

    def __init__(self, rules: list[Rule] | None = None, *, recipe: str = "", inner: str = "eager",
                 canonicalize: bool = True, keep_graphs: bool = False,
                 model_facts: dict[str, Any] | None = None):
        self.rules = list(rules or [])
        self.model_facts = dict(model_facts or {})
        self.inner = inner
        self.canonicalize = canonicalize
        self.keep_graphs = keep_graphs
        self.report = RewriteReport(recipe=recipe)
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []   # (original, rewritten)
        # per graph handed back, in order: the positions of its integer inputs (Dynamo's
        # SymInts: a cache length, a batch size) that some node still reads after rewriting
        self.int_inputs_read: list[tuple[int, ...]] = []
        # while a list (set by runtime/decode_graph.py): each call of a graph handed back
        # appends (its index, {position: value} of its integer inputs)
        self.calls: list[tuple[int, dict[int, int]]] | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        name = f"graph {len(self.report.graphs)}"
        try:
            new, graph_report = rewrite_graph(gm, example_inputs, self.rules, name=name,
                                              canonicalize=self.canonicalize,
                                              model_facts=self.model_facts)
        except Exception as e:  # noqa: BLE001 - any failure leaves the graph unrewritten
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            msg = f"longfx: {name} left unrewritten: {detail}"
            warn(msg)
            self.report.warnings.append(msg)
            return self._recorded(gm, self._lower(gm, example_inputs))
        self.report.graphs.append(graph_report)
        if self.keep_graphs:
            self.graphs.append((gm, new))
        return self._recorded(new, self._lower(new, example_inputs))

    def _recorded(self, gm: fx.GraphModule, fn: Callable) -> Callable:
        """``fn`` that notes its calls in ``self.calls`` while that is a list, so a caller can
        tell which graphs ran and with which integer inputs (a CUDA graph replays one call with
        those integers frozen: runtime/decode_graph.py)."""
        index = len(self.int_inputs_read)
        self.int_inputs_read.append(int_inputs_read(gm))

        def run(*args: Any) -> Any:
            if self.calls is not None:
                self.calls.append((index, {i: a for i, a in enumerate(args)
                                           if isinstance(a, int) and not isinstance(a, bool)}))
            return fn(*args)

        return run

    def _lower(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


def _is_int(val: Any) -> bool:
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def int_inputs_read(gm: fx.GraphModule) -> tuple[int, ...]:
    """Positions of ``gm``'s placeholders that carry an integer (a SymInt Dynamo lifted: a
    Python int that changed between calls, a dynamic size) and that some computation other
    than integer arithmetic reaches. Integer arithmetic that only ends in the graph's outputs
    (a cache layer's ``self.length = past + s``, which Dynamo computes in the graph and writes
    back after it) does not count. A node without a recorded value counts (conservative)."""
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if not _is_int(node.meta.get("example_value", node.meta.get("val"))):
            continue
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            if _is_int(user.meta.get("example_value", user.meta.get("val"))):
                stack.extend(user.users)                 # still an integer: follow it
                continue
            out.append(i)
            break
    return tuple(out)


def graph_breaks() -> Counter:
    """Dynamo's graph-break reasons counted so far in this process."""
    from torch._dynamo.utils import counters

    return Counter(dict(counters["graph_break"]))


def new_graph_breaks(before: Counter) -> list[str]:
    """Reasons of graph breaks that happened since ``before`` (a :func:`graph_breaks` snapshot)."""
    after = graph_breaks()
    return [f"{reason} (x{n - before.get(reason, 0)})" for reason, n in after.items()
            if n > before.get(reason, 0)]


def capture_config(recompiles: int = 256):
    """Dynamo settings for capture, as a context (nothing is changed globally).

    * a higher per-code recompile limit: each model instance, input rank or cache kind
      costs one, and tests and ``inspect`` compile many models;
    * ``specialize_float``: Python floats (the attention scale, RoPE scaling) become
      guarded constants instead of graph inputs, so the analysis reads them as constants.
    """
    return torch._dynamo.config.patch(recompile_limit=recompiles,
                                      accumulated_recompile_limit=max(recompiles, 4096),
                                      specialize_float=True)
