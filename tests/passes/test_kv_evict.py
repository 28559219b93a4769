"""The eviction recipes: parsing, string form and argument errors naming the recipe; make_cache
gives an EvictCache; snapkv + kv_quant / gear share one cache (quantized storage), every other
pair of KV-cache recipes is a RecipeError; through longfx.compile the chunked pass
keeps the cache at the budget after every chunk and generate() works."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.eval import infer
from longfx.passes.kv_quant import EvictQuantized, cache_recipe
from longfx.rewrite.testing import zoo
from longfx.runtime.evict_cache import EvictCache, H2OQuantizedStore

pytestmark = pytest.mark.filterwarnings("ignore")


def test_parse_and_string_form():
    for text, want in [("snapkv(ratio=0.5)", "snapkv(ratio=0.5, window=32, kernel=15)"),
                       ("snapkv(256, window=16, kernel=5, pool=max)",
                        "snapkv(budget=256, window=16, kernel=5, pool=max)"),
                       ("h2o(ratio=0.5)", "h2o(ratio=0.5)"),
                       ("h2o(512, recent=64)", "h2o(budget=512, recent=64)"),
                       ("streaming_kv", "streaming_kv(sink=4, window=1024)")]:
        p = recipes.parse(text)
        assert str(p) == want and recipes.parse(str(p)) == p
    assert recipes.parse("snapkv(ratio=0.5)").recipes[0].policy.budget_for(4096) == 2048


@pytest.mark.parametrize("text,match", [
    ("snapkv(ratio=1.5)", "snapkv: ratio .* must be in \\(0, 1\\)"),
    ("snapkv(ratio=0)", "snapkv: ratio"),
    ("h2o(ratio=1)", "h2o: ratio"),
    ("snapkv", "snapkv: give exactly one of budget"),
    ("h2o(budget=8, ratio=0.5)", "h2o: give exactly one of budget"),
    ("snapkv(budget=0)", "snapkv: budget must be an integer >= 1"),
    ("snapkv(budget=16, window=32)", "snapkv: budget \\(16\\) must hold the observation window"),
    ("snapkv(ratio=0.5, kernel=4)", "snapkv: kernel must be an odd integer"),
    ("snapkv(ratio=0.5, pool=median)", "snapkv: pool must be one of avg, max"),
    ("h2o(budget=8, recent=9)", "h2o: recent \\(9\\) exceeds the budget"),
    ("streaming_kv(window=0)", "streaming_kv: window must be an integer >= 1"),
    ("streaming_kv(sink=-1)", "streaming_kv: sink must be an integer >= 0"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_snapkv_composes_with_quantization_and_other_pairs_are_refused():
    snap, quant = recipes.parse("snapkv(ratio=0.5)").recipes[0], \
        recipes.parse("kv_quant(bits=4)").recipes[0]
    for text in ("snapkv(ratio=0.5) + kv_quant(bits=4)", "kv_quant(bits=4) + snapkv(ratio=0.5)",
                 "sink_window(sink=4, window=64) + snapkv(ratio=0.5) + kv_quant(bits=4)"):
        kv = cache_recipe(recipes.parse(text))
        assert isinstance(kv, EvictQuantized) and (kv.evict, kv.quant) == (snap, quant)
        assert str(kv) == "snapkv(ratio=0.5, window=32, kernel=15) + kv_quant(bits=4, group=64, " \
            "residual=128, sink=4)"
    cache = cache_recipe(recipes.parse("snapkv(budget=64) + gear(bits=2)")).make_cache()
    assert isinstance(cache, EvictCache)
    stream = cache_recipe(recipes.parse("streaming_kv + kv_quant(bits=4)"))
    assert isinstance(stream, EvictQuantized)
    assert str(stream) == "streaming_kv(sink=4, window=1024) + kv_quant(bits=4, group=64, " \
        "residual=128, sink=4)"
    assert cache_recipe(recipes.parse("sink_window(sink=4, window=64) + h2o(ratio=0.5)")) \
        == recipes.parse("h2o(ratio=0.5)").recipes[0]
    for text in ("h2o(ratio=0.5) + kv_quant(bits=4)", "gear(bits=2) + h2o(budget=64)"):
        h2o = cache_recipe(recipes.parse(text))
        assert isinstance(h2o, EvictQuantized) and str(h2o).startswith("h2o(")
        assert isinstance(h2o.make_cache()._new_layer().store, H2OQuantizedStore)
    for text, match in [
            ("think(ratio=0.5) + kv_quant(bits=4)", "one KV-cache recipe per pipeline.*think"),
            ("minicache + snapkv(ratio=0.5)", "one KV-cache recipe per pipeline.*minicache"),
            ("snapkv(ratio=0.5) + h2o(ratio=0.5)", "at most one eviction and one quantization"),
            ("snapkv(ratio=0.5) + kv_quant(bits=4) + gear(bits=2)", "one KV-cache recipe"),
            ("snapkv(ratio=0.5) + kv_quant(bits=4) + h2o(ratio=0.5)", "one KV-cache recipe")]:
        with pytest.raises(recipes.RecipeError, match=match):
            cache_recipe(recipes.parse(text))


def test_compile_refuses_an_unsupported_pair_with_a_recipe_error():
    model, _ = zoo.build("llama", attn_implementation="sdpa")
    with pytest.raises(recipes.RecipeError, match="think.*compose with no other KV-cache recipe"):
        longfx.compile(model, "think(ratio=0.5) + kv_quant(bits=4)")


def test_compiled_chunked_prefill_stays_at_the_budget_and_generate_works():
    model, _ = zoo.build("llama", attn_implementation="sdpa")
    fast = longfx.compile(model, "snapkv(budget=20, window=4, kernel=3, when=chunk)")
    ids = torch.randint(3, zoo.VOCAB, (70,), generator=torch.Generator().manual_seed(0))
    kept, eager = [], []
    ref_cache = fast.longfx_new_cache()
    assert isinstance(ref_cache, EvictCache)
    for (s, logits, cache), (_, ref, _) in zip(infer.chunked_logits(fast, ids, chunk=16),
                                               infer.chunked_logits(model, ids, chunk=16,
                                                                    cache=ref_cache)):
        kept.append(cache.kept())
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)   # compiled = eager
    assert kept == [16, 20, 20, 20, 20]                  # compressed after every chunk
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 2, 20, 16)] * 2
    out = fast.generate(ids[None], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, 75)
    assert not fast.longfx_backend.report.warnings       # no graph breaks


def test_compiled_snapkv_at_prompt_end_equals_eager_in_generate():
    model, _ = zoo.build("llama", attn_implementation="sdpa")
    fast = longfx.compile(model, "snapkv(budget=20, window=4, kernel=3)")
    ids = torch.randint(3, zoo.VOCAB, (1, 70), generator=torch.Generator().manual_seed(0))
    eager_cache = recipes.parse("snapkv(budget=20, window=4, kernel=3)").recipes[0].make_cache(model)
    out = fast.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    ref = model.generate(ids, past_key_values=eager_cache, max_new_tokens=6, do_sample=False,
                         min_new_tokens=6)
    assert torch.equal(out, ref) and eager_cache.kept() == 20 + 5   # compressed once, then appended
