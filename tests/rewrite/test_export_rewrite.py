"""The export capture path end to end: explicit KV state in, canonical ops, same numbers."""
import pytest
import torch

from longfx import testing
from longfx.rewrite.capture_export import capture_export
from longfx.rewrite.engine import rewrite_graph
from longfx.rewrite.testing import zoo


@pytest.mark.parametrize("mode,cache", [("prefill", "dynamic"), ("decode", "dynamic"),
                                        ("decode", "static")])
def test_export_capture_canonicalizes_exactly(mode, cache):
    model, _ = zoo.build("llama", "sdpa")
    cap = capture_export(model, mode=mode, cache=cache)
    gm = cap.program.module()
    new, report = rewrite_graph(gm)
    counts = {k: sum(s.kind == k for s in report.sites) for k in ("attention", "rope", "kv")}
    assert counts["attention"] == 2 and counts["rope"] == 1
    assert counts["kv"] == (4 if (mode == "decode" or cache == "static") else counts["kv"])
    rewritten = [n for n in new.graph.nodes if "longfx" in str(n.target)]
    assert len(rewritten) == 2 + 4                     # 2 attention + 4 rope applications
    a = [x.clone() for x in cap.example_inputs]
    b = [x.clone() for x in cap.example_inputs]
    with torch.no_grad():
        ref, out = gm(*a), new(*b)
    assert testing.max_rel_error(out, ref) <= 1e-5
    if cache == "static":                              # the in-place state writes survive
        assert testing.max_rel_error(b, a) <= 1e-5
