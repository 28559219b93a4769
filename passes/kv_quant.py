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
for 4 tokens of K + V per layer). Two options cost no bytes and are off by default:
``rotate=true`` stores each head's keys and values multiplied by a fixed orthogonal
Hadamard-with-signs matrix and un-rotates them on read (QuaRot-style incoherence processing),
``clip=true`` picks each group's range among a few clip ratios by squared error
(``kernels/kv_quant/reference.py``). Layout and kernels: ``kernels/kv_quant``.

The recipe changes the model's *runtime state*, not its graph: ``longfx.compile(model,
"kv_quant(bits=4)")`` gives a model whose forward swaps an empty (or absent) HF cache for a
:class:`longfx.runtime.cache.QuantizedCache`, which quantizes on append and hands attention the
dequantized keys/values (a transient copy; see runtime/cache.py for what prefill and decode
read). The graph's attention sites are left as they are, so the recipe composes with the
sparse and RoPE recipes (``sink_window(...) + kv_quant(bits=4)``), and with SnapKV eviction:
``snapkv(ratio=0.5) + kv_quant(bits=4)`` stores the kept tokens quantized (:func:`cache_recipe`,
``docs/kv_eviction.md``). Any other pair of KV-cache recipes is a RecipeError.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from longfx.kernels.kv_quant.reference import BITS, SCALES, KVQuantConfig
from longfx.recipes import Recipe, RecipeError, register

__all__ = ["KVQuant", "EvictQuantized", "cache_recipe"]


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
    rotate: bool = field(default=False, metadata={"omit_default": True})
    clip: bool = field(default=False, metadata={"omit_default": True})

    def __post_init__(self):
        check_state_args("kv_quant", self)
        for name in ("rotate", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"kv_quant: {name} must be true or false, "
                                  f"got {getattr(self, name)!r}")

    @property
    def kv_config(self) -> KVQuantConfig:
        return KVQuantConfig(self.bits, self.group, self.residual, self.scales, self.rotate,
                             self.clip)

    def make_cache(self, model=None):
        """A fresh, empty quantized cache for ``model`` (its config sizes the layer list)."""
        from longfx.runtime.cache import QuantizedCache

        return QuantizedCache(self.kv_config, config=getattr(model, "config", None), sink=self.sink)


@dataclass(frozen=True)
class EvictQuantized:
    """``snapkv(...) + kv_quant(...)`` (or ``+ gear(...)``): the eviction recipe's cache whose
    layers store the kept tokens in the quantization recipe's KIVI state (Li et al. 2024,
    arXiv:2404.14469, + Liu et al. 2024, arXiv:2402.02750; ``runtime/evict_cache.py``,
    ``QuantizedStore``). Made by :func:`cache_recipe`, not registered: write the two recipes."""
    evict: Recipe
    quant: Recipe

    def __str__(self):
        return f"{self.evict} + {self.quant}"

    def make_cache(self, model=None):
        """A fresh, empty ``EvictCache`` for ``model`` whose layers hold quantized storage."""
        return self.evict.make_cache(model, store=self.quant)


def cache_recipe(pipeline) -> Recipe | EvictQuantized | None:
    """The pipeline's runtime KV-cache provider (a recipe with ``make_cache``), or None.

    Two of them share one cache only as SnapKV eviction + quantization (``snapkv(...) +
    kv_quant(...)`` or ``snapkv(...) + gear(...)``, in either order): an
    :class:`EvictQuantized`. Any other pair is a RecipeError."""
    from longfx.passes.gear import GearRecipe
    from longfx.passes.kv_evict import H2O, SnapKV, StreamingKV

    found = [r for r in pipeline.recipes if callable(getattr(r, "make_cache", None))]
    if len(found) <= 1:
        return found[0] if found else None
    names = " + ".join(map(str, found))
    evict = [r for r in found if isinstance(r, (SnapKV, H2O, StreamingKV))]
    quant = [r for r in found if isinstance(r, (KVQuant, GearRecipe))]
    if len(found) == 2 and len(quant) == 1 and len(evict) == 1:
        if isinstance(evict[0], SnapKV):
            return EvictQuantized(evict[0], quant[0])
        raise RecipeError(
            f"{names}: {str(evict[0]).split('(')[0]} evicts at every decode token, and a quantized store re-quantizes the kept keys at "
            "each eviction (KIVI's key scales are shared by a group of tokens), so their rounding "
            "error would grow with every generated token; only snapkv(...) composes with "
            "kv_quant(...) / gear(...)")
    raise RecipeError(
        f"{names}: one KV-cache recipe per pipeline (each replaces the model's cache), except "
        "snapkv(...) + kv_quant(...) or snapkv(...) + gear(...), which store SnapKV's kept tokens "
        "quantized; think(...) and minicache(...) compose with no other KV-cache recipe, and a "
        "pipeline holds at most one eviction and one quantization recipe")
