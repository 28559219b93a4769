"""vertical_slash on the zoo: equal to dense when the lines cover every key, tables really built
(and the output changed) when they do not, decode steps and short prompts dense, report facts,
one sparse recipe per site, bad arguments as RecipeError naming the recipe."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.eval import infer
from longfx.kernels.block_sparse import estimate, op
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

FULL = "vertical_slash(vertical=999, slash=999, block=16, min_len=0)"
SMALL = "vertical_slash(vertical=1, slash=1, last_q=8, block=16, min_len=0)"


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _ids(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (1, n), generator=g)


def _sites(model, recipe, ids):
    d = longfx.diff(model, recipe, inputs={"input_ids": ids})
    return d, [s for s in d.report.sites if s.kind == "attention"]


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("qwen3", "eager")])
def test_full_lines_are_exact_and_few_lines_build_tables(name, impl, monkeypatch):
    monkeypatch.setattr(estimate, "FORCED_COLUMNS", 1)     # 64 tokens: let the budget show
    monkeypatch.setattr(estimate, "FORCED_OFFSETS", 1)
    model, _ = zoo.build(name, impl)
    ids = _ids()
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with op.record_density() as st_full:
            full = longfx.compile(model, FULL)(input_ids=ids).logits
        with op.record_density() as st:
            small = longfx.compile(model, SMALL)(input_ids=ids).logits
    assert _rel(full, dense) < 1e-5
    assert st_full["prefill"][0] == st_full["prefill"][1]          # everything kept (dense)
    kept, causal, calls = st["prefill"]
    assert calls == layers and st["dense_calls"] == 0
    assert layers * 4 * 4 <= kept < causal                         # first column + diagonal at least
    assert _rel(small, dense) > 1e-3


def test_decode_steps_and_short_prompts_stay_dense():
    model, _ = zoo.build("llama", "sdpa")
    ids = _ids(64, seed=1)[0]
    layers = model.config.num_hidden_layers
    want = infer.greedy(model, ids, 3, chunk=32)
    fast = longfx.compile(model, FULL)
    with op.record_density() as st:
        got = infer.greedy(fast, ids, 3, chunk=32)
    assert got == want
    assert st["prefill"][2] == 2 * layers                          # two prefill chunks
    assert st["dense_calls"] >= 2 * layers and st["dense_calls"] % layers == 0   # decode steps
    fast = longfx.compile(model, "vertical_slash(vertical=1, slash=1, block=16, min_len=1000)")
    with torch.no_grad(), op.record_density() as st:
        out = fast(input_ids=ids[None]).logits
    assert st["prefill"][2] == 0 and st["dense_calls"] == layers
    assert _rel(out, model(input_ids=ids[None]).logits) < 1e-5


def test_report_rows_carry_the_spec_and_density_bound():
    model, _ = zoo.build("llama", "sdpa")
    d, sites = _sites(model, "vertical_slash(vertical=4, slash=4)", _ids())
    assert sites and all(s.facts["dynamic_sparse"]["vertical"] == 4 for s in sites)
    assert "vertical_slash vertical=4 slash=4 last_q=64 block=64" in sites[0].facts["sparse"]
    assert sites[0].facts["density"] == pytest.approx(estimate.dense_bound(8192, 64, 4, 4))
    assert sites[0].facts["density"] < 0.25
    assert d.report.graphs[0].code_after.count("dynamic_sparse_prefill") >= \
        model.config.num_hidden_layers


def test_one_sparse_recipe_per_site():
    model, _ = zoo.build("llama", "sdpa")
    for recipe in ["sink_window(sink=2, window=8) + vertical_slash",
                   "block_sparse + vertical_slash", "vertical_slash + block_sparse"]:
        d, sites = _sites(model, recipe, _ids())
        code = d.report.graphs[0].code_after
        assert ("dynamic_sparse_prefill" in code) != ("sparse_attention" in code and
                                                      "dynamic_sparse_prefill" not in code)
        g = d.report.graphs[0]
        assert all(g.status(s)[0] == "rewritten" for s in sites)
        rejected = [why for s in sites for why in [g.status(s)[1]] if why]
        assert not rejected or all("sparse" in w or "canonical" in w for w in rejected)


def test_native_window_layers_are_left_alone():
    model, _ = zoo.build("gemma2", "eager")
    d, sites = _sites(model, "vertical_slash", _ids())
    g = d.report.graphs[0]
    local = [s for s in sites if "native window" in str(g.status(s)[1])]
    assert local and all(not isinstance(s.nodes.get("dynamic_sparse"), torch.fx.Node)
                         for s in local)
    assert any(isinstance(s.nodes.get("dynamic_sparse"), torch.fx.Node) for s in sites)


@pytest.mark.parametrize("text,match", [
    ("vertical_slash(vertical=0)", "vertical_slash: vertical"),
    ("vertical_slash(slash=-1)", "vertical_slash: slash"),
    ("vertical_slash(block=24)", "vertical_slash: block must be a power of two"),
    ("vertical_slash(last_q=0)", "vertical_slash: last_q"),
    ("vertical_slash(min_len=1.5)", "min_len.*vertical_slash"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_string_form_round_trips():
    text = "vertical_slash(vertical=64, slash=256, last_q=64, block=64, min_len=0)"
    p = recipes.parse(text)
    assert recipes.parse(str(p)) == p and p.recipes[0].vertical == 64
