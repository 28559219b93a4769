"""Vertical-slash sparse prefill: canonical ``longfx::attention`` → ``longfx::dynamic_sparse_prefill``.

    vertical_slash(vertical=1000, slash=6096, last_q=64, block=64)   MInference (Jiang et al.
                        2024): per head, the last ``last_q`` queries' attention picks the top
                        ``vertical`` key columns and the top ``slash`` diagonals (offsets i − j);
                        the pattern is run at block granularity through the block-table kernel

The rule (``DynamicSparseRule``) is shared with ``flex_prefill`` (passes/flex_prefill.py): both
make the site one ``longfx::dynamic_sparse_prefill`` call (kernels/block_sparse/estimate.py),
which builds a block table per call and runs it with ``longfx::block_sparse_attention``'s table
path (``op.attend_table``: Triton on CUDA, the gather elsewhere). Decode steps, calls below
``min_len`` keys and selections keeping more than ``estimate.DENSE_DENSITY`` of the causal
tiles run the canonical dense attention.

Like block_sparse, the mask is dropped only when analysis proved it "causal ∧ padding"; layers
with a native window are left as they are, and a site another sparse recipe made sparse is not
touched (one sparse recipe per site).
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.block_sparse import estimate
from longfx.kernels.block_sparse.estimate import OP as DYNAMIC
from longfx.passes.block_sparse import REPORT_CONTEXT, _check_block, _check_int
from longfx.passes.sparse import key_keep, padding_or_reason
from longfx.recipes import Recipe, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

__all__ = ["DynamicSparseRule", "VerticalSlash", "ARGS"]

# argument order after (q, k, v, key_keep, scale, softcap)
ARGS = ("method", "block", "vertical", "slash", "last_q", "gamma", "tau", "min_len")
OFF = dict(method="vertical_slash", block=64, vertical=1, slash=1, last_q=64, gamma=1.0,
           tau=0.0, min_len=0)


class DynamicSparseRule(Rule):
    """Make a canonical site ``longfx::dynamic_sparse_prefill`` with ``params`` (``ARGS``)."""

    kind = "attention"
    stage = "transform"

    def __init__(self, name: str, params: dict[str, Any], recipe: str = ""):
        unknown = set(params) - set(ARGS)
        if unknown:
            raise ValueError(f"unknown dynamic-sparse parameters {sorted(unknown)}")
        self.name, self.params, self.recipe = name, dict(params), recipe
        self._sites: list[Site] = []

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        if site.facts.get("sparse"):
            return f"already sparse ({site.facts.get('sparse')}): one sparse recipe per site"
        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target is not DENSE or not node.users:
            return site.reason or "the site is not canonical (no longfx::attention to rewrite)"
        pad = padding_or_reason(site, self._sites)
        if isinstance(pad, str):
            return pad
        return {"node": node, "padding": pad}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        g = gm.graph
        made: list[fx.Node] = []
        q, k, v, _mask, scale, _causal, softcap = node.args
        values = dict(OFF, **self.params)
        with g.inserting_before(node):
            keep = None if facts["padding"] is None else key_keep(g, made, facts["padding"], k)
            new = G.call(g, made, DYNAMIC, q, k, v, keep, scale, softcap,
                         *(values[a] for a in ARGS))
        replace_uses(node, new)
        site.nodes["sparse"] = new          # other sparse rules see a rewritten site
        site.nodes["dynamic_sparse"] = new
        describe(site, values)
        return made


def describe(site: Site, v: dict[str, Any]) -> None:
    """Site facts: the spec, and ``density`` — the data-free upper bound at REPORT_CONTEXT for
    vertical_slash, 1.0 for flex_prefill (its budget depends on the data: measure it with
    ``longfx.kernels.block_sparse.op.record_density``)."""
    if v["method"] == "vertical_slash":
        spec = (f"vertical_slash vertical={v['vertical']} slash={v['slash']} "
                f"last_q={v['last_q']} block={v['block']} min_len={v['min_len']}")
        d = estimate.dense_bound(REPORT_CONTEXT, v["block"], v["vertical"], v["slash"])
        site.facts["density_kind"] = "upper bound (data-free)"
    else:
        spec = (f"flex_prefill gamma={v['gamma']} tau={v['tau']} block={v['block']} "
                f"min_len={v['min_len']}")
        d = 1.0
        site.facts["density_kind"] = "adaptive (measure with record_density)"
    site.facts["sparse"] = spec
    site.facts["density"] = d                 # read by rewrite/report.py (attention FLOPs)
    site.facts["density_context"] = REPORT_CONTEXT
    site.facts["dynamic_sparse"] = dict(v)


def recipe_error(name: str):
    def check_block(field: str, value: Any) -> None:
        _check_block(f"{name}: {field}", value)

    def check_int(field: str, value: Any, low: int) -> None:
        _check_int(f"{name}: {field}", value, low)
    return check_block, check_int


@register("vertical_slash")
class VerticalSlash(Recipe):
    """MInference vertical-slash prefill: per head, the top ``vertical`` key columns and the top
    ``slash`` diagonals of the last ``last_q`` queries' attention, run as a block table.

    At block granularity the pattern is covered exactly: a key block is kept for a query block
    iff the tile holds a chosen column or intersects a chosen diagonal, so the attended set is a
    superset of the token-level pattern within those tiles. The first 30 key columns and the
    offsets 0..99 (the local band) are always among the chosen lines, as in MInference.
    ``block``: tokens per tile (power of two >= 16). ``min_len``: below this many keys the site
    runs dense (MInference's defaults are tuned for 128k contexts; at 8k use smaller budgets)."""

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    block: int = 64
    min_len: int = 16384

    def __post_init__(self):
        check_block, check_int = recipe_error("vertical_slash")
        check_int("vertical", self.vertical, 1)
        check_int("slash", self.slash, 1)
        check_int("last_q", self.last_q, 1)
        check_block("block", self.block)
        check_int("min_len", self.min_len, 0)

    def params(self) -> dict[str, Any]:
        return dict(method="vertical_slash", block=self.block, vertical=self.vertical,
                    slash=self.slash, last_q=self.last_q, min_len=self.min_len)

    def rules(self) -> list:
        return [DynamicSparseRule("sparse.vertical_slash", self.params(), recipe=str(self))]
