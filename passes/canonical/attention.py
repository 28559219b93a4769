"""Canonicalize every attention site into one ``longfx::attention`` call (exact).

The SDPA spelling maps argument for argument. The eager spelling passes the q and k found
under the scale and transposes, the un-repeated k/v under GQA, the collected scale and
softcap, and one mask built from the masks met between the contraction and the softmax:
boolean parts are and-ed into a keep-mask ("drop" parts are negated first), additive parts
are summed (each multiplied by the scale that was applied after it), and when both occur the
keep-mask is folded into the additive one with -inf.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

aten = torch.ops.aten


class CanonicalAttention(Rule):
    name = "canonical.attention"
    kind = "attention"
    stage = "canonicalize"

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        if not site.rewritable:
            return site.reason or "not rewritable"
        for role in ("q", "k", "v", "output"):
            if not isinstance(site.nodes.get(role), fx.Node):
                return f"{role} is not a graph value"
        if site.facts.get("scale") is None:
            return "scale unknown"
        return {"scale": site.facts["scale"], "is_causal": site.facts.get("is_causal", False),
                "softcap": site.facts.get("softcap", 0.0)}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        g = gm.graph
        out = site.nodes["output"]
        made: list[fx.Node] = []

        def call(target, *args):
            node = g.call_function(target, args)
            made.append(node)
            return node

        with g.inserting_before(out):
            k = site.nodes["k"]
            if site.facts.get("k_transposed_in_graph"):
                k = call(aten.transpose.int, k, -1, -2)              # [.., D, Skv] -> [.., Skv, D]
            mask = site.nodes.get("mask")
            if site.nodes.get("mask_parts"):
                mask = _combine_masks(site.nodes["mask_parts"], call)
            scale: Any = float(facts["scale"])
            for factor, power in site.nodes.get("scale_nodes", ()):
                # run-time scalars (Dynamo's lifted float attributes): scale = const * f or / f
                scale = call(operator.mul if power > 0 else operator.truediv, scale, factor)
            node = call(OP, site.nodes["q"], k, site.nodes["v"], mask, scale,
                        bool(facts["is_causal"]), float(facts["softcap"]))
        replace_uses(out, node)
        site.nodes["canonical"] = node
        return made


def _is_bool(node: Any) -> bool:
    t = G.tensor_val(node)
    return t is not None and t.dtype == torch.bool


def _combine_masks(parts: list, call) -> fx.Node | None:
    keep = None
    add = None
    for node, kind, factor in parts:
        if kind in ("keep", "drop") or _is_bool(node):
            k = call(aten.logical_not.default, node) if kind == "drop" else node
            keep = k if keep is None else call(aten.logical_and.default, keep, k)
        else:
            term = node if factor == 1.0 else call(aten.mul.Scalar, node, float(factor))
            add = term if add is None else call(aten.add.Tensor, add, term)
    if add is None:
        return keep
    if keep is not None:
        add = call(aten.masked_fill.Scalar, add, call(aten.logical_not.default, keep), float("-inf"))
    return add
