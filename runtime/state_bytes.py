"""KV-state bytes per layer before and after a KV-cache recipe, read from the runtime's own
state (what ``longfx diff`` shows for ``kv_quant(...)`` / ``gear(...)``).

A KV-cache recipe changes the model's runtime cache, not its graph, so the graph diff alone
shows nothing for it. :func:`kv_state_bytes` builds the recipe's cache for the model, fills
every layer with ``context`` synthetic tokens (seeded normal keys/values of the model's KV
shape and dtype, appended in chunks as a chunked prefill would) and reads each layer's
``nbytes()`` — codes, scales, rings and sink copies as allocated. "Before" is a plain K + V
cache of the same tokens in the model's dtype. Quantization's bytes do not depend on the
values, so synthetic tokens give the real footprint.

Eviction caches (``snapkv``, ``h2o``, ``streaming_kv``) decide what to keep from the model's
queries, which a synthetic fill does not have; for them this returns ``None`` with the
reason, and ``longfx eval --task cost`` measures the bytes on a real prompt.
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


def kv_state_bytes(model, kv_recipe, context: int, chunk: int = CHUNK,
                   seed: int = 0) -> tuple[list[dict] | None, str]:
    """([{"layer", "before", "after"}, ...] bytes at ``context`` tokens, batch 1, or None;
    a one-line description of what was measured or why not)."""
    from longfx.runtime.evict_cache import EvictCache

    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    cache = kv_recipe.make_cache(model)
    if isinstance(cache, EvictCache):
        return None, (f"{kv_recipe}: an eviction cache keeps tokens by the model's queries; "
                      "`longfx eval --task cost` measures its bytes on a real prompt")
    n_layers, kv_heads, dim, dtype = _kv_shape(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_layers):
        for start in range(0, context, chunk):
            s = min(chunk, context - start)
            k = torch.randn(1, kv_heads, s, dim, generator=g).to(dtype)     # [B, Hkv, S, D]
            v = torch.randn(1, kv_heads, s, dim, generator=g).to(dtype)
            cache.update(k, v, i)
        layer = cache.layers[i]
        before = 2 * kv_heads * context * dim * torch.empty((), dtype=dtype).element_size()
        rows.append({"layer": i, "before": before, "after": int(layer.nbytes())})
        layer.reset()                                         # free the layer before the next
    return rows, (f"{kv_recipe}: {n_layers} layers filled with {context} synthetic tokens "
                  f"(batch 1, {str(dtype).removeprefix('torch.')}), bytes read from the cache")


def render(rows: list[dict], context: int, recipe: str) -> str:
    """The text block ``longfx diff`` appends: bytes per layer and in all, before → after."""
    mib = 2 ** 20
    lines = [f"KV state at {context} tokens ({recipe}; runtime/state_bytes.py):"]
    for r in rows:
        lines.append(f"  layer {r['layer']:>3}: {r['before'] / mib:9.3f} → {r['after'] / mib:9.3f} MiB"
                     f"  ({r['after'] / r['before']:.4f}×)")
    b, a = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    lines.append(f"  all layers: {b / mib:.3f} → {a / mib:.3f} MiB ({a / b:.4f}×)")
    return "\n".join(lines) + "\n"
