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

Layer-wise mixed precision (off by default): ``key_bits=4, key_layers=(i, j)`` stores the keys
of decoder layers ``i`` and ``j`` with 4-bit codes while every other code stays at ``bits``
(KVTuner, Li et al. 2025, "KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache
Quantization"; keys are the sensitive half at 2 bits, as KIVI's K4V2 setting reflects);
``key_bits`` without ``key_layers`` widens every layer's keys. Which layers: a calibration on
text other than the evaluation's, :func:`calibrate_key_layers` (each layer's keys alone at
``bits``, KL divergence of the logits from the unquantized model), or any list one writes.

The recipe changes the model's *runtime state*: ``longfx.compile(model, "kv_quant(bits=4)")``
gives a model whose forward swaps an empty (or absent) HF cache for a
:class:`longfx.runtime.cache.QuantizedCache`, which quantizes on append and hands attention the
dequantized keys/values (a transient copy; see runtime/cache.py for what prefill and decode
read). Its one graph rule is a lowering (passes/kv_quant_decode.py): a one-token decode step's
read and attention become ``longfx::kv_quant_attention`` over the packed state (on CUDA the
Triton split-KV decode: no dequantized copy); ``fuse=false`` keeps the dequantized read. Every
other attention site is left as it is, so the recipe composes with the
sparse and RoPE recipes (``sink_window(...) + kv_quant(bits=4)``), and with SnapKV, H2O or
StreamingLLM eviction: ``snapkv(ratio=0.5) + kv_quant(bits=4)``, ``h2o(ratio=0.5) +
kv_quant(bits=4)`` and ``streaming_kv(sink=4, window=1024) + kv_quant(bits=4)`` store the kept
tokens quantized (:func:`cache_recipe`, ``docs/kv_eviction.md``). Any other pair of KV-cache
recipes is a RecipeError.
"""
from __future__ import annotations

import dataclasses
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
    key_bits: int | None = field(default=None, metadata={"omit_default": True})
    key_layers: tuple[int, ...] = field(default=(), metadata={"omit_default": True})
    fuse: bool = field(default=True, metadata={"omit_default": True})

    def __post_init__(self):
        check_state_args("kv_quant", self)
        for name in ("rotate", "clip", "fuse"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"kv_quant: {name} must be true or false, "
                                  f"got {getattr(self, name)!r}")
        if self.key_bits is not None and self.key_bits not in BITS:
            raise RecipeError(f"kv_quant: key_bits must be one of {', '.join(map(str, BITS))}, "
                              f"got {self.key_bits!r}")
        layers = tuple(self.key_layers)
        if layers and self.key_bits is None:
            raise RecipeError("kv_quant: key_layers names the layers whose keys get key_bits; "
                              "give key_bits too (e.g. key_bits=4)")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise RecipeError(f"kv_quant: key_layers must be layer indices >= 0, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise RecipeError(f"kv_quant: key_layers names a layer twice: {layers!r}")
        object.__setattr__(self, "key_layers", layers)

    @property
    def kv_config(self) -> KVQuantConfig:
        """The config of every layer not in ``key_layers`` (all layers when it is empty: then
        ``key_bits``, if set, applies to every layer's keys)."""
        kb = self.key_bits if not self.key_layers else None
        return KVQuantConfig(self.bits, self.group, self.residual, self.scales, self.rotate,
                             self.clip, None if kb == self.bits else kb)

    @property
    def layer_configs(self) -> dict[int, KVQuantConfig]:
        """{layer: config} of the ``key_layers`` (keys at ``key_bits``); empty otherwise."""
        if not self.key_layers or self.key_bits == self.bits:
            return {}
        wide = dataclasses.replace(self.kv_config, key_bits=self.key_bits)
        return {i: wide for i in self.key_layers}

    def rules(self) -> list:
        """The lowering of a decode step onto the packed state (passes/kv_quant_decode.py);
        none with ``fuse=false``."""
        from longfx.passes.kv_quant_decode import FusedQuantDecode

        return [FusedQuantDecode()] if self.fuse else []

    def make_cache(self, model=None):
        """A fresh, empty quantized cache for ``model`` (its config sizes the layer list; a
        ``key_layers`` index beyond it is a RecipeError)."""
        from longfx.runtime.cache import QuantizedCache

        try:
            return QuantizedCache(self.kv_config, config=getattr(model, "config", None),
                                  sink=self.sink, layer_kv=self.layer_configs)
        except ValueError as e:
            raise RecipeError(f"kv_quant: key_layers={self.key_layers!r}: {e}") from None


@dataclass(frozen=True)
class EvictQuantized:
    """``snapkv(...)``, ``h2o(...)`` or ``streaming_kv(...)`` ``+ kv_quant(...)`` (or ``+
    gear(...)``): the eviction recipe's cache whose layers store the kept tokens in the
    quantization recipe's KIVI state (Li et al. 2024, arXiv:2404.14469, Zhang et al. 2023,
    arXiv:2306.14048, or Xiao et al. 2023, arXiv:2309.17453, + Liu et al. 2024,
    arXiv:2402.02750; ``runtime/evict_cache.py``: ``QuantizedStore``, ``H2OQuantizedStore``,
    ``StreamingQuantizedStore``). Made by :func:`cache_recipe`, not registered: write the two
    recipes."""
    evict: Recipe
    quant: Recipe

    def __str__(self):
        return f"{self.evict} + {self.quant}"

    def make_cache(self, model=None):
        """A fresh, empty ``EvictCache`` for ``model`` whose layers hold quantized storage."""
        return self.evict.make_cache(model, store=self.quant)


def cache_recipe(pipeline) -> Recipe | EvictQuantized | None:
    """The pipeline's runtime KV-cache provider (a recipe with ``make_cache``), or None.

    Two of them share one cache only as eviction + quantization (``snapkv(...)`` /
    ``h2o(...)`` / ``streaming_kv(...)`` with ``kv_quant(...)`` / ``gear(...)``, in either
    order): an :class:`EvictQuantized`. Any other pair is a RecipeError."""
    from longfx.passes.gear import GearRecipe
    from longfx.passes.kv_evict import H2O, SnapKV, StreamingKV

    found = [r for r in pipeline.recipes if callable(getattr(r, "make_cache", None))]
    if len(found) <= 1:
        return found[0] if found else None
    names = " + ".join(map(str, found))
    evict = [r for r in found if isinstance(r, (SnapKV, H2O, StreamingKV))]
    quant = [r for r in found if isinstance(r, (KVQuant, GearRecipe))]
    if len(found) == 2 and len(quant) == 1 and len(evict) == 1:
        return EvictQuantized(evict[0], quant[0])
    raise RecipeError(
        f"{names}: one KV-cache recipe per pipeline (each replaces the model's cache), except "
        "snapkv(...), h2o(...) or streaming_kv(...) + kv_quant(...) or gear(...), which store "
        "the kept tokens quantized; think(...) and minicache(...) compose with no other KV-cache "
        "recipe, and a pipeline holds at most one eviction and one quantization recipe")


# ---------------------------------------------------------------- layer calibration (key_layers)

CALIBRATION_MODULES = (
    "json", "argparse", "logging", "subprocess", "collections", "email.message", "http.client",
    "unittest.case", "threading", "asyncio.events", "sqlite3", "csv", "zipfile", "tarfile",
    "inspect", "ast", "dataclasses", "enum", "decimal", "fractions", "datetime", "shutil",
    "tempfile", "configparser", "optparse", "pickle", "socket", "difflib", "textwrap", "heapq",
    "bisect", "functools", "itertools", "contextlib", "typing", "pathlib", "statistics", "random")


def calibration_text(modules=CALIBRATION_MODULES) -> str:
    """Local English text that is *not* the evaluation text (``longfx eval``'s ppl reads
    ``pydoc_data.topics``): the docstrings of ``modules`` (the module's, then each public
    class, function and method defined there with more than 80 characters of docstring, in
    sorted name order), joined by blank lines. About 300k characters on CPython 3.11."""
    import importlib
    import inspect

    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for key, obj in sorted(vars(mod).items()):
            if key.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{key}: {doc}")
            if inspect.isclass(obj):
                for sub, fn in sorted(vars(obj).items()):
                    if sub.startswith("_") or not inspect.isfunction(fn):
                        continue
                    doc = inspect.getdoc(fn)
                    if doc and len(doc) > 80:
                        parts.append(f"{key}.{sub}: {doc}")
    return "\n\n".join(parts)


def calibrate_key_layers(model, tokenizer_or_ids, recipe: "str | KVQuant" =
                         "kv_quant(bits=2, rotate=true, clip=true)", tokens: int = 4096,
                         chunk: int = 1024, path=None, tick=None) -> dict:
    """Per-layer key sensitivity for ``key_layers`` (KVTuner-style, Li et al. 2025): for each
    decoder layer ``l``, the mean KL divergence ``KL(p_dense ‖ p_l)`` of the next-token
    distributions over ``tokens`` tokens read in chunks of ``chunk`` (as ``longfx eval``
    reads), where ``p_l`` is the model with *only* layer ``l``'s cache stored by ``recipe``
    (its packed state, sinks, rotation and clipping), every other layer exact (a plain
    ``DynamicLayer``). At 2 bits the keys carry most of a layer's error (docs/kv_compression.md:
    keys alone +4.9 % at 8k, values alone +0.6 %), so the ranking is the keys'.

    ``tokenizer_or_ids``: a tokenizer (the text is :func:`calibration_text`, not the
    evaluation text) or 1-D token ids. Returns (and with ``path`` writes as JSON) ``{"model":
    identity, "recipe", "text", "tokens", "chunk", "kl": [per layer], "order": layers by
    decreasing KL, "all_layers": KL with every layer stored by the recipe}``; pick
    ``key_layers=tuple(order[:k])``. Costs ``layers + 2`` chunked passes (SmolLM2-135M,
    4096 tokens, 1 CPU thread: about 12 min)."""
    import json
    from pathlib import Path

    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    from longfx import recipes
    from longfx.passes.duo_heads import model_identity
    from longfx.runtime.cache import QuantizedKVLayer

    r = recipes.parse(recipe).recipes[0] if isinstance(recipe, str) else recipe
    if not isinstance(r, KVQuant) or r.key_layers or r.key_bits is not None:
        raise RecipeError(f"calibrate_key_layers: recipe must be a plain kv_quant(...), got {r}")
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids, text = tokenizer_or_ids.reshape(-1).long(), "given ids"
    else:
        ids = torch.tensor(tokenizer_or_ids(calibration_text(), add_special_tokens=False)
                           .input_ids, dtype=torch.long)
        text = "calibration_text(): stdlib docstrings"
    if ids.numel() < tokens:
        raise ValueError(f"calibrate_key_layers: {tokens} tokens asked, the text has {ids.numel()}")
    ids = ids[:tokens]
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    dev = next(model.parameters()).device

    def logprobs(quantized: set[int]):
        layers = [QuantizedKVLayer(r.kv_config, sink=r.sink) if i in quantized else DynamicLayer()
                  for i in range(n)]
        cache = Cache(layers=layers)
        with torch.no_grad():
            for s in range(0, tokens, chunk):
                out = model(input_ids=ids[s:s + chunk].to(dev)[None], past_key_values=cache,
                            use_cache=True)
                yield torch.log_softmax(out.logits[0].float(), -1)

    dense = list(logprobs(set()))                 # fp32: a bf16 copy puts a floor of ~1e-5 on KL

    def kl(quantized: set[int]) -> float:
        total = 0.0
        for p, q in zip(dense, logprobs(quantized)):
            p = p.float()
            total += float((p.exp() * (p - q)).sum())
        if tick:
            tick()
        return total / tokens

    per_layer = [kl({i}) for i in range(n)]
    calib = {"model": model_identity(model), "recipe": str(r), "text": text, "tokens": tokens,
             "chunk": chunk, "kl": per_layer,
             "order": sorted(range(n), key=lambda i: -per_layer[i]),
             "all_layers": kl(set(range(n)))}
    if path is not None:
        Path(path).write_text(json.dumps(calib, indent=1) + "\n")
    return calib
