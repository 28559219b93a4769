"""The pass manager: run rules stage by stage over a graph's sites and keep the books.

Stages run in order: ``canonicalize``, ``transform``, then ``lower`` (rules that swap what a
recipe left for a faster equivalent, e.g. a kv_quant decode step's read and attention for one
fused op; they see the graph after every recipe's transforms). Within a stage every rule sees the
sites of its kind; ``check`` decides, ``replace`` edits, and the manager stamps provenance
(``node.meta["longfx"] = {"rule", "site", "stage"}``) on the nodes a replacement made,
records one :class:`SiteResult` per (site, rule), removes dead nodes and recompiles. A rule
that raises is a bug in that rule: the manager restores nothing by itself, so callers that
must keep a working model (the compile backend) rewrite a copy of the graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import Site

STAGES = ("canonicalize", "transform", "lower")


@dataclass
class SiteResult:
    site: Site
    rule: str
    stage: str
    status: str            # "rewritten" | "rejected"
    reason: str | None = None
    nodes: int = 0         # nodes the replacement created

    def to_dict(self) -> dict:
        return {"site": self.site.key, "rule": self.rule, "stage": self.stage,
                "status": self.status, "reason": self.reason, "nodes": self.nodes}


class PassManager:
    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        unknown = [r for r in self.rules if r.stage not in STAGES]
        if unknown:
            raise ValueError(f"rules with unknown stage: {unknown} (stages: {STAGES})")

    def run(self, gm: fx.GraphModule, sites: list[Site]) -> list[SiteResult]:
        results: list[SiteResult] = []
        for stage in STAGES:
            rules = [r for r in self.rules if r.stage == stage]
            if not rules:
                continue
            for rule in rules:
                rule.prepare(gm, sites)
                for site in sites:
                    if site.kind != rule.kind:
                        continue
                    facts = rule.check(site, gm)
                    if isinstance(facts, str):
                        results.append(SiteResult(site, rule.name, stage, "rejected", facts))
                        continue
                    made = rule.replace(site, gm, facts)
                    for node in made:
                        prior = node.meta.get("longfx")
                        history = [*prior.get("history", []), prior["rule"]] if prior else []
                        node.meta["longfx"] = {"rule": rule.name, "site": site.key,
                                               "stage": stage, "history": history}
                    site.facts.setdefault("rules", []).append(rule.name)
                    results.append(SiteResult(site, rule.name, stage, "rewritten", nodes=len(made)))
            _drop_orphan_asserts(gm.graph)
            gm.graph.eliminate_dead_code(is_impure_node=is_impure)
            gm.graph.lint()
            gm.recompile()
        return results


def is_impure(node: fx.Node) -> bool:
    """FX's purity test plus in-place methods, item assignment and mutating ops.

    Dynamo records ``cache.index_copy_(...)`` as ``call_method`` and ``buf[i] = x`` as
    ``operator.setitem``; FX's own check sees neither as a side effect, so a plain
    dead-code pass would drop a static KV cache's writes. A custom op called through its
    packet (``torch.ops.longfx.kv_quant_append(...)``) is recorded as the packet, which
    torch 2.11's ``Node.is_impure`` does not resolve to its mutable schema: the pass dropped
    every quantize-on-append of the kv_quant cache, which read as a "CUDA-only" bug because
    the GPU machine runs torch 2.11 (benchmarks/results/debug/kv_quant_dce_h100.json).
    """
    if node.is_impure():
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if mutates(node.target):
            return True
        if node.target in _INPLACE_OPERATORS or node.target in (operator.setitem, operator.delitem):
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False                     # and_, or_, not_: pure despite the underscore
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")   # torch.relu_, Tensor.add_
    return False


def mutates(target: Any) -> bool:
    """Whether an op writes one of its arguments (a ``Tensor(a!)`` in its schema): an
    ``OpOverload``, or a packet any of whose overloads does."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(target, torch._ops.OpOverloadPacket):
        return any(getattr(target, name)._schema.is_mutable for name in target.overloads())
    return False


# ``x += y`` on a tensor mutates x (StaticCache counts its length this way)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul}


def _drop_orphan_asserts(graph: fx.Graph) -> None:
    """Erase export's ``_assert_tensor_metadata`` checks on values nothing else reads.

    They count as side effects, so without this a replaced subgraph would stay alive (and
    be computed) only to be checked.
    """
    from longfx.rewrite import graph as G

    for node in list(graph.nodes):
        if G.op(node) != "assert_meta" or not node.args:
            continue
        target = node.args[0]
        if isinstance(target, fx.Node) and all(G.op(u) == "assert_meta" for u in target.users):
            graph.erase_node(node)
