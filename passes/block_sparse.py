"""Dynamic block-sparse recipes: canonical ``longfx::attention`` → ``longfx::block_sparse_attention``.

    block_sparse(block=64, density=0.1, sink=64, window=128)   MInference (Jiang et al. 2024)
                                       block_sparse prefill: per head, the key blocks of each
                                       query block are ranked at run time from mean-pooled
                                       q/k blocks (or the last ``last_q`` queries' attention)
    decode_topk(blocks=128, block=16, sink=16, window=64)      Quest (Tang et al. 2024): at
                                       decode, per-block key min/max give an upper bound of
                                       q·k; the best blocks per KV head (``select="kv_head"``,
                                       LServe-style; ``"head"``: per query head) are read

Both keep sink blocks, the local window and the diagonal, and compose on one site
(``block_sparse(...) + decode_topk(...)``: each sets its half of the op's arguments). The op
decides per call: decode steps (S <= 16) use the Quest table only when ``decode_topk`` is in
the recipe, prefill uses the estimated table only from ``min_len`` keys on and when the budget
skips something; everything else is the canonical dense attention. See
kernels/block_sparse/op.py.

The mask is dropped only when analysis proved it "causal ∧ padding" (the same proof as
passes/sparse.py: ``padding_of``); layers with a native window (Gemma local layers, Mistral)
are left as they are, and a site another sparse recipe made sparse is not touched.

Where ``decode_topk``'s bounds come from: ``longfx.compile`` gives the model a
``runtime/bounds_cache.py:QuestCache`` (when no other recipe owns the KV cache), which keeps
Quest's per-block key min/max with the keys and updates them on append through
``longfx::quest_bounds_append``. :class:`DecodeBoundsRule` (stage ``lower``) finds that op in
the graph and hands its ``kmin``/``kmax`` to the site's op when the site's keys are exactly
the store the op keeps bounds of (``k_store[:, :, :end]``, same ``end``, same block), so a
decode step reads the bounds instead of K. Any other cache (``kv_quant``, eviction, a cache the
caller passes in) keeps the bounds recomputed from K each step, with the reason in the report.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.block_sparse import op as bs_op
from longfx.kernels.block_sparse.op import OP as BLOCK_SPARSE
from longfx.kernels.block_sparse.reference import ESTIMATES, SELECTS, expected_density
from longfx.kernels.sparse_attention.op import OP as SPARSE
from longfx.passes.sparse import key_keep, padding_or_reason
from longfx.recipes import Recipe, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

__all__ = ["BlockSparseRule", "DecodeBoundsRule", "BlockSparse", "DecodeTopk",
           "REPORT_CONTEXT"]

REPORT_CONTEXT = 8192        # the context of the density a site's report row carries
_N = len(bs_op.PARAMS)


class BlockSparseRule(Rule):
    """Make a site ``longfx::block_sparse_attention`` (or amend one) with ``params`` (a subset
    of ``op.PARAMS``: the prefill or the decode half)."""

    kind = "attention"
    stage = "transform"

    def __init__(self, name: str, params: dict[str, Any], recipe: str = ""):
        unknown = set(params) - set(bs_op.PARAMS)
        if unknown:
            raise ValueError(f"unknown block-sparse parameters {sorted(unknown)}")
        self.name, self.params, self.recipe = name, dict(params), recipe
        self._sites: list[Site] = []

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites                  # KV sites tell a decode step from cross-attention

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("block_sparse") or site.nodes.get("sparse") or \
            site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target not in (DENSE, SPARSE, BLOCK_SPARSE):
            return site.reason or "the site is not canonical (no longfx::attention to rewrite)"
        if node.target is SPARSE:
            return f"already sparse ({site.facts.get('sparse')}): one sparse recipe per site"
        facts: dict[str, Any] = {"node": node}
        if node.target is BLOCK_SPARSE:
            return facts
        pad = padding_or_reason(site, self._sites)
        if isinstance(pad, str):
            return pad
        facts["padding"] = pad
        return facts

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        g = gm.graph
        made: list[fx.Node] = []
        if node.target is BLOCK_SPARSE:
            head = list(node.args[:6])
            values = dict(zip(bs_op.PARAMS, node.args[6:6 + _N]))
        else:
            q, k, v, _mask, scale, _causal, softcap = node.args
            values = dict(bs_op.OFF)
            head = [q, k, v, None, scale, softcap]
        values.update(self.params)
        with g.inserting_before(node):
            if node.target is not BLOCK_SPARSE and facts["padding"] is not None:
                head[3] = key_keep(g, made, facts["padding"], head[1])
            new = G.call(g, made, BLOCK_SPARSE, *head, *(values[p] for p in bs_op.PARAMS))
        replace_uses(node, new)
        if node.target is BLOCK_SPARSE and not node.users:
            g.erase_node(node)
        site.nodes["block_sparse"] = new
        _describe(site, values)
        return made


def _describe(site: Site, v: dict[str, Any]) -> None:
    parts = []
    if v["topk"] or v["density"]:
        parts.append(f"prefill block={v['block']} " + (f"topk={v['topk']}" if v["topk"] else
                     f"density={v['density']}") + f" sink={v['sink']} window={v['window']} "
                     f"estimate={v['estimate']} min_len={v['min_len']}")
        d = expected_density(REPORT_CONTEXT, v["block"], v["topk"], v["density"], v["sink"],
                             v["window"])
        site.facts["density"] = d                 # read by rewrite/report.py (attention FLOPs)
        site.facts["density_context"] = REPORT_CONTEXT
    if v["decode_topk"] or v["decode_density"]:
        parts.append(f"decode block={v['decode_block']} " +
                     (f"blocks={v['decode_topk']}" if v["decode_topk"] else
                      f"density={v['decode_density']}") +
                     f" sink={v['decode_sink']} window={v['decode_window']} "
                     f"min_len={v['decode_min_len']} select={v['decode_select']}")
    site.facts["sparse"] = "; ".join(parts)
    site.facts["block_sparse"] = dict(v)


class DecodeBoundsRule(Rule):
    """Lower stage: a ``decode_topk`` site whose keys are a ``QuestCache`` store's read gets the
    store's kept bounds (module docstring). Checks, in the captured graph:

    * the site is a ``longfx::block_sparse_attention`` with the decode half on and no bounds yet;
    * its keys are ``k_store[:, :, :end]`` (a slice from 0 of a graph input on the sequence axis);
    * a ``longfx::quest_bounds_append(kmin, kmax, k_store, start, end, block)`` of that same
      store comes before it, with the same ``end`` (so the bounds cover exactly these keys) and
      ``block`` equal to the site's decode block."""

    name = "sparse.decode_topk_bounds"
    kind = "attention"
    stage = "lower"

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        from longfx.passes.kv_quant_decode import _seq_slice

        node = site.nodes.get("block_sparse")
        if not isinstance(node, fx.Node) or node.target is not BLOCK_SPARSE \
                or node.graph is not gm.graph:
            return "not a block-sparse site (decode_topk did not rewrite it)"
        values = dict(zip(bs_op.PARAMS, node.args[6:6 + _N]))
        if not (values.get("decode_topk") or values.get("decode_density")):
            return "decode_topk is not in the recipe: decode steps are dense"
        if len(node.args) > 6 + _N or node.kwargs:
            return "the site has its bounds already"
        got = _seq_slice(node.args[1])
        if got is None:
            return "its keys are not a slice of a cache store: the bounds are recomputed " \
                   "from the keys each decode step (no QuestCache, e.g. another KV-cache recipe)"
        store, start, end = got
        if start not in (None, 0) or not isinstance(store, fx.Node) \
                or store.op != "placeholder":
            return "its keys are not the start of a cache store: bounds recomputed"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        appends = [u for u in store.users if u.target is bs_op.BOUNDS_APPEND
                   and len(u.args) == 6 and u.args[2] is store and order[u] < order[node]]
        if not appends:
            return "no quest_bounds_append of the key store before the attention: bounds " \
                   "recomputed from the keys"
        append = appends[-1]
        if append.args[4] is not end and not (isinstance(end, int) and append.args[4] == end):
            return "the kept bounds end elsewhere than the keys read: bounds recomputed"
        if append.args[5] != values["decode_block"]:
            return f"the cache keeps bounds of {append.args[5]}-token blocks, decode_topk " \
                   f"selects {values['decode_block']}-token blocks: bounds recomputed"
        return {"node": node, "kmin": append.args[0], "kmax": append.args[1]}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        made: list[fx.Node] = []
        with gm.graph.inserting_before(node):
            new = G.call(gm.graph, made, BLOCK_SPARSE, *node.args[:6 + _N], facts["kmin"],
                         facts["kmax"])
        replace_uses(node, new)
        gm.graph.erase_node(node)
        site.nodes["block_sparse"] = new
        site.facts["decode_bounds"] = "kept with the cache"
        return made


# ==============================================================================================
# Recipes


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_block(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (the kernel's tile), got {value!r}")


def _check_budget(name: str, count_name: str, count: Any, density: Any) -> None:
    if count is not None and density is not None:
        raise ValueError(f"{name}: give {count_name} or density, not both")
    if count is not None:
        _check_int(f"{name}: {count_name}", count, 1)
    if density is not None and (not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ValueError(f"{name}: density must be in (0, 1], got {density!r}")


@register("block_sparse")
class BlockSparse(Recipe):
    """MInference block-sparse prefill: per head, each query block attends its top key blocks
    (estimated at run time) plus sink, window and diagonal blocks.

    ``block``: tokens per block (power of two >= 16; 64 as in MInference, the Triton table
    kernel's tile). Budget per query block: ``topk`` blocks or ``density`` (fraction of its
    causal blocks; default 0.1 when neither is given), forced blocks included. ``sink`` /
    ``window``: tokens always kept (rounded out to blocks). ``estimate``: "pooled" (mean-pooled
    q/k blocks, MInference block_sparse) or "last_q" (attention of the last ``last_q``
    queries, one ranking for all query blocks). ``min_len``: below this many keys the site
    runs dense (the GPU crossover guess; see docs/sparse.md)."""

    block: int = 64
    topk: int | None = None
    density: float | None = None
    sink: int = 64
    window: int = 128
    estimate: str = "pooled"
    last_q: int = 64
    min_len: int = 16384

    def __post_init__(self):
        _check_block("block_sparse: block", self.block)
        _check_budget("block_sparse", "topk", self.topk, self.density)
        _check_int("block_sparse: sink", self.sink, 0)
        _check_int("block_sparse: window", self.window, 0)
        _check_int("block_sparse: last_q", self.last_q, 1)
        _check_int("block_sparse: min_len", self.min_len, 0)
        if self.estimate not in ESTIMATES:
            raise ValueError(f"block_sparse: estimate must be one of {ESTIMATES}, "
                             f"got {self.estimate!r}")

    def params(self) -> dict[str, Any]:
        density = 0.1 if self.topk is None and self.density is None else (self.density or 0.0)
        return dict(block=self.block, topk=self.topk or 0, density=float(density),
                    sink=self.sink, window=self.window, estimate=self.estimate,
                    last_q=self.last_q, min_len=self.min_len)

    def rules(self) -> list:
        return [BlockSparseRule("sparse.block_sparse", self.params(), recipe=str(self))]


@register("decode_topk")
class DecodeTopk(Recipe):
    """Quest query-aware block selection at decode: per head, keep the ``blocks`` key blocks
    (or ``density`` of them) with the largest min/max upper bound of q·k, plus sink and window.

    ``block``: tokens per block (power of two >= 16; Quest pages are 16). Default budget: 128
    blocks. ``min_len``: below this many keys decode stays dense (default 16384: on an H100 the
    step over the kept bounds is 0.49× / 0.56× / 1.0× / 1.39× the speed of dense SDPA at
    4k / 8k / 16k / 32k keys, benchmarks/results/decode_topk_cache*_h100.json). Prefill is untouched (dense,
    or ``block_sparse`` when that recipe is in the pipeline too). ``select``: ``"kv_head"``
    (default; LServe, Yang et al. 2025: one selection per KV head, the bounds of its query-head
    group max-reduced, so each kept block is read once for the group) or ``"head"`` (Quest's
    own per-query-head selection). The per-block min/max are kept with the KV cache
    (``runtime/bounds_cache.py:QuestCache``, which ``longfx.compile`` gives the model) and
    updated on append; with another KV-cache recipe they are recomputed from K each step."""

    blocks: int | None = None
    block: int = 16
    density: float | None = None
    sink: int = 16
    window: int = 64
    min_len: int = 16384
    select: str = field(default="kv_head", metadata={"omit_default": True})

    def __post_init__(self):
        _check_block("decode_topk: block", self.block)
        _check_budget("decode_topk", "blocks", self.blocks, self.density)
        _check_int("decode_topk: sink", self.sink, 0)
        _check_int("decode_topk: window", self.window, 0)
        _check_int("decode_topk: min_len", self.min_len, 0)
        if self.select not in SELECTS:
            raise ValueError(f"decode_topk: select must be one of {SELECTS}, "
                             f"got {self.select!r}")

    def params(self) -> dict[str, Any]:
        blocks = 128 if self.blocks is None and self.density is None else (self.blocks or 0)
        return dict(decode_block=self.block, decode_topk=blocks,
                    decode_density=float(self.density or 0.0), decode_sink=self.sink,
                    decode_window=self.window, decode_min_len=self.min_len,
                    decode_select=self.select)

    def rules(self) -> list:
        return [BlockSparseRule("sparse.decode_topk", self.params(), recipe=str(self)),
                DecodeBoundsRule()]

    def make_bounds_cache(self, model=None):
        """A fresh, empty ``QuestCache`` (bounds of ``block``-token blocks) for ``model``;
        ``longfx.compile`` uses it when no other recipe owns the KV cache."""
        from longfx.runtime.bounds_cache import QuestCache

        return QuestCache(self.block, config=getattr(model, "config", None))
