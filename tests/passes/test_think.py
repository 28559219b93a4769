"""The think recipe: parsing and string form, argument errors naming the recipe, make_cache gives a
ThinKCache, one KV-cache recipe per pipeline; through longfx.compile the chunked pass equals the
eager cache, prunes after every chunk, and generate() works."""
import pytest
import torch

import longfx
import longfx.passes.think  # noqa: F401 - registers think (until listed in recipes.FAMILIES)
from longfx import recipes
from longfx.eval import infer
from longfx.passes.kv_quant import cache_recipe
from longfx.rewrite.testing import zoo
from longfx.runtime.think_cache import ThinKCache

pytestmark = pytest.mark.filterwarnings("ignore")


def test_parse_and_string_form():
    for text, want in [("think", "think(ratio=0.5, window=32)"),
                       ("think(0.25)", "think(ratio=0.25, window=32)"),
                       ("think(ratio=0, window=8)", "think(ratio=0.0, window=8)")]:
        p = recipes.parse(text)
        assert str(p) == want and recipes.parse(str(p)) == p
    policy = recipes.parse("think(ratio=0.5)").recipes[0].policy
    assert policy.kept_channels(64) == 32 and policy.window == 32


@pytest.mark.parametrize("text,match", [
    ("think(ratio=1)", "think: ratio .* must be in \\[0, 1\\)"),
    ("think(ratio=-0.1)", "think: ratio"),
    ("think(ratio=true)", "'ratio' of think\\(\\): expected float"),
    ("think(window=0)", "think: window must be an integer >= 1"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_one_kv_cache_recipe_per_pipeline():
    with pytest.raises(recipes.RecipeError, match="one KV-cache recipe per pipeline"):
        cache_recipe(recipes.parse("think(ratio=0.5) + kv_quant(bits=4)"))
    assert cache_recipe(recipes.parse("sink_window(sink=4, window=64) + think")) \
        == recipes.parse("think").recipes[0]


def test_compiled_chunked_prefill_prunes_each_chunk_and_generate_works():
    model, _ = zoo.build("llama", attn_implementation="sdpa")
    fast = longfx.compile(model, "think(ratio=0.5, window=4)")
    ids = torch.randint(3, zoo.VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    ref_cache = fast.longfx_new_cache()
    assert isinstance(ref_cache, ThinKCache)
    pruned = []
    for (s, logits, cache), (_, ref, _) in zip(infer.chunked_logits(fast, ids, chunk=16),
                                               infer.chunked_logits(model, ids, chunk=16,
                                                                    cache=ref_cache)):
        pruned.append(cache.layers[0].pruned)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)   # compiled = eager
    assert pruned == [12, 28, 36]                         # all but the window after each chunk
    assert [tuple(layer.k_pruned.shape) for layer in cache.layers] == [(1, 2, 36, 8)] * 2
    assert cache.nbytes() < cache.dense_nbytes()
    out = fast.generate(ids[None], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 44)
    assert not fast.longfx_backend.report.warnings       # no graph breaks
