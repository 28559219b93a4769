"""KV-cache quantization recipe: ``kv_quant(bits=4, group=64, residual=128, sink=4)``.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
github.com/jy-yuan/KIVI): keys quantized per channel (a group of ``group`` tokens shares one
scale/zero per channel), values per token (groups of ``group`` channels), the most recent
``residual`` tokens (rounded up to whole groups) kept in full precision. ``bits`` is 8, 4 or 2;
``scales`` is ``u8`` (2 bytes a group: 8-bit log scale + int8 zero, the default) or ``fp16``
(KIVI's own 4 bytes a group). ``sink`` (default 4; 0 gives the plain KIVI state of earlier
versions): the first ``sink`` tokens — the attention sinks — are also kept exact in a
full-precision copy beside the packed state (measured on SmolLM2-135M, 2026-11-23: 4-bit
perplexity +1.05 % / +1.92 % over dense at 4k / 8k with sink=0, +0.33 % / +0.57 % with sink=4,
for 4 tokens of K + V per layer). Layout and kernels: ``kernels/kv_quant``.

The recipe changes the model's *runtime state*, not its graph: ``longfx.compile(model,
"kv_quant(bits=4)")`` gives a model whose forward swaps an empty (or absent) HF cache for a
:class:`longfx.runtime.cache.QuantizedCache`, which quantizes on append and hands attention the
dequantized keys/values (a transient copy; see runtime/cache.py for what prefill and decode
read). The graph's attention sites are left as they are, so the recipe composes with the
sparse and RoPE recipes (``sink_window(...) + kv_quant(bits=4)``); one KV-cache recipe per
pipeline.
"""
from __future__ import annotations

from dataclasses import field

from longfx.kernels.kv_quant.reference import BITS, SCALES, KVQuantConfig
from longfx.recipes import Recipe, RecipeError, register

__all__ = ["KVQuant", "cache_recipe"]


def check_state_args(name: str, r: Recipe) -> None:
    """The KIVI-state arguments shared by ``kv_quant`` and ``gear``: bits, group, residual,
    scales, sink; a RecipeError naming the recipe."""
    if r.bits not in BITS:
        raise RecipeError(f"{name}: bits must be one of {', '.join(map(str, BITS))}, "
                          f"got {r.bits!r}")
    if not isinstance(r.group, int) or r.group < 1:
        raise RecipeError(f"{name}: group must be an integer >= 1, got {r.group!r}")
    if not isinstance(r.residual, int) or r.residual < 0:
        raise RecipeError(f"{name}: residual must be an integer >= 0, got {r.residual!r}")
    if r.scales not in SCALES:
        raise RecipeError(f"{name}: scales must be one of {', '.join(SCALES)}, "
                          f"got {r.scales!r}")
    if not isinstance(r.sink, int) or r.sink < 0:
        raise RecipeError(f"{name}: sink must be an integer >= 0, got {r.sink!r}")


@register("kv_quant")
class KVQuant(Recipe):
    """KIVI KV-cache quantization: keys per channel, values per token, recent tokens and the
    first ``sink`` tokens in full precision, state stored packed (8/4/2-bit) in a longfx cache."""

    bits: int = 4
    group: int = 64
    residual: int = 128
    scales: str = field(default="u8", metadata={"omit_default": True})
    sink: int = 4

    def __post_init__(self):
        check_state_args("kv_quant", self)

    @property
    def kv_config(self) -> KVQuantConfig:
        return KVQuantConfig(self.bits, self.group, self.residual, self.scales)

    def make_cache(self, model=None):
        """A fresh, empty quantized cache for ``model`` (its config sizes the layer list)."""
        from longfx.runtime.cache import QuantizedCache

        return QuantizedCache(self.kv_config, config=getattr(model, "config", None), sink=self.sink)


def cache_recipe(pipeline) -> Recipe | None:
    """The pipeline's one recipe that provides a runtime KV cache (``make_cache``), or None.
    Two of them cannot share a cache: that is a RecipeError."""
    found = [r for r in pipeline.recipes if callable(getattr(r, "make_cache", None))]
    if len(found) > 1:
        raise RecipeError(f"{' + '.join(map(str, found))}: one KV-cache recipe per pipeline "
                          "(each replaces the model's cache)")
    return found[0] if found else None
