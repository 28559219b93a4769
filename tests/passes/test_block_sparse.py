"""block_sparse / decode_topk on the zoo: equal to dense when the budget keeps every block,
tables really built (and the output changed) when it does not, decode dense unless decode_topk
is in the recipe, composition on one site, native windows and other sparse recipes left alone,
bad arguments as RecipeError."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.eval import infer
from longfx.kernels.block_sparse import op
from longfx.kernels.block_sparse.op import OP as BLOCK_SPARSE
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

FULL = "block_sparse(block=16, topk=99, min_len=0)"
SMALL = "block_sparse(block=16, topk=2, sink=0, window=0, min_len=0)"


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _ids(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (1, n), generator=g)


def _sites(model, recipe, ids):
    d = longfx.diff(model, recipe, inputs={"input_ids": ids})
    return d, [s for s in d.report.sites if s.kind == "attention"]


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("qwen3", "eager")])
def test_full_budget_is_exact_and_small_budget_builds_tables(name, impl):
    model, _ = zoo.build(name, impl)
    ids = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        full = longfx.compile(model, FULL)(input_ids=ids).logits
        small_model = longfx.compile(model, SMALL)
        with op.record_density() as st:
            small = small_model(input_ids=ids).logits
    assert _rel(full, dense) < 1e-5
    layers = model.config.num_hidden_layers
    assert st["prefill"][2] == layers and st["dense_calls"] == 0
    kept, causal = st["prefill"][:2]
    assert kept / causal == pytest.approx((1 + 2 + 2 + 2) / 10)   # 4 query blocks, topk 2
    assert _rel(small, dense) > 1e-3


def test_report_rows_carry_the_spec_and_density():
    model, _ = zoo.build("llama", "sdpa")
    d, sites = _sites(model, "block_sparse(density=0.25, block=64) + decode_topk(blocks=32)",
                      _ids())
    assert sites and all(s.facts["block_sparse"]["density"] == 0.25 for s in sites)
    assert all(s.facts["block_sparse"]["decode_topk"] == 32 for s in sites)
    assert "prefill block=64 density=0.25" in sites[0].facts["sparse"]
    assert "decode block=16 blocks=32" in sites[0].facts["sparse"]
    assert 0.25 <= sites[0].facts["density"] < 0.5          # forced blocks add to 0.25 at 8k
    est = d.report.estimate(8192)
    assert est["attn_flops_after"] < 0.5 * est["attn_flops_before"]
    code = d.report.graphs[0].code_after
    assert code.count("block_sparse_attention") >= model.config.num_hidden_layers


def test_decode_dense_without_decode_topk_and_decode_topk_reads_its_budget():
    model, _ = zoo.build("llama", "sdpa")
    ids = _ids(64, seed=1)[0]                              # prefill in chunks of 32
    layers = model.config.num_hidden_layers
    want = infer.greedy(model, ids, 3, chunk=32)
    fast = longfx.compile(model, "block_sparse(block=16, topk=99, min_len=0)")
    with op.record_density() as st:
        got = infer.greedy(fast, ids, 3, chunk=32)
    assert got == want and st["decode"][2] == 0            # decode steps stayed dense
    fast = longfx.compile(model, "decode_topk(blocks=2, block=16, sink=0, window=0, min_len=0)")
    with op.record_density() as st:
        infer.greedy(fast, ids, 2, chunk=32)               # decode over 65 and 66 keys
    kept, causal, calls = st["decode"]
    assert calls == 2 * layers and kept / causal == pytest.approx(2 / 5)


def test_leaves_sites_another_sparse_recipe_made_sparse_alone():
    model, _ = zoo.build("llama", "sdpa")
    _, sites = _sites(model, "sink_window(sink=2, window=8) + block_sparse", _ids())
    assert all("sink=2, window=8" in s.facts["sparse"] for s in sites)
    assert all(not isinstance(s.nodes.get("block_sparse"), torch.fx.Node) for s in sites)


def test_native_window_layers_are_left_alone():
    model, _ = zoo.build("gemma2", "eager")
    d, sites = _sites(model, "block_sparse", _ids())
    g = d.report.graphs[0]
    local = [s for s in sites if (s.facts.get("mask_spec") or {}).get("window")
             or "native window" in str(g.status(s)[1])]
    assert local, "gemma2 has local layers"
    for s in local:
        assert "native window" in g.status(s)[1]
        assert not isinstance(s.nodes.get("block_sparse"), torch.fx.Node)
    assert any(isinstance(s.nodes.get("block_sparse"), torch.fx.Node) for s in sites)


@pytest.mark.parametrize("text,match", [
    ("block_sparse(block=24)", "power of two"),
    ("block_sparse(topk=4, density=0.2)", "not both"),
    ("block_sparse(density=1.5)", "density"),
    ("block_sparse(estimate='oracle')", "estimate"),
    ("decode_topk(blocks=0)", "blocks"),
    ("decode_topk(block=8)", "power of two"),
])
def test_bad_arguments(text, match):
    with pytest.raises(recipes.RecipeError, match=match):
        recipes.parse(text)


def test_string_form_round_trips():
    for text in ["block_sparse(block=64, topk=None, density=0.1, sink=64, window=128, "
                 "estimate='pooled', last_q=64, min_len=16384)",
                 "decode_topk(blocks=64, block=16, density=None, sink=16, window=64, "
                 "min_len=4096)"]:
        p = recipes.parse(text)
        assert recipes.parse(str(p)) == p
    assert BLOCK_SPARSE is torch.ops.longfx.block_sparse_attention.default
