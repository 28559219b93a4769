"""Cache-consistent dynamic RoPE scaling: ``dynamic_ntk(factor)`` and ``dynamic_yarn(factor)``.

Per call, the scale ``s`` follows the longest position id (kernels/rope/dynamic.py has the
formulas and the argument for consistency). Per attention site, the rewrite

* gives the query's ``longfx::rope`` application new cos/sin tables computed from the call's
  positions at frequencies θ(s) (times YaRN's temperature, squared, for ``dynamic_yarn``);
* leaves the key's application alone — the KV state keeps keys rotated with the model's θ —
  and re-rotates the attention's whole key input (cache read + new keys) by
  ``pos_j · (θ(s) − θ)`` just before the attention.

So each call scores every (query, cached key) pair with one set of frequencies, unlike
transformers' ``"dynamic"`` (issue #25104) where cached keys keep the frequencies of the call
that appended them. At positions below the trained length s = 1 and the model is unchanged
(tables equal, re-rotation by zero).

Requirements checked per site: a canonical dense ``longfx::attention`` whose query comes from a
``longfx::rope`` application of a RoPE site with a computed table (its ``inv_freq`` and
position ids in the graph) and whose keys come from an application of the same site; the
site's frequencies not already rescaled by another frequency recipe. Attention rewrites that
re-rotate by themselves (``rope_cap``, ``self_extend``) do not compose with it (the site is no
longer a dense attention when they ran first, and they read the model's frequencies).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.rope import dynamic as D
from longfx.kernels.rope.op import OP as ROPE
from longfx.passes.sparse import native_window, rope_of, rotation_of
from longfx.recipes import Recipe, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import Site

__all__ = ["ConsistentDynamicRule", "ExtendRule", "DynamicYaRN"]


def _opt(default: Any) -> Any:
    return field(default=default, metadata={"omit_default": True})


def _rotated_by(node: fx.Node, apps: list[fx.Node], depth: int = 12) -> bool:
    """Whether ``node`` derives from one of the rope applications ``apps`` (through the KV
    append, repeats and layout ops), looking ``depth`` nodes up."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n in apps:
                return True
            nxt += n.all_input_nodes
        frontier = nxt
    return False


class ConsistentDynamicRule(Rule):
    """Dynamic frequencies for the query, keys re-rotated after the cache read."""

    kind = "attention"
    stage = "transform"

    def __init__(self, method: str, factor: float, original: int | None,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, recipe: str = "",
                 margin: float = 1.0, start: float | None = None, above: int = 0,
                 mscale: float = 1.0):
        if method not in D.METHODS:
            raise ValueError(f"method must be one of {D.METHODS}, got {method!r}")
        self.name = f"rope.dynamic_{method}"
        self.method, self.factor, self.original = method, float(factor), original
        self.margin = float(margin)
        self.start = None if start is None else float(start)
        self.above = int(above)
        self.mscale = float(mscale)
        self.beta_fast, self.beta_slow, self.recipe = beta_fast, beta_slow, recipe
        self._sites: list[Site] = []
        self._tables: dict[tuple, tuple[fx.Node, fx.Node, fx.Node]] = {}
        self._infos: dict[int, dict[str, Any]] = {}

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites, self._tables, self._infos = sites, {}, {}

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        from longfx.passes.rope import _original, _site_table

        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target is not DENSE or not node.users:
            done = site.facts.get("sparse") or site.facts.get("self_extend")
            return f"already rewritten ({done}): dynamic scaling needs a dense attention" if done \
                else (site.reason or "the site is not canonical (no longfx::attention)")
        q_app = rotation_of(node.args[0])
        rope = rope_of(node.args[0], self._sites)
        if q_app is None or rope is None:
            return "no RoPE rotation found on this site's queries"
        # the RoPE site is shared by every layer: read it once, before this rule marked it
        info = self._infos.get(id(rope)) or _site_table(rope, gm)
        if isinstance(info, str):
            return info
        self._infos[id(rope)] = info
        style = rope.facts.get("style")
        if style not in ("rotate_half", "interleaved", "complex"):
            return f"RoPE style {style!r} is not supported"
        pos = rope.nodes.get("positions")
        if not isinstance(pos, fx.Node) or pos.graph is not gm.graph:
            return "the position ids of the table are not a node of the top graph"
        original = _original(rope, self.original)
        if original is None:
            return f"dynamic_{self.method} needs the trained context length: pass original=N"
        native = native_window(site)
        if native and native <= original:
            # Gemma 2/3, Mistral-style local layers: no distance ever exceeds the window, so
            # their frequencies stay (transformers scales only the global layers' RoPE too)
            return f"local layer (window {native}): its distances are already bounded"
        scaling = rope.facts.get("attention_scaling")
        if isinstance(scaling, (int, float)) and abs(float(scaling) - 1.0) > 1e-6:
            return (f"the model already scales its RoPE tables (attention factor {scaling}): "
                    "it has a RoPE scaling of its own")
        apps = [a for a in (rope.nodes.get("canonical") or []) if a is not q_app]
        if not _rotated_by(node.args[1], apps):
            return "the keys are not rotated by the same RoPE site as the queries"
        if self.method == "yarn" and not info["base"]:
            return "dynamic_yarn needs the RoPE base (not detected for this site)"
        like = q_app.args[1]
        if not isinstance(like, fx.Node) or G.tensor_val(like) is None:
            return "the query's cos table has no example value"
        if G.tensor_val(like).dim() not in (2, 3, 4):
            return f"unsupported RoPE table rank {G.tensor_val(like).dim()}"
        return {"node": node, "q_app": q_app, "rope": rope, "info": info, "pos": pos,
                "original": original, "style": style, "rotary_dim": info["dim"]}

    def _query_tables(self, gm: fx.GraphModule, facts: dict[str, Any], made: list):
        """(inv_s, cos_q, sin_q) for a table node, built once per graph and table."""
        q_app: fx.Node = facts["q_app"]
        like, like_sin = q_app.args[1], q_app.args[2]
        key = (id(facts["rope"]), like, like_sin)
        if key in self._tables:
            return self._tables[key]
        from longfx.passes.rope import _constant

        info, g = facts["info"], gm.graph
        n = info["values"].numel()
        if self.method == "ntk":
            shape = D.ntk_exponent(n, info["dim"])
        else:
            shape = D.yarn_gamma(n, info["dim"], float(info["base"]), facts["original"],
                                 self.beta_fast, self.beta_slow)
        inv = info["inv_freq"]
        dev = G.tensor_val(inv).device if G.tensor_val(inv) is not None else torch.device("cpu")
        shape_node = _constant(gm, inv, f"longfx_rope{facts['rope'].index}_dynamic_"
                               f"{self.method}", shape.to(dev))
        made.append(shape_node)
        order = {nd: i for i, nd in enumerate(g.nodes)}
        first = min((u for t in (like, like_sin) for u in t.users), key=order.__getitem__)
        with g.inserting_before(first):
            s = G.call(g, made, D.scale_of, facts["pos"], facts["original"], self.factor,
                       self.method, self.margin, self.start, self.above)
            inv_s = G.call(g, made, D.scaled_inv_freq, inv, s, self.method, shape_node)
            temp = G.call(g, made, D.temperature, s, self.method, self.mscale)
            tables = G.call(g, made, D.query_tables, facts["pos"], inv_s, temp, facts["style"],
                            like)
            cos_q = G.call(g, made, operator.getitem, tables, 0)
            sin_q = G.call(g, made, operator.getitem, tables, 1)
        self._tables[key] = (inv_s, cos_q, sin_q)
        return self._tables[key]

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        q_app: fx.Node = facts["q_app"]
        made: list[fx.Node] = []
        inv_s, cos_q, sin_q = self._query_tables(gm, facts, made)
        q_app.update_arg(1, cos_q)
        q_app.update_arg(2, sin_q)
        g = gm.graph
        with g.inserting_before(node):
            k = G.call(g, made, D.rerotate_keys, node.args[1], facts["pos"],
                       facts["info"]["inv_freq"], inv_s, facts["style"], facts["rotary_dim"])
        node.update_arg(1, k)
        rope: Site = facts["rope"]
        rope.facts["rope_method"] = self.recipe or self.name
        rope.facts["inv_freq_before"] = [float(f"{float(x):.6g}") for x in facts["info"]["values"]]
        rope.facts["inv_freq_after"] = "computed at run time (dynamic, keys re-rotated)"
        site.facts["dynamic_rope"] = {"method": self.method, "factor": self.factor,
                                      "original": facts["original"]}
        if self.margin != 1.0:
            site.facts["dynamic_rope"]["margin"] = self.margin
        if self.start is not None:
            site.facts["dynamic_rope"]["start"] = self.start
        if self.above:
            site.facts["dynamic_rope"]["above"] = self.above
        if self.mscale != 1.0:
            site.facts["dynamic_rope"]["mscale"] = self.mscale
        return made


# extend(to=N)'s headroom: the scale at length L is EXTEND_MARGIN·L/L₀, capped at
# EXTEND_CAP·N/L₀ — a scale that runs ahead of the length up to 0.75·N, and 1.5× the length's
# at N. Both chosen on tuning prompts (benchmarks/results/tuning/, docs/rope.md "extend").
EXTEND_MARGIN = 2.0
EXTEND_CAP = 1.5
EXTEND_START: float | None = None


class ExtendRule(ConsistentDynamicRule):
    """``extend(to=N)``: ``dynamic_yarn(factor=c·N/L₀, margin=m)`` with L₀ read per site,
    m = ``EXTEND_MARGIN`` and c = ``EXTEND_CAP``; nothing when N ≤ L₀ (the site stays as it is,
    with that reason). Up to L₀/m tokens the model is unchanged."""

    def __init__(self, to: int, original: int | None, recipe: str = ""):
        super().__init__("yarn", 1.0, original, recipe=recipe, margin=EXTEND_MARGIN,
                         start=EXTEND_START)
        self.name = "rope.extend"
        self.to = int(to)

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        facts = super().check(site, gm)
        if isinstance(facts, str):
            return facts
        if self.to <= facts["original"]:
            return f"extend: {self.to} <= trained length {facts['original']}, nothing to do"
        return {**facts, "factor": EXTEND_CAP * self.to / facts["original"]}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        self.factor = facts["factor"]
        made = super().replace(site, gm, facts)
        chosen = DynamicYaRN(factor=round(facts["factor"], 6), original=facts["original"],
                             margin=self.margin, start=self.start)
        site.facts["dynamic_rope"]["chosen"] = str(chosen)
        return made


@register("dynamic_yarn")
@dataclass(frozen=True)
class DynamicYaRN(Recipe):
    """YaRN with the scale set per call from the longest position (s = clamp(margin·L/L₀, 1,
    factor), or with ``start``: clamp(1 + margin·(L/L₀ − start), 1, factor)), cache-consistent:
    keys are re-rotated to the call's frequencies at the attention. Below L₀/margin tokens
    (L₀·start with ``start``) the model is unchanged; ``above`` > 0 also keeps s = 1 up to
    that many tokens, then applies the schedule at once (hand-over from
    ``self_extend(..., until=above)``)."""

    factor: float = 4.0
    beta_fast: float = _opt(32.0)
    beta_slow: float = _opt(1.0)
    original: int | None = _opt(None)
    margin: float = _opt(1.0)
    start: float | None = _opt(None)
    above: int = _opt(0)
    mscale: float = _opt(1.0)

    def __post_init__(self):
        from longfx.passes.rope import _positive

        _positive("dynamic_yarn", factor=self.factor, beta_fast=self.beta_fast,
                  beta_slow=self.beta_slow, original=self.original, margin=self.margin)
        if not isinstance(self.mscale, (int, float)) or isinstance(self.mscale, bool) \
                or self.mscale < 0:
            raise ValueError(f"dynamic_yarn: mscale multiplies YaRN's temperature coefficient "
                             f"0.1 (0: no temperature), a number >= 0, got {self.mscale!r}")
        if self.start is not None and not 0 <= self.start:
            raise ValueError(f"dynamic_yarn: start is a multiple of the trained length, >= 0, "
                             f"got {self.start}")
        if not isinstance(self.above, int) or self.above < 0:
            raise ValueError(f"dynamic_yarn: above is a token count >= 0 (0: off), got "
                             f"{self.above!r}")

    def rules(self) -> list:
        return [ConsistentDynamicRule("yarn", self.factor, self.original, self.beta_fast,
                                      self.beta_slow, recipe=str(self), margin=self.margin,
                                      start=self.start, above=self.above,
                                      mscale=self.mscale)]
