"""KV-cache eviction recipes: ``snapkv(...)``, ``h2o(...)``, ``streaming_kv(...)``.

* ``snapkv(budget | ratio, window=32, kernel=15, when="prompt")`` — SnapKV (Li et al. 2024,
  arXiv:2404.14469): the last ``window`` queries vote for prefix keys (softmax probabilities
  summed over the window, averaged over a KV head's query heads, 1-D pooled with size
  ``kernel``); each KV head keeps its top keys plus the window itself. ``when="prompt"`` (the
  paper): once, when the prompt ends, with the prompt's last queries (the question) voting;
  ``when="chunk"``: after every prefill chunk, with that chunk's last queries, so the prefill's
  peak memory falls too — but a chunk's queries do not know the question yet.
* ``h2o(budget | ratio, recent)`` — H2O (Zhang et al. 2023, arXiv:2306.14048): heavy hitters by
  accumulated attention plus the ``recent`` newest tokens (default: half the budget), applied
  after every chunk and every decode token.
* ``streaming_kv(sink=4, window=1024)`` — StreamingLLM (Xiao et al. 2023, arXiv:2309.17453):
  the first ``sink`` tokens and the last ``window``, keys re-rotated to contiguous in-cache
  positions. (``sink_window`` is the *mask* form of the same idea over a full cache; this one
  frees the memory.)

``budget`` is tokens per KV head; ``ratio`` in (0, 1) is the fraction of seen tokens evicted
(``ratio=0.5`` keeps half). Like ``kv_quant`` the recipes change the model's runtime state, not
its graph: ``make_cache(model)`` gives a :class:`longfx.runtime.evict_cache.EvictCache`, picked up
by ``longfx.compile`` through :func:`longfx.passes.kv_quant.cache_recipe`. Each of the three
composes with ``kv_quant(...)`` or ``gear(...)``: the kept tokens are stored quantized
(``runtime.evict_cache.QuantizedStore``: SnapKV's kept tokens re-stored once when it
compresses; ``StreamingQuantizedStore``: a windowed state that drops whole groups and never
re-quantizes; ``H2OQuantizedStore``: H2O's single-token evictions move the survivors' codes,
each keeping the index of its group's key-scale row, and never re-quantize); any other pair of
KV-cache recipes is a RecipeError.
"""
from __future__ import annotations

from dataclasses import field

from longfx.kernels.kv_evict import reference as R
from longfx.recipes import Recipe, RecipeError, register

__all__ = ["SnapKV", "H2O", "StreamingKV"]


def _check_budget(name: str, budget, ratio) -> None:
    if (budget is None) == (ratio is None):
        raise RecipeError(f"{name}: give exactly one of budget (tokens per KV head) or ratio "
                          f"(fraction evicted), got budget={budget!r}, ratio={ratio!r}")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or budget < 1):
        raise RecipeError(f"{name}: budget must be an integer >= 1, got {budget!r}")
    if ratio is not None and not (0.0 < float(ratio) < 1.0):
        raise RecipeError(f"{name}: ratio (the fraction evicted) must be in (0, 1), got {ratio!r}")


class _EvictRecipe(Recipe):
    def make_cache(self, model=None, store: Recipe | None = None):
        """A fresh, empty evicting cache for ``model`` (query hooks installed on it). ``store``:
        a quantization recipe (``kv_quant``, ``gear``) whose layer holds each layer's kept
        tokens (``QuantizedStore``); None: plain tensors."""
        from longfx.runtime.evict_cache import EvictCache

        factory = None
        if store is not None:
            layers = store.make_cache(None)        # its _new_layer() makes a fresh quantized layer
            factory = lambda: self._store(layers._new_layer())   # noqa: E731
        return EvictCache(self.policy, config=getattr(model, "config", None), model=model,
                          store=factory)

    def _store(self, layer):
        """The storage of one layer's kept tokens in the quantized ``layer``: gathered and
        re-stored at each eviction (``QuantizedStore``)."""
        from longfx.runtime.evict_cache import QuantizedStore

        return QuantizedStore(layer)


@register("snapkv")
class SnapKV(_EvictRecipe):
    """SnapKV: observation-window voting, per-KV-head compaction, once when the prompt ends or
    after every prefill chunk (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
    Before Generation")."""

    budget: int | None = field(default=None, metadata={"omit_default": True})
    ratio: float | None = field(default=None, metadata={"omit_default": True})
    window: int = 32
    kernel: int = 15
    pool: str = field(default="avg", metadata={"omit_default": True})
    when: str = field(default="prompt", metadata={"omit_default": True})

    def __post_init__(self):
        _check_budget("snapkv", self.budget, self.ratio)
        if self.when not in ("prompt", "chunk"):
            raise RecipeError(f"snapkv: when must be 'prompt' (compress once, when the prompt "
                              f"ends) or 'chunk' (after every prefill chunk), got {self.when!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise RecipeError(f"snapkv: window must be an integer >= 1, got {self.window!r}")
        if self.budget is not None and self.budget < self.window:
            raise RecipeError(f"snapkv: budget ({self.budget}) must hold the observation window "
                              f"({self.window})")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise RecipeError(f"snapkv: kernel must be an odd integer >= 1 (a same-length pool), "
                              f"got {self.kernel!r}")
        if self.pool not in R.POOLS:
            raise RecipeError(f"snapkv: pool must be one of {', '.join(R.POOLS)}, got {self.pool!r}")

    @property
    def policy(self) -> R.SnapKVConfig:
        return R.SnapKVConfig(self.budget, self.ratio, self.window, self.kernel, self.pool,
                              self.when)


@register("h2o")
class H2O(_EvictRecipe):
    """H2O: heavy hitters by accumulated attention plus a recent window, evicting as tokens
    arrive (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models")."""

    budget: int | None = field(default=None, metadata={"omit_default": True})
    ratio: float | None = field(default=None, metadata={"omit_default": True})
    recent: int | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self):
        _check_budget("h2o", self.budget, self.ratio)
        if self.recent is not None and (not isinstance(self.recent, int) or self.recent < 0):
            raise RecipeError(f"h2o: recent must be an integer >= 0, got {self.recent!r}")
        if self.budget is not None and self.recent is not None and self.recent > self.budget:
            raise RecipeError(f"h2o: recent ({self.recent}) exceeds the budget ({self.budget})")

    @property
    def policy(self) -> R.H2OConfig:
        return R.H2OConfig(self.budget, self.ratio, self.recent)

    def _store(self, layer):
        """Quantized storage that evicts single tokens without re-quantizing: the survivors'
        codes move, each keeps the index of its group's scale row (``H2OQuantizedStore``)."""
        from longfx.runtime.evict_cache import H2OQuantizedStore

        return H2OQuantizedStore(layer)


@register("streaming_kv")
class StreamingKV(_EvictRecipe):
    """StreamingLLM: attention sinks plus a window of recent tokens, the rest evicted, keys
    re-rotated to in-cache positions (Xiao et al. 2023, "Efficient Streaming Language Models
    with Attention Sinks")."""

    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        if not isinstance(self.sink, int) or self.sink < 0:
            raise RecipeError(f"streaming_kv: sink must be an integer >= 0, got {self.sink!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise RecipeError(f"streaming_kv: window must be an integer >= 1, got {self.window!r}")

    @property
    def policy(self) -> R.StreamingConfig:
        return R.StreamingConfig(self.sink, self.window)

    def _store(self, layer):
        """Windowed quantized storage: whole groups leave behind the window, the sinks are kept
        exactly, nothing is quantized twice (``StreamingQuantizedStore``)."""
        from longfx.runtime.evict_cache import StreamingQuantizedStore

        return StreamingQuantizedStore(layer, self.sink, self.window)
