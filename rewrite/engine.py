"""One graph through the pipeline: copy → analyze → canonicalize → transform.

:func:`rewrite_graph` never touches the graph it is given: it works on a copy, so a caller
can always fall back to the original (the compile backend does, with a warning, when a rule
fails). The canonical rules come first; a recipe's rules follow in the transform stage.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx as fx

from longfx.rewrite.manager import PassManager
from longfx.rewrite.report import GraphReport
from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import analyze


class RewriteWarning(UserWarning):
    """A graph or site was left unrewritten; the message says what and why."""


def canonical_rules() -> list[Rule]:
    from longfx.passes.canonical import rules

    return rules()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a node-for-node copy of ``gm``'s graph (meta dicts copied,
    parameters shared)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = copy.copy(getattr(gm, "meta", {}))
    return new_gm


def rewrite_graph(gm: fx.GraphModule, example_inputs: Any = None, rules: list[Rule] | None = None,
                  name: str = "graph", canonicalize: bool = True,
                  model_facts: dict[str, Any] | None = None) -> tuple[fx.GraphModule, GraphReport]:
    """Rewrite a copy of ``gm``; return it with the report of what was found and done.

    ``model_facts`` are what the graph cannot show but the model's config states (e.g.
    ``trained_length``, the context it was trained at); they are added to every site's facts
    (never overriding what analysis found) for rules such as ``extend(to=N)``.
    """
    new = copy_graph_module(gm)
    before = new.code
    sites = analyze(new, example_inputs)
    for site in sites:
        for key, value in (model_facts or {}).items():
            site.facts.setdefault(key, value)
    all_rules = (canonical_rules() if canonicalize else []) + list(rules or [])
    results = PassManager(all_rules).run(new, sites) if all_rules else []
    report = GraphReport(name=name, sites=sites, results=results, code_before=before,
                         code_after=new.code)
    for site in sites:
        t = site.nodes.get("k")
        val = t.meta.get("val", t.meta.get("example_value")) if isinstance(t, fx.Node) else None
        if isinstance(val, torch.Tensor) and site.kind == "attention":
            site.facts.setdefault("dtype_bits", torch.finfo(val.dtype).bits
                                  if val.dtype.is_floating_point else 8)
    return new, report


def warn(message: str) -> None:
    warnings.warn(message, RewriteWarning, stacklevel=3)
