"""decode_topk with the bounds kept in the cache (passes/block_sparse.py DecodeBoundsRule,
runtime/bounds_cache.py): longfx.compile gives the model a QuestCache, the lowering hands the
kept bounds to each decode step, and the logits equal those of the same recipe with the bounds
recomputed from K (a cache that keeps none); generate() and beam search work; with kv_quant
the bounds are recomputed and the report says why."""
import pytest
import torch
from transformers import DynamicCache

import longfx
from longfx.kernels.block_sparse import op
from longfx.kernels.block_sparse import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.bounds_cache import QuestCache

pytestmark = pytest.mark.filterwarnings("ignore")

RECIPE = "decode_topk(blocks=2, block=16, sink=0, window=16, min_len=0)"
RULE = "sparse.decode_topk_bounds"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


class PlainCache(DynamicCache):
    """HF's cache under another type: ``longfx.compile`` swaps only an empty plain
    ``DynamicCache`` for its own, so this one stays (and keeps no bounds)."""


def _rows(fast):
    return [r for g in fast.longfx_backend.report.graphs for r in g.results if r.rule == RULE]


def _run(model, recipe, cache, ids, prefill=40):
    """Prefill ``prefill`` tokens with the plain model (dense), then a 20-token chunk and single
    decode steps through the compiled recipe; logits of the compiled part."""
    fast = longfx.compile(model, recipe)
    zoo.feed(model, ids[:, :prefill], cache, [prefill])
    rest = ids.shape[1] - prefill
    with op.record_density() as st:
        out = zoo.feed(fast, ids[:, prefill:], cache, [20] + [1] * (rest - 20))
    return out, st, fast


def test_kept_bounds_give_the_logits_of_recomputed_bounds():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 72), generator=torch.Generator().manual_seed(0))
    got, st, fast = _run(model, RECIPE, QuestCache(16, model.config), ids)
    want, st_want, plain = _run(model, RECIPE, PlainCache(), ids)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    assert st["decode"][2] == 12 * layers == st_want["decode"][2]         # every decode step sparse
    rows = _rows(fast)
    assert sum(r.status == "rewritten" for r in rows) == 2 * layers      # chunk + decode graphs
    assert all(r.status == "rejected" for r in _rows(plain))
    dense = zoo.feed(model, ids, DynamicCache(config=model.config), [40, 20] + [1] * 12)
    assert (got - dense[:, 40:]).abs().max() > 1e-3                       # blocks were skipped
    report = fast.longfx_backend.report
    assert not [w for w in report.warnings if "graph break" in w], report.warnings


def test_the_decode_steps_read_the_kept_bounds(monkeypatch):
    """Wrong kept bounds change the selection: the op really reads them (not K)."""
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 70), generator=torch.Generator().manual_seed(4))
    seen = []
    real = R.decode_table

    def spy(q, k, block, *args, bounds=None, **kw):
        seen.append(bounds is not None)
        return real(q, k, block, *args, bounds=bounds, **kw)

    monkeypatch.setattr(R, "decode_table", spy)
    cache = QuestCache(16, model.config)
    good, _, _ = _run(model, RECIPE, cache, ids)
    assert seen and all(seen)
    cache = QuestCache(16, model.config)
    zoo.feed(model, ids[:, :40], cache, [40])
    for layer in cache.layers:                                           # swap lo and hi
        layer.kmin, layer.kmax = -layer.kmin.abs() * 0 + layer.kmax, layer.kmin.clone()
    fast = longfx.compile(model, RECIPE)
    bad = zoo.feed(fast, ids[:, 40:], cache, [20] + [1] * 10)
    assert (bad - good).abs().max() > 1e-4


def test_compiled_generate_uses_the_cache_and_equals_greedy_steps():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 50), generator=torch.Generator().manual_seed(5))
    fast = longfx.compile(model, RECIPE)
    out = fast.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuestCache)
    assert sum(r.status == "rewritten" for r in _rows(fast)) >= 2
    cache, step, toks = QuestCache(16, model.config), ids, []
    with torch.no_grad():
        for _ in range(8):
            nxt = fast(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
            step = nxt.argmax(-1, keepdim=True)
            toks.append(step)
    assert torch.equal(out.sequences[:, 50:], torch.cat(toks, 1))
    beams = dict(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=2)
    got = fast.generate(**beams)
    want = longfx.compile(model, RECIPE).generate(**beams, past_key_values=PlainCache())
    assert torch.equal(got, want)


def test_short_contexts_stay_dense_and_equal_the_eager_model():
    model, _ = zoo.build("qwen3", "eager")
    ids = torch.randint(3, 120, (1, 60), generator=torch.Generator().manual_seed(6))
    fast = longfx.compile(model, "decode_topk(blocks=2, min_len=4096)")
    sizes = [30, 20] + [1] * 10
    got = zoo.feed(fast, ids, fast.longfx_new_cache(), sizes)
    want = zoo.feed(model, ids, DynamicCache(config=model.config), sizes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_kv_quant_the_bounds_are_recomputed_and_the_report_says_why():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 70), generator=torch.Generator().manual_seed(7))
    fast = longfx.compile(model, RECIPE + " + kv_quant(bits=8, group=16, residual=16)")
    cache = fast.longfx_new_cache()
    assert type(cache).__name__ == "QuantizedCache"
    with op.record_density() as st:
        zoo.feed(fast, ids, cache, [40, 20] + [1] * 10)
    assert st["decode"][2] == 10 * model.config.num_hidden_layers        # decode steps sparse
    rows = _rows(fast)
    assert rows and all(r.status == "rejected" for r in rows)
    assert any("recomputed" in r.reason for r in rows)


def test_select_parses_and_prints():
    from longfx import recipes

    r = recipes.parse("decode_topk(select='head')").recipes[0]
    assert "select=head" in str(r) and recipes.parse(str(r)).recipes[0] == r
    assert "select" not in str(recipes.parse("decode_topk").recipes[0])
    with pytest.raises(recipes.RecipeError, match="select"):
        recipes.parse("decode_topk(select='group')")
