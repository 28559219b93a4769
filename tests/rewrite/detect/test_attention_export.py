"""Attention analysis on aten-level graphs from torch.export (the export capture path)."""
import pytest
import torch

from longfx import testing
from longfx.rewrite.engine import rewrite_graph
from longfx.rewrite.testing import handmade, zoo


def _exported(model, args):
    with torch.no_grad():
        ep = torch.export.export(model, args, strict=False)
    return ep.module()


@pytest.mark.parametrize("name,impl", [("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager")])
def test_export_graph_attention_canonical_exact(name, impl):
    model, inputs = zoo.build(name, impl)
    model.config.use_cache = False
    gm = _exported(model, (inputs["input_ids"],))
    new, report = rewrite_graph(gm, None)
    attn = [s for s in report.sites if s.kind == "attention"]
    assert len(attn) == zoo.ZOO[name].attention_sites
    assert all(s.rewritable for s in attn), [s.reason for s in attn]
    assert [s.layer for s in attn] == list(range(len(attn)))
    assert any("aten" in str(n.target) for n in new.graph.nodes)
    with torch.no_grad():
        ref = gm(inputs["input_ids"])
        out = new(inputs["input_ids"])
    assert testing.max_rel_error(out, ref) <= 1e-5


def test_export_handmade_meta_complex():
    model, x = handmade.make("meta_complex")
    gm = _exported(model, (x,))
    new, report = rewrite_graph(gm, None)
    assert sum(s.kind == "attention" and s.rewritable for s in report.sites) == 2
    with torch.no_grad():
        assert testing.max_rel_error(new(x), gm(x)) <= 1e-5
