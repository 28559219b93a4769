"""SelfExtend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without
Tuning"): canonical ``longfx::attention`` → ``longfx::self_extend_attention``.

Keys within ``window`` positions of the query keep their true distance; farther keys are seen
at grouped positions (``p // group`` shifted to meet the window edge, ``j // group``), so a
model trained at L tokens never sees a distance beyond ~N/group + window at context N. The
rewrite needs what the ``rope_cap`` rule needs: the frequencies of the rotation that produced
the site's query (found structurally: the ``longfx::rope`` feeding q, then its RoPE site's
frequency vector, after any frequency recipe), and a mask proven to be "causal ∧ padding".

Layers that already attend a local window (Gemma's sliding layers) are left as they are: their
distances are bounded by construction.

``self_extend(group, window)`` is registered here; ``extend(to=N)`` (passes/rope.py) picks it
with a group and window derived from the trained length.
"""
from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.self_extend.op import OP as SELF_EXTEND
from longfx.passes.sparse import current_inv_freq, key_keep, native_window, padding_of, rope_of
from longfx.recipes import Recipe, RecipeError, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

aten = torch.ops.aten

__all__ = ["SelfExtendRule", "SelfExtend", "self_extend_settings"]


def self_extend_settings(trained: int, target: int, margin: float = 0.75) -> tuple[int, int]:
    """(group, window) reaching ``target`` tokens from a model trained at ``trained``.

    The window is half the trained length (every prompt up to it runs exactly as the model
    was trained) and the group the smallest power of two whose largest grouped distance,
    target/group + window − window/group, stays within ``margin`` × trained (the paper keeps
    a margin below the trained length; its Llama-2 settings, 4k trained, use group 4-8 and a
    window of 512-2048)."""
    window = max(1, trained // 2)
    group = 1
    while target / group + window - window / group > margin * trained and group < 1 << 12:
        group *= 2
    return group, window


class SelfExtendRule(Rule):
    kind = "attention"
    stage = "transform"

    def __init__(self, group: int, window: int, recipe: str = "", until: int = 0):
        self.name = "rope.self_extend"
        self.group, self.window, self.recipe = int(group), int(window), recipe
        self.until = int(until)
        self._sites: list[Site] = []

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target is not DENSE or not node.users:
            done = site.facts.get("sparse")
            return f"already rewritten (sparse: {done})" if done else \
                (site.reason or "the site is not canonical (no longfx::attention to rewrite)")
        native = native_window(site)
        if native:
            return f"local layer (window {native}): its distances are already bounded"
        pad = padding_of(site, self._sites)
        if isinstance(pad, str):
            return pad
        rope = rope_of(node.args[0], self._sites)
        if rope is None:
            return "no RoPE rotation found on this site's queries"
        inv = current_inv_freq(rope)
        if inv is None or rope.facts.get("style") not in ("rotate_half", "interleaved", "complex"):
            return "the query rotation's frequency vector is not in the graph"
        return {"node": node, "padding": pad, "inv_freq": inv, "rope_style": rope.facts["style"]}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        g = gm.graph
        made: list[fx.Node] = []
        q, k, v, _mask, scale, _causal, softcap = node.args
        with g.inserting_before(node):
            keep = key_keep(g, made, facts["padding"], k) if facts["padding"] is not None else None
            inv = G.call(g, made, aten.reshape.default, facts["inv_freq"], [-1])
            new = G.call(g, made, SELF_EXTEND, q, k, v, keep, scale, softcap, self.group,
                         self.window, inv, facts["rope_style"], self.until)
        replace_uses(node, new)
        site.nodes["self_extend"] = new
        site.facts["self_extend"] = {"group": self.group, "window": self.window,
                                     **({"until": self.until} if self.until else {})}
        return made


@register("self_extend")
class SelfExtend(Recipe):
    """SelfExtend: keys beyond a neighbour ``window`` are seen at positions grouped by
    ``group``. ``until`` > 0: only calls over at most ``until`` keys; longer ones attend with
    the model's own positions (compose with a frequency recipe that starts there)."""

    group: int = 8
    window: int = 1024
    until: int = field(default=0, metadata={"omit_default": True})

    def __post_init__(self):
        for name in ("group", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"self_extend: {name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.until, int) or self.until < 0:
            raise ValueError(f"self_extend: until must be an integer >= 0 (0: no limit), got "
                             f"{self.until!r}")

    def rules(self) -> list:
        return [SelfExtendRule(self.group, self.window, recipe=str(self), until=self.until)]

    def check_followers(self, later: tuple) -> None:
        """A dynamic RoPE recipe after this one would find its sites already rewritten and
        do nothing: refuse the order (the other one composes, see ``until``)."""
        from longfx.passes.rope import DynamicNTK, Extend
        from longfx.passes.rope_dynamic import DynamicYaRN

        for r in later:
            if isinstance(r, (DynamicYaRN, DynamicNTK, Extend)):
                raise RecipeError(f"{self} + {r}: {r} would find every site already rewritten "
                                  f"by self_extend and do nothing; write the frequency recipe "
                                  f"first: {r} + {self}")

    def reach(self, trained: int) -> int:
        """The context at which the largest grouped distance reaches ``trained``."""
        return int(math.floor((trained - self.window + self.window / self.group) * self.group))
