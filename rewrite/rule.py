"""A rewrite rule: pattern (a site kind), check (facts or a reason), replacement.

The split follows onnxscript's rewriter: ``check`` only reads the graph and returns either a
dict of facts the replacement needs or a string saying why the site is rejected; ``replace``
edits the graph and returns the nodes it made. The driver (:mod:`longfx.rewrite.manager`)
stamps provenance on those nodes (``node.meta["longfx"]``) and counts matched / rewritten /
rejected per site for the report. Spelling variants are handled inside one rule's check,
never by numbered copies of a rule.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from longfx.rewrite.sites import Site


class Rule:
    """Base class. Subclasses set ``name``, ``kind`` and ``stage`` and implement both methods."""

    name: str = "rule"
    kind: str = "attention"          # which sites it matches: "attention" | "rope" | "kv"
    stage: str = "canonicalize"      # "canonicalize" | "transform" | "lower"

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        """Called once per graph before any check, with all its sites (for rules that relate
        sites of different kinds, e.g. an attention site and the RoPE that rotated its q)."""

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        """Facts for :meth:`replace`, or the reason this site is not rewritten. No mutation."""
        raise NotImplementedError

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        """Rewrite the site; return the nodes created (provenance is stamped on them)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def replace_uses(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` and carry the example value across."""
    for key in ("val", "example_value", "nn_module_stack", "stack_trace"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new, propagate_meta=False)
