"""FlexPrefill sparse prefill: canonical ``longfx::attention`` → ``longfx::dynamic_sparse_prefill``.

    flex_prefill(gamma=0.9, tau=0.1, block=64)   FlexPrefill (Lai et al. 2025, ICLR): per head,
                        a query-aware or a vertical-slash pattern (chosen by the Jensen–Shannon
                        distance between estimated and true block attention of the last block),
                        then the fewest blocks / lines reaching ``gamma`` of the attention mass

The rewrite is passes/vertical_slash.py's ``DynamicSparseRule``; the selection is
kernels/block_sparse/estimate.py (``flex_choice``).
"""
from __future__ import annotations

from typing import Any

from longfx.passes.vertical_slash import DynamicSparseRule, recipe_error
from longfx.recipes import Recipe, register

__all__ = ["FlexPrefill"]


@register("flex_prefill")
class FlexPrefill(Recipe):
    """FlexPrefill: per head, query-aware or vertical-slash blocks covering ``gamma`` of the
    estimated attention mass (an adaptive budget per head and per call).

    ``tau``: a head whose sqrt-JS divergence between the pooled estimate and the true block
    distribution of the last ``block`` queries is below ``tau`` uses the query-aware pattern
    (pooled q·k per block pair, the fewest pairs reaching ``gamma`` of the row-normalized
    mass); the others use vertical-slash lines reaching ``gamma`` of the column and of the
    diagonal mass. The first key block and the diagonal are always kept. ``gamma=1`` keeps every
    causal block. ``block``: tokens per tile (power of two >= 16); ``min_len``: below this many
    keys the site runs dense."""

    gamma: float = 0.9
    tau: float = 0.1
    block: int = 64
    min_len: int = 16384

    def __post_init__(self):
        check_block, check_int = recipe_error("flex_prefill")
        for field in ("gamma", "tau"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"flex_prefill: {field} must be a number, got {value!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"flex_prefill: gamma must be in (0, 1], got {self.gamma!r}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"flex_prefill: tau must be in [0, 1], got {self.tau!r}")
        check_block("block", self.block)
        check_int("min_len", self.min_len, 0)

    def params(self) -> dict[str, Any]:
        return dict(method="flex", block=self.block, gamma=float(self.gamma),
                    tau=float(self.tau), min_len=self.min_len, last_q=self.block)

    def rules(self) -> list:
        return [DynamicSparseRule("sparse.flex_prefill", self.params(), recipe=str(self))]
