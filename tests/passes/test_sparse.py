"""Sparse attention recipes on the zoo and hand-made models: exact when the window covers the
sequence, equal to a plain-mask emulation when it does not, native windows kept, padding
carried as a [B, Skv] vector, the distance cap wired to the right frequencies."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.kernels.sparse_attention import reference as R
from longfx.kernels.sparse_attention.op import OP as SPARSE
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

CAUSAL = [n for n in zoo.names() if zoo.ZOO[n].causal and not zoo.ZOO[n].encoder_decoder]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _sparse_nodes(model, recipe, inputs):
    d = longfx.diff(model, recipe, inputs=inputs)
    return d, [s for s in d.report.sites if s.kind == "attention"]


@pytest.mark.parametrize("name,impl", [(n, i) for n in CAUSAL for i in zoo.ZOO[n].attn_implementations])
def test_window_covering_the_sequence_is_exact(name, impl):
    model, inputs = zoo.build(name, impl)
    d, sites = _sparse_nodes(model, "sink_window(sink=2, window=64)", inputs)
    assert all(s.facts.get("sparse") for s in sites), [s.facts.get("mask_spec_reason") for s in sites]
    fast = longfx.compile(model, "sink_window(sink=2, window=64)")
    with torch.no_grad():
        assert _rel(_logits(fast(**inputs)), _logits(model(**inputs))) < 1e-5


def _spec_mask(s, skv, sink, window, pad=None):
    """The emulation: a plain additive 4-D mask [B|1, 1, S, Skv] of the same spec."""
    qp, kp = R.positions(s, skv)
    keep = R.visible(qp, kp, sink, window)[None, None]
    if pad is not None:
        keep = keep & pad.bool()[:, None, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("recipe,sink,window", [("sink_window(sink=2, window=4)", 2, 4),
                                                ("sliding_window(window=3)", 0, 3)])
def test_small_window_equals_a_plain_mask_emulation(name, impl, recipe, sink, window):
    model, inputs = zoo.build(name, impl)
    ids = inputs["input_ids"]
    fast = longfx.compile(model, recipe)
    with torch.no_grad():
        got = _logits(fast(input_ids=ids))
        want = _logits(model(input_ids=ids, attention_mask=_spec_mask(11, 11, sink, window)))
        dense = _logits(model(input_ids=ids))
    assert _rel(got, want) < 1e-5
    assert _rel(got, dense) > 1e-3            # the rewrite did change something


def test_left_padding_is_carried_as_a_key_vector():
    model, inputs = zoo.build("llama", "sdpa")
    ids = inputs["input_ids"]
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[1, :3] = 0                                             # row 1 left-padded by 3
    d, sites = _sparse_nodes(model, "sink_window(sink=2, window=4)",
                             {"input_ids": ids, "attention_mask": pad})
    assert all(s.facts["mask_spec"]["padding"] for s in sites)
    assert "attention_mask" not in d.report.graphs[0].code_after.split("sparse_attention")[-1]
    fast = longfx.compile(model, "sink_window(sink=2, window=4)")
    with torch.no_grad():
        got = _logits(fast(input_ids=ids, attention_mask=pad))
        want = _logits(model(input_ids=ids, attention_mask=_spec_mask(11, 11, 2, 4, pad)))
    assert _rel(got[1, 3:], want[1, 3:]) < 1e-5 and _rel(got[0], want[0]) < 1e-5


@pytest.mark.parametrize("name", ["mistral", "gemma3", "gemma2"])
def test_native_windows_are_kept(name):
    """Mistral (window 4 everywhere) and Gemma's local layers (window 4) keep their own
    window: a wider recipe window must not widen them, so a covering recipe stays exact."""
    impl = zoo.ZOO[name].attn_implementations[-1]
    model, inputs = zoo.build(name, impl)
    d, sites = _sparse_nodes(model, "sink_window(sink=4, window=64)", inputs)
    natives = [s.facts.get("native_window") for s in sites]
    assert 4 in natives
    assert all(s.facts["sparse_spec"] == {"sink": 0, "window": 4, "cap": 0}
               for s in sites if s.facts.get("native_window"))
    fast = longfx.compile(model, "sink_window(sink=4, window=64)")
    with torch.no_grad():
        assert _rel(_logits(fast(**inputs)), _logits(model(**inputs))) < 1e-5


def test_generate_through_the_cache_matches_the_dense_model_when_covering():
    model, inputs = zoo.build("llama", "sdpa")
    ids = inputs["input_ids"][:1]
    fast = longfx.compile(model, "sink_window(sink=2, window=128)")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
        got = fast.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


def test_chunked_prefill_through_the_cache_equals_one_masked_forward():
    from longfx.eval import infer

    model, _ = zoo.build("llama", "sdpa")
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0))
    fast = longfx.compile(model, "sink_window(sink=2, window=6)")
    with torch.no_grad():
        got = torch.cat([lg for _s, lg, _c in infer.chunked_logits(fast, ids, 9)])
        want = _logits(model(input_ids=ids[None], attention_mask=_spec_mask(40, 40, 2, 6)))[0]
    assert _rel(got, want) < 1e-5


def test_rope_cap_reads_the_models_frequencies_and_composes_with_yarn():
    model, inputs = zoo.build("llama", "sdpa")
    inv = model.model.rotary_emb.inv_freq

    def cap_args(recipe):
        d, sites = _sparse_nodes(model, recipe, inputs)
        gm = d.report.graphs[0]
        return sites, gm

    sites, _ = cap_args("sink_window(sink=2, window=4) + rope_cap(max_distance=6)")
    assert {s.facts["sparse_spec"]["cap"] for s in sites} == {6}
    # alone: the Λ mask with window = max_distance (default: the trained length, 128 here)
    sites, _ = cap_args("rope_cap")
    assert {str(s.facts["sparse_spec"]) for s in sites} == {"{'sink': 4, 'window': 128, 'cap': 128}"}
    # the frequencies the op receives, read back by running the rewritten graph's argument
    from longfx.testing import run_pass

    for text, expect in [("rope_cap(max_distance=6)", inv),
                         ("yarn(factor=2, original=64) + rope_cap(max_distance=6)", None),
                         ("rope_cap(max_distance=6) + yarn(factor=2, original=64)", None)]:
        res = run_pass(model, inputs, recipes.parse(text).rules())
        gm = res.rewritten[0]
        seen = []
        node = next(n for n in gm.graph.nodes if n.target is SPARSE)

        def hook(*args):
            seen.append(args[9].detach().clone())
            return R.sparse_attention(*args)

        node.target = hook
        gm.recompile()
        with torch.no_grad():
            gm(*res.inputs[0])
        if expect is None:
            from longfx.passes.rope import yarn_inv_freq

            expect = yarn_inv_freq(inv.double(), 2.0, 16, 10000.0, 64).float()
        assert torch.allclose(seen[0], expect, rtol=1e-6), text


def test_rope_cap_covering_changes_nothing_and_small_cap_changes_sinks():
    model, inputs = zoo.build("llama", "sdpa")
    ids = inputs["input_ids"]
    with torch.no_grad():
        plain = _logits(longfx.compile(model, "sink_window(sink=2, window=4)")(input_ids=ids))
        wide = _logits(longfx.compile(model, "sink_window(sink=2, window=4) + rope_cap(max_distance=64)")(input_ids=ids))
        tight = _logits(longfx.compile(model, "sink_window(sink=2, window=4) + rope_cap(max_distance=5)")(input_ids=ids))
    assert _rel(wide, plain) < 1e-6
    assert _rel(tight[:, :6], plain[:, :6]) < 1e-5            # positions <= cap: unchanged
    assert _rel(tight[:, 6:], plain[:, 6:]) > 1e-4            # beyond: sinks seen closer


def test_rejections_name_the_reason():
    model, inputs = zoo.build("bert", "sdpa")
    d, sites = _sparse_nodes(model, "sink_window", inputs)
    rows = [r for r in d.report.rows() if r["kind"] == "attention"]
    assert all(r["status"] == "rejected" and "'full'" in r["reason"] for r in rows)
    model, inputs = zoo.build("gpt2", "sdpa")
    with pytest.raises(recipes.RecipeError, match="window"):
        recipes.parse("sink_window(window=0)")
    d, _ = _sparse_nodes(model, "rope_cap(max_distance=8)", inputs)
    rows = [r for r in d.report.rows() if r["kind"] == "attention"]
    assert all(r["status"] == "rejected" and "RoPE" in r["reason"] for r in rows)
    d, _ = _sparse_nodes(model, "sink_window + sliding_window(window=8)", inputs)
    reasons = [x.reason for g in d.report.graphs for x in g.results if x.rule == "sparse.sliding_window"]
    assert reasons and all("already sparse" in r for r in reasons)


def test_report_estimates_the_computed_fraction():
    model, inputs = zoo.build("llama", "sdpa")
    d, _ = _sparse_nodes(model, "sink_window(sink=4, window=1024)", inputs)
    est = d.report.estimate(32768)
    ratio = est["attn_flops_after"] / est["attn_flops_before"]
    assert ratio == pytest.approx(R.density(32768, 32768, 4, 1024), rel=1e-9)
    assert ratio < 0.07


@pytest.mark.parametrize("recipe", ["sink_window(sink=2, window=4)", "self_extend(group=2, window=4)"])
def test_decode_steps_without_a_mask_are_rewritten_too(recipe):
    """HF builds no mask for one query without padding; those decode steps must run the
    recipe too (they ran dense before), so generate equals recomputing every prefix."""
    model, _ = zoo.build("llama", "sdpa")
    ids = torch.randint(3, zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    fast = longfx.compile(model, recipe)
    with torch.no_grad():
        out = fast.generate(ids, max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, fast(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    rows = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "attention"]
    assert rows and all(r["status"] == "rewritten" for r in rows)


def test_one_query_cross_attention_stays_dense():
    """A decoder query over encoder keys has no KV append feeding it: not a decode step."""
    model, inputs = zoo.build("t5", "eager")
    fast = longfx.compile(model, "sink_window(sink=1, window=2)")
    with torch.no_grad():
        fast.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False)
    sites = [s for g in fast.longfx_backend.report.graphs for s in g.sites
             if s.kind == "attention"]
    cross = [s for s in sites if "EncDecAttention" in (s.module or "")]
    assert cross and all(s.facts.get("sparse") is None for s in cross)


def test_a_mask_built_from_sizes_alone_carries_no_padding():
    """transformers 5.17 builds SmolLM2's one-query decode mask from ``arange`` and a comparison
    on the cache length: such a mask is causal by construction (``one_query_decode`` takes it);
    one that reads a tensor input (padding) or a buffer is not."""
    import operator

    import torch.fx as fx

    from longfx.passes.sparse import mask_from_sizes

    g = fx.Graph()
    n = g.placeholder("n")
    n.meta["example_value"] = 5
    pad = g.placeholder("pad")
    pad.meta["example_value"] = torch.ones(1, 6, dtype=torch.bool)
    n1 = g.call_function(operator.add, (n, 1))
    causal = g.call_function(operator.le, (g.call_function(torch.arange, (n1,)), n))
    padded = g.call_function(operator.and_, (causal, pad))
    stored = g.call_function(operator.and_, (causal, g.get_attr("mask_buffer")))
    unknown = g.placeholder("unknown")                      # no example value recorded
    assert mask_from_sizes(causal)
    assert not mask_from_sizes(padded)
    assert not mask_from_sizes(stored)
    assert not mask_from_sizes(g.call_function(operator.le, (causal, unknown)))
