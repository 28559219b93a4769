"""RoPE canonicalization: every application becomes one ``longfx::rope`` call, exactly.

Each graph is captured (Dynamo backend, or torch.export), analyzed, rewritten on a copy by
the pass manager with ``CanonicalRope``, and run on the recorded example inputs: outputs
must match the original graph's (fp32, relative error <= 1e-5; in practice bit-exact). The
frequency vector must stay reachable from every new op's tables.
"""
import pytest
import torch
import torch.fx as fx

from longfx.kernels.rope.op import OP
from longfx.passes.canonical.rope import CanonicalRope
from longfx.rewrite import graph as G
from longfx.rewrite.detect.rope import find_rope
from longfx.rewrite.engine import copy_graph_module
from longfx.rewrite.manager import PassManager
from longfx.rewrite.testing import handmade, zoo

ROPE_ZOO = [n for n, e in zoo.ZOO.items() if e.has_rope]
HANDMADE = ["sdpa_rope", "gptj_interleaved", "meta_complex", "rope_matmul_autocast",
            "rope_cached_gather", "rope_split_scaled"]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "values"):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _assert_same(new, ref, rtol=1e-5):
    new, ref = _tensors(new), _tensors(ref)
    assert len(new) == len(ref) > 0
    for a, b in zip(new, ref):
        if a.is_floating_point():
            err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
            assert err.item() <= rtol, err.item()
        else:
            assert torch.equal(a, b)


def _rope_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is OP]


def _canonicalize(gm, example):
    new = copy_graph_module(gm)
    sites = find_rope(new, example)
    results = PassManager([CanonicalRope()]).run(new, sites)
    return new, sites, results


def _check(gm, example, expected_apps, inv_freq_expected=True):
    with torch.no_grad():
        ref = gm(*example)
    new, sites, results = _canonicalize(gm, example)
    assert [r.status for r in results] == ["rewritten"] * len(sites), [r.reason for r in results]
    nodes = _rope_nodes(new)
    assert len(nodes) == expected_apps
    for node in nodes:
        assert node.meta["longfx"]["rule"] == "canonical.rope"
        assert G.val(node) is not None                        # example value carried over
    with torch.no_grad():
        _assert_same(new(*example), ref)
    for site in sites:
        inv = site.nodes["inv_freq"]
        if not inv_freq_expected:
            assert inv is None
            continue
        assert inv is not None and inv.graph is new.graph
        for app in site.nodes["applications"]:
            assert app["output"].target is OP
            assert inv in G.ancestors(app["output"])          # frequencies still reachable
    # No rotation spelled out is left; re-analysis finds the canonical ops as the sites.
    again = find_rope(new, example)
    assert [s.spelling.split(":")[1] for s in again] == ["canonical"] * len(sites)
    assert [s.facts["base"] for s in again] == [s.facts["base"] for s in sites]
    assert [r.status for r in PassManager([CanonicalRope()]).run(new, again)] == \
        ["rejected"] * len(again)
    return new, sites


@pytest.mark.parametrize("name", ROPE_ZOO)
def test_zoo_rope_canonical_exact(name):
    gm, example = zoo.captured(name)[0]
    _check(gm, example, zoo.ZOO[name].rope_applications)


@pytest.mark.parametrize("name", HANDMADE)
def test_handmade_rope_canonical_exact(name):
    case = handmade.CASES[name]
    model, ids = handmade.make(name)
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    _check(gm, example, case.rope_applications,
           inv_freq_expected=case.rope_table == "computed")


def test_partial_rotary_keeps_pass_through_channels():
    gm, example = zoo.captured("gpt_neox")[0]
    new, sites = _check(gm, example, 4)
    for node in _rope_nodes(new):
        assert node.args[3:] == ("rotate_half", 4)
        assert G.shape(node.args[0])[-1] == 16               # whole head goes in


def test_near_misses_are_rejected_with_their_reason():
    model, ids = handmade.make("rope_swapped")
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    new, sites, results = _canonicalize(gm, example)
    assert results and all(r.status == "rejected" and "swapped" in r.reason for r in results)
    assert _rope_nodes(new) == []


@pytest.mark.parametrize("name", ["llama", "meta_complex", "rope_matmul_autocast"])
def test_export_module_canonical_exact(name):
    """aten level: rewrite ``ExportedProgram.module()`` in place and run it."""
    if name in handmade.CASES:
        model, ids = handmade.make(name)
        kwargs, apps = {}, handmade.CASES[name].rope_applications
    else:
        model, inputs = zoo.build(name, "eager")
        ids, kwargs = inputs["input_ids"], {"use_cache": False}
        apps = zoo.ZOO[name].rope_applications
    gm = torch.export.export(model, (ids,), kwargs, strict=False).module()
    with torch.no_grad():
        ref = gm(ids, **kwargs)
    sites = find_rope(gm)
    results = PassManager([CanonicalRope()]).run(gm, sites)
    assert [r.status for r in results] == ["rewritten"] * len(sites)
    assert len(_rope_nodes(gm)) == apps
    with torch.no_grad():
        _assert_same(gm(ids, **kwargs), ref)
    inv = sites[0].nodes["inv_freq"]
    assert isinstance(inv, fx.Node) and inv.graph is gm.graph and inv.users


def test_frequencies_can_be_changed_through_inv_freq():
    """What a frequency transform will do: swap inv_freq's value, cos/sin follow."""
    model, ids = handmade.make("sdpa_rope")
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    new, sites, _ = _canonicalize(gm, example)
    inv = sites[0].nodes["inv_freq"]
    holders = [n for n in new.graph.nodes if n.op == "placeholder"]
    i = holders.index(inv)
    changed = list(example)
    changed[i] = example[i] / 4.0                            # e.g. linear position scaling
    with torch.no_grad():
        a, b = new(*example), new(*changed)
    assert not torch.allclose(_tensors(a)[0], _tensors(b)[0])
