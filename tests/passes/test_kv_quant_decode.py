"""The kv_quant decode lowering (passes/kv_quant_decode.py): a decode step's read → attention
becomes one ``longfx::kv_quant_attention`` over the packed state, with the same logits as the
unfused cache path, and every site it must not touch stays as it was, with the reason."""
import pytest
import torch

import longfx
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

RULE = "kv_quant.fused_decode"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles several models: Dynamo's recompile limit is per code object
    (``LlamaForCausalLM.forward``) and process-wide, so later test files would otherwise find
    it spent and run eagerly, unrewritten."""
    yield
    torch._dynamo.reset()


def _run(model, ids, cache, prefill: int, chunk: int):
    """Logits of ``ids`` [B, T]: the first ``prefill`` tokens in chunks of ``chunk``, then one
    decode step per token."""
    sizes = [min(chunk, prefill - s) for s in range(0, prefill, chunk)]
    sizes += [1] * (ids.shape[1] - prefill)
    return zoo.feed(model, ids, cache, sizes)


def _results(fast):
    return [r for g in fast.longfx_backend.report.graphs for r in g.results if r.rule == RULE]


def _compare(name: str, recipe: str, prefill: int = 80, total: int = 88, seed: int = 0):
    """Compile ``recipe`` twice, with and without the lowering, and check both give the same
    logits over a chunked prefill and single-token decode steps; the lowered model and the
    lowering's report rows."""
    model, _ = zoo.build(name)
    ids = torch.randint(3, 120, (1, total), generator=torch.Generator().manual_seed(seed))
    fast = longfx.compile(model, recipe)
    got = _run(fast, ids, fast.longfx_new_cache(), prefill, 40)
    plain = longfx.compile(model, recipe.replace("kv_quant(", "kv_quant(fuse=false, "))
    want = _run(plain, ids, plain.longfx_new_cache(), prefill, 40)
    assert not _results(plain)                                   # fuse=false: no lowering
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return fast, _results(fast)


@pytest.mark.parametrize("sink", [4, 0])
def test_decode_steps_read_the_packed_state_in_one_op(sink):
    fast, rows = _compare("llama", f"kv_quant(bits=4, group=16, residual=16, sink={sink})")
    fused = [r for r in rows if r.status == "rewritten"]
    assert len(fused) == 2                                   # both layers of the decode graph
    assert all("one-token decode" in r.reason for r in rows if r.status == "rejected")
    codes = [g.code_after for g in fast.longfx_backend.report.graphs]
    decode = [c for c in codes if "kv_quant_attention" in c]
    assert len(decode) == 1 and "kv_quant_read" not in decode[0]
    assert "kv_quant_append" in decode[0]                    # the state is still written
    report = fast.longfx_backend.report
    assert not [w for w in report.warnings if "graph break" in w], report.warnings


def test_the_fused_op_runs_with_the_sink_copy(monkeypatch):
    """The decode op gets the layer's exact sink copy (not the quantized first tokens)."""
    from longfx.kernels.kv_quant import reference

    seen = []
    real = reference.attention_decode

    def spy(q, state, scale=None, sink_k=None, sink_v=None, window=0):
        seen.append(None if sink_k is None else tuple(sink_k.shape))
        return real(q, state, scale, sink_k, sink_v, window)

    monkeypatch.setattr(reference, "attention_decode", spy)
    _compare("llama", "kv_quant(bits=2, group=16, residual=16, sink=3)", total=84)
    assert seen and all(s is not None and s[2] == 3 for s in seen)


def test_fuse_false_parses_prints_and_turns_the_lowering_off():
    from longfx import recipes

    r = recipes.parse("kv_quant(bits=4, fuse=false)").recipes[0]
    assert str(r) == "kv_quant(bits=4, group=64, residual=128, sink=4, fuse=false)"
    assert r.rules() == [] and len(recipes.parse("kv_quant(bits=4)").recipes[0].rules()) == 1
    with pytest.raises(recipes.RecipeError, match="fuse"):
        recipes.parse("kv_quant(fuse=2)")


@pytest.mark.parametrize("options", [
    "bits=4, rotate=true, sink=0",
    "bits=4, rotate=true, sink=4",
    "bits=4, clip=true, sink=0",
    "bits=4, clip=true, sink=4",
    "bits=2, rotate=true, clip=true, sink=4",
    "bits=2, rotate=true, clip=true, key_bits=4, key_layers=(1,), sink=0",
    "bits=2, rotate=true, clip=true, key_bits=4, key_layers=(1,), sink=4",
])
def test_rotated_and_clipped_decode_steps_are_lowered(options):
    """``rotate=true``: the read's un-rotation is replaced by rotating the query (and the exact
    sink copy) in and the output back (QuaRot's identity); ``clip=true``: the append is the op
    with ``clip``. Both layers' decode steps are lowered, with the unlowered model's logits.

    Tolerance (``_compare``: 1e-5 on logits whose largest is ~0.6): the model runs in fp32 and
    the lowering only re-associates fp32 products (q·Q·(K·Q)ᵀ against q·(K·Q·Qᵀ)ᵀ, one more
    [D, D] product on the output); the op-level check of that identity measures ≤ 5e-7
    relative (tests/kernels/kv_quant/test_op.py), these logits differ by ~1e-7. Losing the
    output's or the sinks' rotation costs O(1) there; and the options themselves move these
    logits by far more than the tolerance (checked below), so a lowering that dropped them
    would show."""
    recipe = f"kv_quant(group=16, residual=16, {options})"
    fast, rows = _compare("llama", recipe)
    fused = [r for r in rows if r.status == "rewritten"]
    assert len(fused) == 2 and all(r.site.facts.get("kv_decode") == "fused" for r in fused)
    assert all("one-token decode" in r.reason for r in rows if r.status == "rejected")
    decode = [g.code_after for g in fast.longfx_backend.report.graphs
              if "kv_quant_attention" in g.code_after]
    assert len(decode) == 1 and decode[0].count("longfx.kv_quant_attention.default(") == 2
    assert "kv_quant_read" not in decode[0]
    appends = [ln for ln in decode[0].splitlines() if "kv_quant_append.default(" in ln]
    clip = "clip=true" in options
    assert len(appends) == 2 and all(ln.split(";")[0].endswith(f", {clip})") for ln in appends)
    sinks = not options.endswith("sink=0")
    # per layer: k, v rotated for the append, q in, the output back, and the two sink copies
    want = 2 * (4 + 2 * sinks) if "rotate=true" in options else 0
    assert decode[0].count("longfx.kv_rotate.default(") == want

    from longfx import recipes

    model, _ = zoo.build("llama")                                # the options matter here
    ids = torch.randint(3, 120, (1, 88), generator=torch.Generator().manual_seed(0))
    plain = recipes.parse(recipe.replace("rotate=true", "rotate=false")
                                 .replace("clip=true", "clip=false")).recipes[0]
    got = _run(fast, ids, fast.longfx_new_cache(), 80, 40)
    other = _run(model, ids, plain.make_cache(model), 80, 40)
    assert float((got[:, 80:] - other[:, 80:]).abs().max()) > 1e-3


def test_gear_states_stay_unfused():
    _, rows = _compare("llama", "gear(bits=4, group=16, residual=16)", total=84)
    assert not [r for r in rows if r.status == "rewritten"]


def test_a_site_another_recipe_rewrote_is_left_alone():
    fast, rows = _compare("llama", "sink_window(sink=2, window=8) + kv_quant(bits=8, group=16, "
                                   "residual=16)")
    assert len(rows) == 6                        # 2 layers x (prefill, cached prefill, decode)
    assert all(r.status == "rejected" and "another recipe" in r.reason for r in rows)
    assert all(r.site.facts.get("sparse") for r in rows)        # sink_window took every step


@pytest.mark.parametrize("options", ["", ", rotate=true, clip=true"])
def test_sink_window_decode_steps_over_a_quantized_cache_are_sparse(options):
    """A decode step over a kv_quant cache is a self-attention decode step for the sparse
    rules too (no KV site: the cache's read, un-rotated when ``rotate=true``, is the link).
    With a ring that holds every token nothing is quantized, so it must equal sink_window over
    HF's own cache, step for step (the rotation there and back: fp32 rounding, ~1e-7)."""
    from transformers import DynamicCache

    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 60), generator=torch.Generator().manual_seed(3))
    both = longfx.compile(model, "sink_window(sink=2, window=8) + kv_quant(bits=8, group=16, "
                                 f"residual=64{options})")
    alone = longfx.compile(model, "sink_window(sink=2, window=8)")
    got = _run(both, ids, both.longfx_new_cache(), 40, 20)
    want = _run(alone, ids, DynamicCache(config=model.config), 40, 20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = _run(model, ids, DynamicCache(config=model.config), 40, 20)
    assert float((got[:, 40:] - dense[:, 40:]).abs().max()) > 1e-3   # the decode really is sparse


@pytest.mark.parametrize("prefill,total", [(80, 88), (3, 45)])
def test_sliding_window_layers_are_lowered_with_their_window(prefill, total, monkeypatch):
    """Gemma-3's local layer (zoo: layer 0, window 4): its cache holds more than the window
    (whole groups: up to W − 1 + group − 1 + ring), its mask hides the rest, and the lowering
    passes ``window=4`` to the fused op, so both layers' decode steps are lowered with the
    unlowered logits (fp32, 1e-5). Prefill in chunks of 40 (> the window) then 8 decode steps;
    or 3 tokens then 42 steps: the first steps hold the exact sink copy (sink=4, outside the
    window from the 5th token on) until the first trim drops it, and the graph changes there.
    The same lowered model with the window ignored by the op is far off, so the window is
    what makes these equal."""
    recipe = "kv_quant(bits=4, group=16, residual=16)"
    fast, rows = _compare("gemma3", recipe, prefill=prefill, total=total)
    decode = [r for r in rows if "one-token decode" not in (r.reason or "")]
    assert decode and all(r.status == "rewritten" for r in decode), \
        [(r.site.layer, r.reason) for r in decode]
    assert {r.site.layer for r in decode} == {0, 1}
    assert {r.site.facts["kv_decode_window"] for r in decode if r.site.layer == 0} == {4}
    assert {r.site.facts["kv_decode_window"] for r in decode if r.site.layer == 1} == {0}
    for g in fast.longfx_backend.report.graphs:
        calls = [ln for ln in g.code_after.splitlines() if "kv_quant_attention.default(" in ln]
        assert len(calls) in (0, 2) and "kv_quant_read" not in g.code_after * bool(calls)
        assert sum(ln.split(";")[0].endswith(", 4)") for ln in calls) == len(calls) // 2

    from longfx.kernels.kv_quant import reference

    real = reference.attention_decode
    monkeypatch.setattr(reference, "attention_decode",
                        lambda q, st, scale=None, sk=None, sv=None, window=0:
                        real(q, st, scale, sk, sv))                      # the window ignored
    model, _ = zoo.build("gemma3")
    ids = torch.randint(3, 120, (1, total), generator=torch.Generator().manual_seed(0))
    plain = longfx.compile(model, recipe.replace("kv_quant(", "kv_quant(fuse=false, "))
    want = _run(plain, ids, plain.longfx_new_cache(), prefill, 40)
    torch._dynamo.reset()
    ignored = longfx.compile(model, recipe)
    got = _run(ignored, ids, ignored.longfx_new_cache(), prefill, 40)
    assert float((got[:, prefill:] - want[:, prefill:]).abs().max()) > 1e-2


def test_a_window_that_is_not_the_configs_is_not_lowered():
    """The mask's window must be the one the config gives the layer's cache: with the config
    facts saying 6 for layer 0 (its mask hides all but 4), the local layer stays unlowered,
    with the reason; the global layer is lowered."""
    from longfx.passes.kv_quant_decode import decode_window
    from longfx.rewrite.sites import Site

    model, _ = zoo.build("gemma3")
    ids = torch.randint(3, 120, (1, 44), generator=torch.Generator().manual_seed(0))
    fast = longfx.compile(model, "kv_quant(bits=4, group=16, residual=16)")
    fast.longfx_backend.model_facts["layer_windows"] = {0: 6}
    _run(fast, ids, fast.longfx_new_cache(), 40, 40)
    decode = [r for r in _results(fast) if "one-token decode" not in (r.reason or "")]
    local = [r for r in decode if r.site.layer == 0]
    assert local and all(r.status == "rejected" and "window of 4 is not" in r.reason
                         for r in local)
    assert {r.site.layer for r in decode if r.status == "rewritten"} == {1}

    mask = torch.fx.Graph().call_function(torch.arange, (9,))     # a mask from sizes alone
    site = Site(kind="attention", layer=0)
    site.facts.update(mask_kind="full", layer_windows={0: 4}, mask_seen_len=9)
    assert "showed all of 9" in decode_window(site, mask)
    site.facts.update(mask_seen_len=4)
    assert decode_window(site, mask) == 4
    assert "no mask" in decode_window(site, None)
    site.facts.update(mask_seen_len=3)
    assert "no mask" in decode_window(site, None)
    site.facts.update(layer_windows={})
    assert decode_window(site, None) == 0


def test_padded_batches_are_not_fused_and_generate_is_unchanged():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    fast = longfx.compile(model, "kv_quant(bits=4, group=16, residual=16)")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        got = fast.generate(**kw)
        want = model.generate(**kw, past_key_values=fast.longfx_new_cache())
    assert torch.equal(got, want)
    rows = _results(fast)
    assert not [r for r in rows if r.status == "rewritten"]
    assert any("tensor inputs" in (r.reason or "") for r in rows)
