"""The front door: compile() keeps the model's contract, inspect/diff report what they saw."""
import json

import pytest
import torch

import longfx
from longfx.rewrite.testing import zoo

ARCHS = ["llama", "gemma3", "gpt2", "t5", "bert", "qwen3"]


@pytest.mark.parametrize("name", ARCHS)
def test_compile_empty_recipe_keeps_logits(name):
    model, inputs = zoo.build(name, "sdpa" if name != "gpt2" else "eager")
    fast = longfx.compile(model, "")
    with torch.no_grad():
        ref = model(**inputs)
        out = fast(**inputs)
    assert type(out) is type(ref)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    a, b = getattr(out, key), getattr(ref, key)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    report = fast.longfx_backend.report
    rewritten = report.counts()["attention"]["rewritten"]
    assert rewritten == zoo.ZOO[name].attention_sites
    assert fast is not model and model.forward is not fast.forward   # the original is untouched


def test_compile_generate_matches_and_accepts_forward_arguments():
    model, _ = zoo.build("llama", "eager")
    fast = longfx.compile(model)
    ids = torch.randint(3, zoo.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                                   # left padding
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(ref, out)
        # explicit cache / position arguments
        first = fast(ids, attention_mask=mask, use_cache=True)
        pos = mask.sum(-1, keepdim=True)
        nxt = first.logits[:, -1:].argmax(-1)
        step = fast(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                    past_key_values=first.past_key_values, position_ids=pos, use_cache=True)
        ref_first = model(ids, attention_mask=mask, use_cache=True)
        ref_step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                         past_key_values=ref_first.past_key_values, position_ids=pos, use_cache=True)
    assert torch.allclose(step.logits, ref_step.logits, rtol=1e-5, atol=1e-6)
    # a handful of graphs (prefill, decode), not one per token
    assert len(fast.longfx_backend.report.graphs) <= 6


def test_torch_compile_with_longfx_backend():
    torch._dynamo.reset()          # plain torch.compile: Dynamo's default recompile limit (8)
    model, inputs = zoo.build("mistral", "sdpa")
    be = longfx.backend("")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        assert torch.allclose(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)
    assert be.report.counts()["attention"]["rewritten"] == 2
    # without longfx's capture settings Dynamo lifts the float scale to a run-time input;
    # the canonical op then reads it from the graph instead of a constant
    assert all(s.rewritable for s in be.report.sites if s.kind == "attention")


def test_inspect_sites_have_public_fields_and_json():
    model, inputs = zoo.build("llama", "eager")
    report = longfx.inspect(model)
    kinds = {s.kind for s in report.sites}
    assert {"attention", "rope", "kv"} <= kinds
    for s in report.sites:
        assert s.kind in ("attention", "rope", "kv")
        assert isinstance(s.rewritable, bool)
        assert s.reason is None or isinstance(s.reason, str)
    attn = [s for s in report.sites if s.kind == "attention"]
    assert [s.layer for s in attn] == [0, 1]
    data = json.loads(report.to_json())
    assert data["counts"]["attention"]["found"] == 2
    assert data["estimate"]["kv_bytes_before"] > 0


def test_diff_shows_canonical_ops_and_estimates():
    model, _ = zoo.build("llama", "sdpa")
    d = longfx.diff(model, "")
    assert "+" in d.text and "longfx.attention" in d.text
    assert "scaled_dot_product_attention" in d.text                  # the removed line
    e = d.report.estimate(4096)
    # 2 layers x (k + v) x 2 kv heads x 16 dims x 4096 tokens x 4 bytes
    assert e["kv_bytes_before"] == 2 * 2 * 2 * 16 * 4096 * 4
    assert e["kv_bytes_after"] == e["kv_bytes_before"]               # the empty recipe saves nothing
    assert "attention" in str(d)


def test_non_hf_model_needs_inputs():
    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(TypeError, match="pass example inputs"):
        longfx.inspect(M())
    report = longfx.inspect(M(), inputs=(torch.ones(3),))
    assert report.sites == []


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_compile_generate_with_static_cache(name):
    # Regressions: dead-code elimination dropped Dynamo's call_method index_copy_ (FX does
    # not see in-place methods as side effects), and the mask analysis once ran the whole
    # graph, writing into the caller's static cache a second time.
    model, inputs = zoo.build(name, "sdpa")
    ids = inputs["input_ids"]
    fast = longfx.compile(model)
    with torch.no_grad():
        out = fast.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
        ref, _ = zoo.build(name, "sdpa")
        ref = ref.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    counts = fast.longfx_backend.report.counts()
    assert counts["attention"]["rewritten"] == counts["attention"]["found"] > 0
    assert counts["kv"]["found"] > 0 and all(
        s.facts.get("static") for s in fast.longfx_backend.report.sites if s.kind == "kv")


def test_extend_reads_the_trained_length_from_the_config():
    model, _ = zoo.build("llama", "sdpa")                        # max_position_embeddings=128
    ids = torch.randint(3, zoo.VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    a = longfx.compile(model, "extend(to=512)")
    b = longfx.compile(model, "yarn(factor=3.125, original=128)")    # 2·200/128: the call's s
    with torch.no_grad():
        la, lb, ref = a(ids).logits, b(ids).logits, model(ids).logits
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la, ref, rtol=1e-3, atol=1e-3)       # the rewrite did something
    site = next(s for s in a.longfx_backend.report.sites if s.kind == "rope")
    assert site.facts["trained_length"] == 128
