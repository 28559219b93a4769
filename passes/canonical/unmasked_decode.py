"""A decode step's all-visible mask is dropped, so the canonical op runs SDPA's fused kernel.

One query at the last position of a self-attention KV cache sees every cached key, so a mask
computed from sizes alone (``arange`` and comparisons on the cache length, no tensor input that
could carry padding: ``passes/sparse.py:mask_from_sizes``) hides nothing there. transformers
5.17 builds such a mask for SmolLM2's one-query decode; 5.23 builds none. With the mask the
canonical ``longfx::attention`` runs its masked paths on CUDA (grouped.py: the reference's
arithmetic, K/V read once); without it, SDPA's flash kernel takes the whole call
(``op.unmasked_sdpa_can_run``): 0.093 / 0.225 / 0.402 ms against 0.257 / 0.436 / 0.631 ms at
32k B=1 / 128k B=1 / 32k B=8 on an H100 (kernels/attention/op.py has the setting). In the
whole Llama-8B-shaped model (8 layers, transformers 5.17, eager launches) the gain is below the
host noise: a compiled dense decode step's fastest step was 6.9 / 8.6 / 12.6 ms with the mask
dropped (benchmarks/results/debug/kv_quant_model_decode_run6_h100.json) and 7.2 / 9.8 / 14.2 ms in the
previous run with it (results/debug/kv_quant_model_decode_run4_h100.json), while the medians of
both runs swing with the machine (steps alternate between two levels).

The proof is ``one_query_decode``'s (one query, mask from sizes, the analysis names the mask
"full", keys from a one-token KV append or a kv_quant decode read, not flagged causal), and
the site must have no window of its own (a sliding layer's cache may hold keys its mask hides).
Dropping an all-true mask changes nothing the reference computes (``where(True, s, -inf)`` and
``s + 0`` are exact), so CPU results stay bit-exact. A ``lower``-stage canonical rule: it sees
the graph after every recipe and only touches attentions still canonical.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.passes.sparse import native_window, one_query_decode
from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import Site

__all__ = ["UnmaskedDecode"]

MASK_ARG = 3            # longfx::attention(q, k, v, mask, scale, is_causal, softcap)


class UnmaskedDecode(Rule):
    """``longfx::attention(q, k, v, mask, ...)`` of a one-query decode step whose mask is
    provably all-visible becomes ``longfx::attention(q, k, v, None, ...)``."""

    name = "attention.unmasked_decode"
    kind = "attention"
    stage = "lower"

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self.sites = sites

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.graph is not gm.graph \
                or node.target is not DENSE or getattr(node, "_erased", False):
            return "not a canonical dense attention (a recipe rewrote it, or none was made)"
        if not isinstance(node.args[MASK_ARG], fx.Node):
            return "no mask to drop"
        if native_window(site):
            return f"the layer attends a native window of {native_window(site)}"
        if not one_query_decode(site, self.sites):
            return "not a one-query decode step over every cached key with a mask from sizes"
        return {"node": node}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        args = list(node.args)
        args[MASK_ARG] = None                       # the mask's own nodes die with their last use
        node.args = tuple(args)
        site.facts["decode_mask"] = "dropped (all keys visible)"
        return []
