"""Cross-layer KV merging recipe: ``minicache(start_layer=None, t=0.5, threshold=0.25)``.

MiniCache (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large
Language Models", arXiv:2405.14366): from ``start_layer`` (default: half the layers) adjacent
layers (l, l+1) store one direction per token and head — their key (value) directions merged
by SLERP at ``t`` — and each layer's norms; a pair whose directions are more than
``threshold`` apart (normalized angle Ω/π: 0 same, 0.5 orthogonal, 1 opposite) is retained
unmerged for both layers. ``threshold=1`` merges every pair; ``threshold=0`` retains every pair
that is not already aligned (exact). Math: ``kernels/kv_minicache/reference.py``.

The recipe changes the runtime state, not the graph: ``make_cache(model)`` gives a
:class:`longfx.runtime.minicache_cache.MiniCache`, picked up by ``longfx.compile`` through
:func:`longfx.passes.kv_quant.cache_recipe`; one KV-cache recipe per pipeline.
"""
from __future__ import annotations

from dataclasses import field

from longfx.recipes import Recipe, RecipeError, register

__all__ = ["MiniCacheRecipe"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@register("minicache")
class MiniCacheRecipe(Recipe):
    """MiniCache: adjacent layers share one merged direction per token (SLERP), norms per
    layer, distant pairs retained."""

    start_layer: int | None = field(default=None, metadata={"omit_default": True})
    t: float = 0.5
    threshold: float = 0.25

    def __post_init__(self):
        if self.start_layer is not None and (isinstance(self.start_layer, bool)
                                             or not isinstance(self.start_layer, int)
                                             or self.start_layer < 0):
            raise RecipeError(f"minicache: start_layer must be an integer >= 0 (or none: half "
                              f"the layers), got {self.start_layer!r}")
        if not _number(self.t) or not (0.0 <= float(self.t) <= 1.0):
            raise RecipeError(f"minicache: t (the SLERP weight) must be in [0, 1], got {self.t!r}")
        if not _number(self.threshold) or not (0.0 <= float(self.threshold) <= 1.0):
            raise RecipeError(f"minicache: threshold (a normalized angle) must be in [0, 1], "
                              f"got {self.threshold!r}")

    @property
    def policy(self):
        from longfx.runtime.minicache_cache import MiniCacheConfig

        return MiniCacheConfig(self.start_layer, float(self.t), float(self.threshold))

    def make_cache(self, model=None):
        """A fresh, empty MiniCache for ``model`` (its config gives the layers to pair)."""
        from longfx.runtime.minicache_cache import MiniCache

        config = getattr(model, "config", None)
        if config is None:
            raise RecipeError(f"{self}: needs the model (its config gives the layers to pair)")
        return MiniCache(self.policy, config=config)
