"""RoPE detection on the zoo, the hand-written models, spelling variants and export graphs.

Per model: the right number of RopeSites (one per frequency table), every q/k application
found with its layer and role, the style, rotary_dim, head_dim, base and attention scaling;
near-misses carry a reason and are never rewritable.
"""
import pytest
import torch

from longfx.rewrite import graph as G
from longfx.rewrite.detect.rope import export_values, find_rope
from longfx.rewrite.testing import handmade, zoo

ROPE_ZOO = [n for n, e in zoo.ZOO.items() if e.has_rope]
NO_ROPE_ZOO = [n for n, e in zoo.ZOO.items() if not e.has_rope]
BASES = {"gemma3": {10000.0, 1000000.0}}


def _good(sites):
    return [s for s in sites if s.rewritable]


def _check_layers_and_roles(site_list, layers):
    """One q and one k application per layer (a one-block model has no layer index)."""
    apps = [a for s in site_list for a in s.nodes["applications"]]
    expected = list(range(layers)) if layers > 1 else [None]
    assert sorted({a["layer"] for a in apps}, key=str) == expected
    for layer in expected:
        roles = sorted(a["role"] for a in apps if a["layer"] == layer)
        assert roles == ["k", "q"], (layer, roles)


@pytest.mark.parametrize("name", ROPE_ZOO)
def test_zoo_rope_found(name):
    entry = zoo.ZOO[name]
    gm, example = zoo.captured(name)[0]
    sites = find_rope(gm, example)
    good = _good(sites)
    assert len(sites) == len(good) == entry.rope_tables, [s.reason for s in sites]
    assert sum(s.facts["num_applications"] for s in good) == entry.rope_applications
    for s in good:
        assert s.facts["style"] == entry.rope_style
        assert s.facts["rotary_dim"] == entry.rotary_dim
        assert s.facts["head_dim"] == entry.head_dim
        assert s.facts["partial"] == (entry.rotary_dim < entry.head_dim)
        assert s.facts["attention_scaling"] == 1.0
        assert s.facts["table"] == "computed"
        inv = s.nodes["inv_freq"]
        assert inv is not None and inv.op == "placeholder" and "inv_freq" in inv.name
        assert G.op(s.nodes["cos"]) == "cos" and G.op(s.nodes["sin"]) == "sin"
        for app in s.nodes["applications"]:
            assert G.shape(app["input"]) == G.shape(app["output"])
            assert G.shape(app["input"])[-1] == entry.head_dim
    assert {s.facts["base"] for s in good} == BASES.get(name, {10000.0})
    _check_layers_and_roles(good, zoo.LAYERS)
    assert [s.index for s in sites] == list(range(len(sites)))


def test_gemma3_has_a_local_and_a_global_table():
    gm, example = zoo.captured("gemma3")[0]
    by_base = {s.facts["base"]: s for s in find_rope(gm, example)}
    assert by_base[10000.0].facts["layers"] == [0]         # sliding layer: local table
    assert by_base[1000000.0].facts["layers"] == [1]       # full layer: global table
    assert by_base[10000.0].nodes["inv_freq"] is not by_base[1000000.0].nodes["inv_freq"]


def test_base_needs_the_real_inv_freq():
    gm, _example = zoo.captured("llama")[0]
    (site,) = find_rope(gm)                     # no example inputs: placeholders are fake
    assert site.rewritable and site.facts["base"] is None


@pytest.mark.parametrize("name", NO_ROPE_ZOO)
def test_zoo_without_rope_has_no_sites(name):
    gm, example = zoo.captured(name)[0]
    assert find_rope(gm, example) == []


HANDMADE = ["sdpa_rope", "gptj_interleaved", "meta_complex", "rope_matmul_autocast",
            "rope_cached_gather", "rope_split_scaled"]


@pytest.mark.parametrize("name", HANDMADE)
def test_handmade_rope_found(name):
    case = handmade.CASES[name]
    model, ids = handmade.make(name)
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    sites = find_rope(gm, example)
    good = _good(sites)
    assert len(sites) == len(good) == case.rope_tables, [s.reason for s in sites]
    (site,) = good
    f = site.facts
    assert f["style"] == case.rope_style
    assert f["rotary_dim"] == case.rotary_dim and f["head_dim"] == case.head_dim
    assert f["num_applications"] == case.rope_applications
    assert f["table"] == case.rope_table
    assert f["attention_scaling"] == case.attention_scaling
    if case.rope_table == "computed":
        assert f["base"] == (500000.0 if name == "meta_complex" else 10000.0)
        assert site.nodes["inv_freq"].op == "placeholder"
    else:
        assert site.nodes["inv_freq"] is None and site.nodes["cos"].op == "placeholder"
    _check_layers_and_roles([site], case.rope_applications // 2)


def test_handmade_spellings():
    facts = {}
    for name in ("sdpa_rope", "gptj_interleaved", "meta_complex"):
        model, ids = handmade.make(name)
        gm, example = zoo.record_graphs(model, {"ids": ids})[0]
        (site,) = find_rope(gm, example)
        facts[name] = (site.spelling, site.facts["freq_form"], site.facts["widened_by"],
                       site.facts["num_tables"])
    assert facts["sdpa_rope"] == ("rotate_half:chunk", "outer", "cat", 2)   # recomputed per layer
    assert facts["gptj_interleaved"] == ("interleaved:strided", "einsum", "repeat_interleave", 1)
    assert facts["meta_complex"] == ("complex:view_as_complex", "outer", None, 1)


@pytest.mark.parametrize("name", ["near_miss", "rope_swapped", "rope_wrong_sign"])
def test_near_misses_have_reasons(name):
    case = handmade.CASES[name]
    model, ids = handmade.make(name)
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    sites = find_rope(gm, example)
    assert _good(sites) == []
    assert len(sites) == case.rope_near_misses
    for s in sites:
        assert not s.rewritable and s.reason
        assert s.to_dict()["reason"] == s.reason
    if name == "rope_swapped":
        assert all("swapped" in s.reason for s in sites)
    else:
        assert "no rotate-half" in sites[0].reason


def test_nanogpt_has_no_rope():
    model, ids = handmade.make("nanogpt")
    gm, example = zoo.record_graphs(model, {"ids": ids})[0]
    assert find_rope(gm, example) == []


# aten level ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_export():
    model, inputs = zoo.build("llama", "eager")
    return torch.export.export(model, (inputs["input_ids"],), {"use_cache": False},
                               strict=False)


def _check_export_site(sites, base, layers=2):
    (site,) = sites
    assert site.rewritable, site.reason
    f = site.facts
    assert (f["style"], f["rotary_dim"], f["head_dim"]) == ("rotate_half", 16, 16)
    assert f["num_applications"] == 2 * layers and f["base"] == base
    for app in site.nodes["applications"]:
        assert str(app["output"].target).startswith("aten.add")
    _check_layers_and_roles([site], layers)
    return site


def test_export_module_crosses_into_the_grad_wrapper(llama_export):
    gm = llama_export.module()
    site = _check_export_site(find_rope(gm), 10000.0)
    # The table is computed inside wrap_with_set_grad_enabled's submodule; inv_freq is the
    # caller's get_attr (what a frequency rewrite replaces), the table operands are outside.
    assert site.facts["table_graph"].startswith("submod")
    assert site.nodes["inv_freq"].op == "get_attr" and site.nodes["inv_freq"].graph is gm.graph
    for app in site.nodes["applications"]:
        assert app["cos"].graph is gm.graph and app["output"].graph is gm.graph


def test_export_graph_module_and_decomposed(llama_export):
    _check_export_site(find_rope(llama_export.graph_module), None)
    _check_export_site(find_rope(llama_export.graph_module, export_values(llama_export)), 10000.0)
    flat = llama_export.run_decompositions({})
    site = _check_export_site(find_rope(flat.graph_module, export_values(flat)), 10000.0)
    assert site.facts["table_graph"] == ""


@pytest.mark.parametrize("name", ["gptj_interleaved", "meta_complex", "rope_matmul_autocast",
                                  "rope_cached_gather"])
def test_export_handmade(name):
    case = handmade.CASES[name]
    model, ids = handmade.make(name)
    gm = torch.export.export(model, (ids,), strict=False).module()
    (site,) = find_rope(gm)
    assert site.rewritable, site.reason
    assert site.facts["style"] == case.rope_style
    assert site.facts["rotary_dim"] == case.rotary_dim
    assert site.facts["num_applications"] == case.rope_applications


def test_dynamic_shapes_runtime_scaling():
    model, inputs = zoo.build("llama", "sdpa")
    gm, example = zoo.record_graphs(model, inputs, dynamic=True)[0]
    (site,) = find_rope(gm, example)
    assert site.rewritable and site.facts["num_applications"] == 4
    # dynamic=True turns attention_scaling into a graph input: unknown value, node kept
    assert site.facts["attention_scaling"] is None and site.nodes["scaling"]
