"""The zoo and the hand-written models: every entry builds, runs, and compiles to one graph."""
import pytest
import torch

from longfx.rewrite.testing import handmade, zoo

IMPLS = [(name, impl) for name, e in zoo.ZOO.items() for impl in e.attn_implementations]


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name,impl", IMPLS, ids=[f"{n}-{i}" for n, i in IMPLS])
def test_zoo_builds_and_runs(name, impl):
    model, inputs = zoo.build(name, impl)
    assert not model.training
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        out = _first(model(**inputs))
    assert out.shape[0] == zoo.BATCH and torch.isfinite(out).all()


def test_zoo_is_seeded():
    a, _ = zoo.build("llama", seed=3)
    b, _ = zoo.build("llama", seed=3)
    c, _ = zoo.build("llama", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pa[key], pb[key]) and not torch.equal(pa[key], pc[key])


def test_zoo_unsupported_implementation_says_why():
    assert "sdpa" in zoo.ZOO["gemma2"].unsupported
    with pytest.raises(ValueError, match="gemma2 does not support"):
        zoo.build("gemma2", "sdpa")


def test_zoo_expectations_are_consistent():
    for e in zoo.ZOO.values():
        assert e.attention_sites >= 2
        assert (e.rope_style is None) == (e.rope_tables == 0) == (e.rotary_dim is None)
        assert e.rope_applications == (4 if e.rope_tables else 0)
        assert set(e.unsupported).isdisjoint(e.attn_implementations)
    assert zoo.ZOO["t5"].attention_sites == 6 and zoo.ZOO["gemma3"].rope_tables == 2


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_compiles_to_expected_graphs(name):
    graphs = zoo.captured(name)
    assert len(graphs) == zoo.ZOO[name].dynamo_graphs
    gm, example = graphs[0]
    assert any(n.meta.get("nn_module_stack") for n in gm.graph.nodes)
    assert any("example_value" in n.meta for n in gm.graph.nodes)


@pytest.mark.parametrize("name", handmade.names() + handmade.variant_names())
def test_handmade_runs_and_compiles(name):
    model, ids = handmade.make(name)
    with torch.no_grad():
        ref = model(ids)
    graphs = zoo.record_graphs(model, {"ids": ids})
    assert len(graphs) == 1
    gm, example = graphs[0]
    with torch.no_grad():
        out = gm(*example)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ep = torch.export.export(model, (ids,), strict=False)
    torch.testing.assert_close(ep.module()(ids), ref, rtol=1e-6, atol=1e-6)
