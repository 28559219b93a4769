"""KV-state bytes per layer before and after a KV-cache recipe, read from the runtime's own
state (what ``longfx diff`` shows for ``kv_quant``, ``gear``, ``snapkv``, ``h2o``,
``streaming_kv`` and ``snapkv(...) + kv_quant(...)``).

A KV-cache recipe changes the model's runtime cache, not its graph, so the graph diff alone
shows nothing for it. :func:`kv_state_bytes` builds the recipe's storage for the model, fills
every layer with synthetic tokens (seeded normal keys/values of the model's KV shape and
dtype, appended in chunks as a chunked prefill would) and reads each layer's ``nbytes()`` —
codes, scales, rings and sink copies as allocated. Quantization's bytes do not depend on the
values, so synthetic tokens give the real footprint. "Before" is the cache the model builds
without the recipe, transformers' ``DynamicCache(config=...)`` filled the same way: ``context``
tokens per layer, except in sliding-window layers (Gemma 3's local layers), which keep only
their window. When the model runs in another dtype, the total also gives the ratio to that
cache in bf16, the unit of the papers' and the issue's targets.

Eviction: which tokens an eviction cache keeps depends on the model's queries, but how many
does not — every KV head keeps the policy's budget at ``context`` tokens
(``budget_for``: SnapKV's and H2O's budget or ratio, StreamingLLM's sink + window; the
runtime compacts to exactly that). So an eviction recipe's layer is filled with that many
tokens, in plain tensors or in the quantization recipe's layer when one is composed. For
``h2o(...) + kv_quant(...)`` that is a slight underestimate: the real store
(``H2OQuantizedStore``) also holds a group index (4 bytes) and a row (1 byte) per kept packed
token, the key-scale rows of groups that keep only some of their tokens, and per-head padding.
``longfx eval --task cost`` measures the same on a real prompt.
"""
from __future__ import annotations

import torch

CHUNK = 4096


def _kv_shape(model) -> tuple[int, int, int, torch.dtype]:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype
    return cfg.num_hidden_layers, kv_heads, dim, dtype


def _storage(model, kv_recipe, context: int):
    """(cache whose layers get the synthetic tokens or None for plain tensors, tokens kept per
    KV head, what the fill stands for)."""
    from longfx.passes.kv_evict import H2O, SnapKV, StreamingKV
    from longfx.passes.kv_quant import EvictQuantized

    evict, quant = kv_recipe, None
    if isinstance(kv_recipe, EvictQuantized):
        evict, quant = kv_recipe.evict, kv_recipe.quant
    if not isinstance(evict, (SnapKV, H2O, StreamingKV)):
        return kv_recipe.make_cache(model), context, f"{context} synthetic tokens"
    kept = min(context, evict.policy.budget_for(context))
    cache = quant.make_cache(model) if quant is not None else None
    return cache, kept, f"the {kept} tokens per KV head its policy keeps of {context}"


def kv_state_bytes(model, kv_recipe, context: int, chunk: int = CHUNK,
                   seed: int = 0) -> tuple[list[dict] | None, str]:
    """([{"layer", "before", "after", "bf16"}, ...] bytes at ``context`` tokens, batch 1, or
    None for a cache a synthetic fill cannot drive (``think``, ``minicache``); a one-line
    description of what was measured, or why not)."""
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    from transformers import DynamicCache

    from longfx.runtime.cache import QuantizedCache

    n_layers, kv_heads, dim, dtype = _kv_shape(model)
    item = torch.empty((), dtype=dtype).element_size()
    cache, kept, what = _storage(model, kv_recipe, context)
    if cache is not None and not isinstance(cache, QuantizedCache):
        # think (channels pruned by the model's queries), minicache (layers merged in pairs)
        return None, (f"{kv_recipe}: its {type(cache).__name__} is not measured here (what it "
                      "keeps depends on the model's queries or on pairs of layers); `longfx eval "
                      "--task cost` measures its bytes on a real prompt")
    dense = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_layers):
        for start in range(0, context, chunk):                 # the model's own cache
            z = torch.zeros(1, kv_heads, min(chunk, context - start), dim, dtype=dtype)
            dense.update(z, z, i)
        layer = dense.layers[i]
        held = layer.keys.shape[2]                               # sliding layers: their window
        before = layer.keys.numel() * item + layer.values.numel() * item
        layer.keys = layer.values = None
        if cache is None:                                   # plain tensors of the kept tokens
            after = 2 * kv_heads * kept * dim * item
        else:
            for start in range(0, kept, chunk):
                s = min(chunk, kept - start)
                k = torch.randn(1, kv_heads, s, dim, generator=g).to(dtype)  # [B, Hkv, S, D]
                v = torch.randn(1, kv_heads, s, dim, generator=g).to(dtype)
                cache.update(k, v, i)
            after = int(cache.layers[i].nbytes())
            cache.layers[i].reset()                         # free it before the next layer
        rows.append({"layer": i, "before": before, "after": after,
                     "bf16": 2 * kv_heads * held * dim * 2})
    return rows, (f"{kv_recipe}: {n_layers} layers holding {what} (batch 1, "
                  f"{str(dtype).removeprefix('torch.')}), bytes read from the cache's storage")


def render(rows: list[dict], context: int, recipe: str) -> str:
    """The text block ``longfx diff`` appends: bytes per layer and in all, before → after."""
    mib = 2 ** 20
    lines = [f"KV state at {context} tokens ({recipe}; runtime/state_bytes.py):"]
    for r in rows:
        lines.append(f"  layer {r['layer']:>3}: {r['before'] / mib:9.3f} → {r['after'] / mib:9.3f} MiB"
                     f"  ({r['after'] / r['before']:.4f}×)")
    b, a = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    h = sum(r["bf16"] for r in rows)          # the issue targets and the papers quote ×bf16
    extra = "" if h == b else f"; {a / h:.4f}× of a bf16 cache"
    lines.append(f"  all layers: {b / mib:.3f} → {a / mib:.3f} MiB ({a / b:.4f}×{extra})")
    return "\n".join(lines) + "\n"
