"""Attention analysis + canonicalization on the zoo and the hand-written models.

Per architecture and attention implementation: every attention site is found, every one is
rewritten into ``longfx::attention``, and each rewritten graph computes what the original
did (fp32, relative error <= 1e-5).
"""
import pytest
import torch

from longfx import testing
from longfx.rewrite.testing import handmade, zoo

CASES = [(name, impl) for name, entry in zoo.ZOO.items() for impl in ("eager", "sdpa")
         if impl in entry.attn_implementations]


def _canonical_nodes(result):
    return [n for gm in result.rewritten for n in gm.graph.nodes
            if n.op == "call_function" and "longfx.attention" in str(n.target)]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_zoo_attention_found_and_canonical_exact(name, impl):
    entry = zoo.ZOO[name]
    model, inputs = zoo.build(name, impl)
    result = testing.run_pass(model, inputs)
    n = entry.attention_sites
    testing.assert_counts(result, "attention", found=n, rewritable=n, rewritten=n)
    assert len(_canonical_nodes(result)) == n
    for node in _canonical_nodes(result):
        assert node.meta["longfx"]["rule"] == "canonical.attention"
    testing.assert_close(result, rtol=1e-5)
    heads = {s.facts["num_heads"] for s in result.sites("attention")}
    assert heads <= {entry.num_heads, None}


@pytest.mark.parametrize("name", [c for c in handmade.names() if c != "near_miss"])
def test_handmade_attention_found_and_canonical_exact(name):
    case = handmade.CASES[name]
    model, x = handmade.make(name)
    result = testing.run_pass(model, (x,))
    n = case.attention_sites
    testing.assert_counts(result, "attention", found=n, rewritten=n)
    testing.assert_close(result, rtol=1e-5)


def test_near_miss_softmax_axis_is_rejected_with_reason():
    model, x = handmade.make("near_miss")
    result = testing.run_pass(model, (x,))
    testing.assert_counts(result, "attention", rewritable=0, rewritten=0)
    testing.assert_rejected(result, "attention", "softmax over axis")
    testing.assert_close(result, rtol=0)        # nothing rewritten: bit-identical


def test_gqa_repeat_is_stripped_to_kv_heads():
    model, inputs = zoo.build("llama", "eager")
    result = testing.run_pass(model, inputs)
    for site in result.sites("attention"):
        assert site.facts["num_kv_heads"] == zoo.KV_HEADS
        assert site.facts["gqa"].startswith("repeat")
        k = site.nodes["canonical"].args[1]
        assert k.meta["example_value"].shape[1] == zoo.KV_HEADS


def test_gemma3_sliding_and_full_layers_are_named():
    model, inputs = zoo.build("gemma3", "eager")
    inputs = {"input_ids": torch.randint(3, zoo.VOCAB, (1, 40))}
    result = testing.run_pass(model, inputs, canonicalize=False)
    kinds = [s.facts.get("mask_kind") for s in result.sites("attention")]
    window = model.config.sliding_window
    assert f"sliding_window({window})" in kinds and "causal" in kinds, kinds


def test_dropout_in_training_mode_is_a_near_miss():
    model, x = handmade.make("nanogpt")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    result = testing.run_pass(model, (x,), canonicalize=False)
    testing.assert_rejected(result, "attention", "dropout")


def test_bloom_reshaped_scores_are_near_misses_and_model_unchanged():
    # Bloom (ALiBi) reshapes [B*H, S, Skv] scores to [B, H, S, Skv] around the softmax: found,
    # not taken, with the reason; the graph runs unrewritten.
    import transformers

    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    result = testing.run_pass(model, {"input_ids": torch.randint(3, 128, (2, 11))})
    testing.assert_counts(result, "attention", found=2, rewritable=0, rewritten=0)
    testing.assert_rejected(result, "attention", "reshaped")
    testing.assert_close(result, rtol=0)
