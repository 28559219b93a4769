"""GEAR KV-cache compression recipe: ``gear(bits=4, rank=4, outliers=0.01, group=64, residual=128, sink=4)``.

GEAR (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM"): the KIVI state of ``kv_quant`` (keys per channel, values per
token, ``residual`` recent tokens in full precision) plus, for every packed group of ``group``
tokens and each KV head, the ``outliers`` fraction of entries kept exactly (sparse) and a
rank-``rank`` approximation of the remaining quantization error (low rank), both **stored** in
the cache (``runtime.cache.GearCache``; layout and bytes in ``kernels/kv_quant/gear.py``) and
added back on every read. ``sink`` (default 4) keeps the first tokens exact as in ``kv_quant``.

Like ``kv_quant`` it changes the runtime state, not the graph: ``longfx.compile(model,
"gear(bits=2)")`` swaps in a ``GearCache``. Its bytes are its own (``gear.memory_ratio``):
rank 4 at group 64 and head_dim 64 adds 0.125× of bf16, 1 % outliers 0.02×.
"""
from __future__ import annotations

from dataclasses import field

from longfx.kernels.kv_quant.gear import GearConfig
from longfx.kernels.kv_quant.reference import KVQuantConfig
from longfx.passes.kv_quant import check_state_args
from longfx.recipes import Recipe, RecipeError, register

__all__ = ["GearRecipe"]


@register("gear")
class GearRecipe(Recipe):
    """GEAR: KIVI quantization + stored sparse outliers + stored low-rank error correction."""

    bits: int = 4
    rank: int = 4
    outliers: float = 0.01
    group: int = 64
    residual: int = 128
    scales: str = field(default="u8", metadata={"omit_default": True})
    sink: int = 4

    def __post_init__(self):
        check_state_args("gear", self)
        if not isinstance(self.rank, int) or self.rank < 0:
            raise RecipeError(f"gear: rank must be an integer >= 0, got {self.rank!r}")
        if not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 1:
            raise RecipeError(f"gear: outliers must be a fraction in [0, 1), got {self.outliers!r}")

    @property
    def gear_config(self) -> GearConfig:
        kv = KVQuantConfig(self.bits, self.group, self.residual, self.scales)
        return GearConfig(kv, self.rank, float(self.outliers))

    def make_cache(self, model=None):
        """A fresh, empty GEAR cache for ``model`` (its config sizes the layer list)."""
        from longfx.runtime.cache import GearCache

        return GearCache(self.gear_config, config=getattr(model, "config", None), sink=self.sink)
