"""The minicache recipe: parsing and string form, argument errors naming the recipe, make_cache
gives a MiniCache pairing layers from start_layer (default half), one KV-cache recipe per
pipeline; generate() through longfx.compile equals generate() with the eager cache."""
import pytest
import torch

import longfx
import longfx.passes.minicache  # noqa: F401 - registers minicache (until listed in FAMILIES)
from longfx import recipes
from longfx.passes.kv_quant import cache_recipe
from longfx.rewrite.testing import zoo
from longfx.runtime.minicache_cache import MergedLayer, MiniCache

pytestmark = pytest.mark.filterwarnings("ignore")


def test_parse_and_string_form():
    for text, want in [("minicache", "minicache(t=0.5, threshold=0.25)"),
                       ("minicache(start_layer=4, t=0.6, threshold=0.1)",
                        "minicache(start_layer=4, t=0.6, threshold=0.1)"),
                       ("minicache(threshold=1)", "minicache(t=0.5, threshold=1.0)")]:
        p = recipes.parse(text)
        assert str(p) == want and recipes.parse(str(p)) == p


@pytest.mark.parametrize("text,match", [
    ("minicache(start_layer=-1)", "minicache: start_layer must be an integer >= 0"),
    ("minicache(start_layer=1.5)", "'start_layer' of minicache\\(\\): expected int"),
    ("minicache(t=1.5)", "minicache: t \\(the SLERP weight\\) must be in \\[0, 1\\]"),
    ("minicache(threshold=-0.1)", "minicache: threshold .* must be in \\[0, 1\\]"),
    ("minicache(threshold=2)", "minicache: threshold"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_make_cache_pairs_layers_from_the_start_layer():
    import transformers

    cfg = transformers.LlamaConfig(**dict(zoo.ZOO["llama"].config, num_hidden_layers=7))
    model = transformers.LlamaForCausalLM(cfg)
    kinds = lambda c: "".join("M" if isinstance(x, MergedLayer) else "D" for x in c.layers)
    assert kinds(recipes.parse("minicache").recipes[0].make_cache(model)) == "DDDMMMM"   # 7 // 2
    assert kinds(recipes.parse("minicache(start_layer=2)").recipes[0].make_cache(model)) == "DDMMMMD"
    assert kinds(recipes.parse("minicache(start_layer=9)").recipes[0].make_cache(model)) == "DDDDDDD"
    with pytest.raises(recipes.RecipeError, match="minicache.*needs the model"):
        recipes.parse("minicache").recipes[0].make_cache(None)


def test_one_kv_cache_recipe_per_pipeline():
    with pytest.raises(recipes.RecipeError, match="one KV-cache recipe per pipeline"):
        cache_recipe(recipes.parse("minicache + kv_quant(bits=4)"))


def test_generate_through_longfx_compile_equals_eager():
    """The pair's merge has a data-dependent size (the retained tokens), a Dynamo graph break:
    that part runs eagerly and the results are the eager cache's."""
    model, _ = zoo.build("llama", attn_implementation="sdpa")
    text = "minicache(start_layer=0, threshold=0.55)"
    fast = longfx.compile(model, text)
    assert isinstance(fast.longfx_new_cache(), MiniCache)
    ids = torch.randint(3, zoo.VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    out = fast.generate(ids, **kw)
    cache = recipes.parse(text).recipes[0].make_cache(model)
    ref = model.generate(ids, past_key_values=cache, **kw)
    assert out.sequences.shape == (1, 23) and torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert 0.0 < cache.merged_fraction() and cache.nbytes() < cache.dense_nbytes()
