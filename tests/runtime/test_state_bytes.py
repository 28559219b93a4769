"""runtime/state_bytes.py: KV-state bytes per layer read from a KV-cache recipe's own cache,
and their place in ``longfx diff``."""
import pytest
import torch

import longfx
from longfx.api import _pipeline
from longfx.passes.kv_quant import cache_recipe
from longfx.runtime.state_bytes import kv_state_bytes
from longfx.testing import zoo


@pytest.fixture(scope="module")
def llama():
    model, _ = zoo.build("llama")
    return model


def _rows(model, recipe, context):
    return kv_state_bytes(model, cache_recipe(_pipeline(recipe)), context)


def test_bytes_follow_the_bits_and_match_a_real_fill(llama):
    cfg = llama.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    dense = 2 * cfg.num_key_value_heads * 2000 * dim * 4                   # fp32 K + V
    r8, _ = _rows(llama, "kv_quant(bits=8)", 2000)
    r4, _ = _rows(llama, "kv_quant(bits=4)", 2000)
    r2, why = _rows(llama, "kv_quant(bits=2)", 2000)
    assert len(r4) == cfg.num_hidden_layers and "2000 synthetic tokens" in why
    for a, b, c in zip(r8, r4, r2):
        assert a["before"] == b["before"] == c["before"] == dense
        assert dense > a["after"] > b["after"] > c["after"] > 0
    # the same bytes as the recipe's cache after a real append of 2000 tokens
    cache = cache_recipe(_pipeline("kv_quant(bits=4)")).make_cache(llama)
    k = torch.randn(1, cfg.num_key_value_heads, 2000, dim)
    cache.update(k, k, 0)
    assert cache.layers[0].nbytes() == r4[0]["after"]


def test_wider_key_layers_cost_more_in_those_layers_only(llama):
    rows, _ = _rows(llama, "kv_quant(bits=2, key_bits=4, key_layers=(1,))", 1024)
    plain, _ = _rows(llama, "kv_quant(bits=2)", 1024)
    assert rows[0]["after"] == plain[0]["after"] and rows[1]["after"] > plain[1]["after"]


def test_eviction_keeps_its_budget_plain_or_quantized(llama):
    cfg = llama.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    token = 2 * cfg.num_key_value_heads * dim * 4                          # fp32 K + V
    rows, why = _rows(llama, "snapkv(ratio=0.5)", 1000)
    assert "500 tokens per KV head" in why
    assert all(r["after"] == 500 * token and r["before"] == 1000 * token for r in rows)
    rows, _ = _rows(llama, "streaming_kv(sink=4, window=100)", 1000)
    assert rows[0]["after"] == 104 * token
    rows, _ = _rows(llama, "h2o(budget=2000)", 1000)                       # budget > context
    assert rows[0]["after"] == rows[0]["before"]
    both, _ = _rows(llama, "snapkv(ratio=0.5) + kv_quant(bits=4)", 1000)
    quant, _ = _rows(llama, "kv_quant(bits=4)", 500)
    assert both[0]["after"] == quant[0]["after"] < 500 * token
    with pytest.raises(ValueError, match="context"):
        _rows(llama, "kv_quant(bits=4)", 0)


def test_diff_shows_the_state_and_the_summary_uses_it(llama):
    d = longfx.diff(llama, "kv_quant(bits=2)", context=4096)
    assert "KV state at 4096 tokens" in d.text and "all layers:" in d.text
    est = d.report.estimate(4096)
    assert est["kv_bytes_after"] < 0.2 * est["kv_bytes_before"]
    assert est["kv_bytes_source"].startswith("runtime cache")
    assert est["kv_bytes_before"] == sum(r["before"] for r in d.report.kv_state["layers"])
    assert d.report.to_dict(4096)["kv_state"]["context"] == 4096
    # another context: the graph estimate, not bytes read at 4096
    assert "kv_bytes_source" not in d.report.estimate(8192)
    assert longfx.diff(llama, "").report.kv_state is None
    assert "(0.5" in longfx.diff(llama, "snapkv(ratio=0.5)", context=1024).text


def test_before_is_the_models_own_cache_sliding_layers_hold_their_window():
    model, _ = zoo.build("gemma3")                      # layer 0 slides (window 4), layer 1 full
    rows, _ = _rows(model, "kv_quant(bits=4)", 256)
    cfg = model.config
    token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert rows[0]["before"] == (cfg.sliding_window - 1) * token      # what DynamicCache keeps
    assert rows[1]["before"] == 256 * token
    assert rows[1]["after"] < rows[1]["before"]
    # the quantized sliding layer keeps its window too (whole groups + its ring): its bytes do
    # not grow with the context, the full layer's do
    longer, _ = _rows(model, "kv_quant(bits=4)", 1024)
    assert longer[0]["after"] == rows[0]["after"] and longer[1]["after"] > rows[1]["after"]


@pytest.mark.parametrize("recipe", ["think(ratio=0.5)", "minicache(t=0.5)"])
def test_caches_a_synthetic_fill_cannot_drive_are_named_not_guessed(llama, recipe):
    rows, why = _rows(llama, recipe, 512)
    assert rows is None and "eval --task cost" in why
    d = longfx.diff(llama, recipe, context=512)
    assert "KV state: " in d.text and "kv_bytes_source" not in d.report.estimate(512)
