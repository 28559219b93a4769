"""flex_prefill on the zoo: gamma=1 equals dense, a small gamma builds adaptive tables and
changes the output, report facts, bad arguments as RecipeError naming the recipe."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.kernels.block_sparse import op
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _ids(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (1, n), generator=g)


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("qwen3", "eager")])
def test_gamma_one_is_exact_and_small_gamma_builds_tables(name, impl):
    model, _ = zoo.build(name, impl)
    ids = _ids()
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with op.record_density() as st_full:
            full = longfx.compile(model, "flex_prefill(gamma=1, block=16, min_len=0)")(
                input_ids=ids).logits
        outs, density = {}, {}
        for tau in (0.0, 1.0):                              # all vertical-slash / all query-aware
            fast = longfx.compile(model, f"flex_prefill(gamma=0.3, tau={tau}, block=16, "
                                         "min_len=0)")
            with op.record_density() as st:
                outs[tau] = fast(input_ids=ids).logits
            kept, causal, calls = st["prefill"]
            assert calls == layers and st["dense_calls"] == 0
            density[tau] = kept / causal
    # a random tiny model attends almost uniformly: vertical-slash lines holding 30% of the
    # column / diagonal mass touch (nearly) every tile, the query-aware blocks do not
    assert density[1.0] < 0.75 and density[0.0] > density[1.0]
    assert _rel(full, dense) < 1e-5
    assert st_full["prefill"][0] == st_full["prefill"][1] == layers * 10 * \
        model.config.num_attention_heads
    assert _rel(outs[1.0], dense) > 1e-3


def test_report_rows_carry_the_spec():
    model, _ = zoo.build("llama", "sdpa")
    d = longfx.diff(model, "flex_prefill(gamma=0.95, tau=0.2)", inputs={"input_ids": _ids()})
    sites = [s for s in d.report.sites if s.kind == "attention"]
    assert sites and all(s.facts["dynamic_sparse"]["gamma"] == 0.95 for s in sites)
    assert "flex_prefill gamma=0.95 tau=0.2 block=64 min_len=16384" in sites[0].facts["sparse"]
    assert sites[0].facts["density"] == 1.0 and "adaptive" in sites[0].facts["density_kind"]


@pytest.mark.parametrize("text,match", [
    ("flex_prefill(gamma=0)", "flex_prefill: gamma"),
    ("flex_prefill(gamma=1.5)", "flex_prefill: gamma"),
    ("flex_prefill(tau=-0.1)", "flex_prefill: tau"),
    ("flex_prefill(tau='x')", "tau.*flex_prefill"),
    ("flex_prefill(block=100)", "flex_prefill: block must be a power of two"),
    ("flex_prefill(min_len=-1)", "flex_prefill: min_len"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_string_form_round_trips():
    p = recipes.parse("flex_prefill(gamma=0.9, tau=0.1, block=64, min_len=0)")
    assert recipes.parse(str(p)) == p and p.recipes[0].gamma == 0.9
