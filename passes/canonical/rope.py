"""Canonicalize every RoPE application into one ``longfx::rope`` call (exact).

Each application of a :class:`~longfx.rewrite.sites.RopeSite` (q or k of one layer) is
replaced by ``longfx::rope(x, cos, sin, style, rotary_dim)`` inserted just before the node
it replaces: ``x`` is the application's input (the whole head for partial rotary), ``cos`` and
``sin`` the very table operands the model multiplied by, so the table computation —
``inv_freq`` → angle → cos/sin (→ scaling, cast) — stays in the graph untouched and reachable
for frequency transforms. For the complex spelling the real and imaginary parts of the
``freqs_cis`` operand are taken with ``aten.view_as_real`` + ``aten.select``.

The old rotation nodes lose their users and are left to the pass manager's dead-code
elimination (other sites may still name them until the stage ends).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.rope.op import OP, STYLES
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

aten = torch.ops.aten


class CanonicalRope(Rule):
    name = "canonical.rope"
    kind = "rope"
    stage = "canonicalize"

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        if not site.rewritable:
            return site.reason or "not rewritable"
        style = site.facts.get("style")
        if style not in STYLES:
            return f"unknown RoPE style {style!r}"
        apps = site.nodes.get("applications") or []
        if not apps:
            return "no applications"
        table_keys = ("freqs_cis",) if style == "complex" else ("cos", "sin")
        for i, app in enumerate(apps):
            for key in ("input", "output", *table_keys):
                node = app.get(key)
                if not isinstance(node, fx.Node) or getattr(node, "_erased", False):
                    return f"application {i}: {key} is not a live graph node"
            if app["output"].graph is not app["input"].graph:
                return f"application {i}: input and output are in different graphs"
            rd, hd = app.get("rotary_dim"), app.get("head_dim")
            if not isinstance(rd, int) or rd <= 0 or rd % 2 or (hd and rd > hd):
                return f"application {i}: rotary_dim {rd!r} does not fit head_dim {hd!r}"
            if app["output"].target is OP or app["output"].meta.get("longfx"):
                return f"application {i} is already canonical"
        return {"style": style, "applications": apps}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        style = facts["style"]
        made: list[fx.Node] = []
        canonical = []
        for app in facts["applications"]:
            out: fx.Node = app["output"]
            g = out.graph
            with g.inserting_before(out):
                if style == "complex":
                    real = G.call(g, made, aten.view_as_real.default, app["freqs_cis"])
                    cos = G.call(g, made, aten.select.int, real, -1, 0)
                    sin = G.call(g, made, aten.select.int, real, -1, 1)
                else:
                    cos, sin = app["cos"], app["sin"]
                node = g.call_function(OP, (app["input"], cos, sin, style,
                                            int(app["rotary_dim"])))
            made.append(node)
            replace_uses(out, node)
            app["replaced"] = out
            app["output"] = node
            canonical.append(node)
        site.nodes["canonical"] = canonical
        return made
