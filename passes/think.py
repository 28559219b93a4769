"""Key-cache channel pruning recipe: ``think(ratio=0.5, window=32)``.

ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018;
upstream SalesforceAIResearch/ThinK): after each prefill chunk, each KV head scores its key
channels by ``||Q[:, c]|| · ||K[:, c]||`` over the chunk's last ``window`` queries (its query
heads pooled) and keeps the top ``ceil((1 − ratio) · D)``; the pruned keys are stored compactly
``[B, Hkv, L, Dk]`` with their channel indices, values whole, the last ``window`` keys and the
decode tokens whole until the next chunk. Each chunk is pruned once, with its own channel set.
``ratio`` in [0, 1) is the fraction of key channels pruned (``ratio=0`` keeps every channel:
exact).

Like ``kv_quant`` and the eviction recipes it changes the runtime state, not the graph:
``make_cache(model)`` gives a :class:`longfx.runtime.think_cache.ThinKCache` (query hooks
installed), picked up by ``longfx.compile`` through
:func:`longfx.passes.kv_quant.cache_recipe`; one KV-cache recipe per pipeline.
"""
from __future__ import annotations

from longfx.kernels.kv_think import reference as R
from longfx.recipes import Recipe, RecipeError, register

__all__ = ["ThinK"]


@register("think")
class ThinK(Recipe):
    """ThinK: query-driven pruning of key-cache channels, per KV head and prefill chunk."""

    ratio: float = 0.5
    window: int = 32

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not (0.0 <= float(self.ratio) < 1.0):
            raise RecipeError(f"think: ratio (the fraction of key channels pruned) must be in "
                              f"[0, 1), got {self.ratio!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise RecipeError(f"think: window must be an integer >= 1, got {self.window!r}")

    @property
    def policy(self) -> R.ThinKConfig:
        return R.ThinKConfig(float(self.ratio), self.window)

    def make_cache(self, model=None):
        """A fresh, empty ThinK cache for ``model`` (query hooks installed on it)."""
        from longfx.runtime.think_cache import ThinKCache

        return ThinKCache(self.policy, config=getattr(model, "config", None), model=model)
