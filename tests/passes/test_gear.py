"""The gear recipe: parsing and argument errors, the compiled model runs on a GearCache that
really stores the correction, and generate() works through it."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.eval import infer
from longfx.kernels.kv_quant import gear as G
from longfx.rewrite.testing import zoo
from longfx.runtime.cache import GearCache

pytestmark = pytest.mark.filterwarnings("ignore")


def test_parse_and_string_form():
    p = recipes.parse("gear")
    assert str(p) == "gear(bits=4, rank=4, outliers=0.01, group=64, residual=128, sink=4)"
    assert recipes.parse(str(p)) == p
    q = recipes.parse("gear(bits=2, rank=2, outliers=0.02, group=32, residual=64, sink=4)")
    assert recipes.parse(str(q)) == q and "sink=4" in str(q)
    assert "sink=0" in str(recipes.parse("gear(sink=0)"))
    cfg = q.recipes[0].gear_config
    assert (cfg.kv.bits, cfg.kv.group, cfg.kv.ring, cfg.rank, cfg.outliers) == (2, 32, 64, 2, 0.02)


@pytest.mark.parametrize("text,match", [
    ("gear(bits=3)", "bits must be one of 2, 4, 8"),
    ("gear(rank=-1)", "rank must be an integer >= 0"),
    ("gear(outliers=1.5)", "outliers must be a fraction"),
    ("gear(group=0)", "group must be an integer >= 1"),
    ("gear(sink=-2)", "sink must be an integer >= 0"),
    ("kv_quant(sink=-1)", "sink must be an integer >= 0"),
])
def test_bad_arguments_are_recipe_errors(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_gear_and_kv_quant_do_not_share_a_cache():
    model, _ = zoo.build("llama")
    with pytest.raises(recipes.RecipeError, match="one KV-cache recipe per pipeline"):
        longfx.compile(model, "gear(bits=4) + kv_quant(bits=4)")


def test_compiled_model_runs_on_the_gear_cache_and_generates():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(0))
    text = "gear(bits=2, rank=4, outliers=0.02, group=16, residual=16)"
    fast = longfx.compile(model, text)
    plain = longfx.compile(model, "kv_quant(bits=2, group=16, residual=16)")
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        got = {}
        for name, m in (("gear", fast), ("plain", plain)):
            cache = m.longfx_new_cache()
            got[name] = torch.cat([m(input_ids=ids[:, s:s + 32], past_key_values=cache,
                                     use_cache=True).logits for s in range(0, 96, 32)], 1)
            if name == "gear":
                assert isinstance(cache, GearCache) and cache.gear.rank == 4
                layer = cache.layers[0]
                assert layer.extras["k_lr_a"].shape[2] * 16 >= 80     # corrections stored
                assert bool(layer.extras["k_lr_a"][:, :, :5].ne(0).any())
                assert cache.nbytes() == sum(t.numel() * t.element_size()
                                             for lay in cache.layers for t in lay._tensors().values())
    err = {n: float((g - dense).abs().max() / dense.abs().max()) for n, g in got.items()}
    report = fast.longfx_backend.report
    assert not [w for w in report.warnings if "graph break" in w], report.warnings
    assert err["gear"] < err["plain"], err
    with torch.no_grad():
        out = fast.generate(input_ids=ids[:, :40], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 48)
    *_, (_s, _l, cache) = infer.chunked_logits(fast, ids[0], chunk=32)
    assert isinstance(cache, GearCache) and infer.kv_bytes(cache) == cache.nbytes()


def test_gear_memory_is_stated():
    cfg = recipes.parse("gear(bits=2)").recipes[0].gear_config
    assert G.memory_ratio(32768, 1, 64, cfg) == pytest.approx(0.2695 - 0.125 + 0.145, abs=3e-3)
