"""The pass manager: run rules stage by stage over a graph's sites and keep the books.

Stages run in order (``canonicalize`` then ``transform``). Within a stage every rule sees the
sites of its kind; ``check`` decides, ``replace`` edits, and the manager stamps provenance
(``node.meta["longfx"] = {"rule", "site", "stage"}``) on the nodes a replacement made,
records one :class:`SiteResult` per (site, rule), removes dead nodes and recompiles. A rule
that raises is a bug in that rule: the manager restores nothing by itself, so callers that
must keep a working model (the compile backend) rewrite a copy of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import Site

STAGES = ("canonicalize", "transform")


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
                for site in sites:
                    if site.kind != rule.kind:
                        continue
                    facts = rule.check(site, gm)
                    if isinstance(facts, str):
                        results.append(SiteResult(site, rule.name, stage, "rejected", facts))
                        continue
                    made = rule.replace(site, gm, facts)
                    for node in made:
                        node.meta["longfx"] = {"rule": rule.name, "site": site.key, "stage": stage}
                    site.facts.setdefault("rules", []).append(rule.name)
                    results.append(SiteResult(site, rule.name, stage, "rewritten", nodes=len(made)))
            _drop_orphan_asserts(gm.graph)
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return results


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
