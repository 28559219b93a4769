"""KV-state sites on graphs from both capture ways.

Dynamo (torch level: a recording backend) for prefill (a fresh cache: ``torch.tensor([])`` +
``torch.cat``), decode with a ``DynamicCache`` passed in, and decode with transformers'
``StaticCache`` (``index_copy_`` into graph inputs; Gemma 3's sliding layer: ``roll`` +
``setitem``); export (aten level: :func:`capture_export`, dynamic and static caches). Then
hand-written modules for the other spellings (``index_put``/``setitem``, ``slice_scatter``,
``copy_`` into a slice, a [B, S, H, D] cache transposed before attention) and the near-misses.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from longfx.rewrite import graph as G
from longfx.rewrite.capture_export import capture_export
from longfx.rewrite.detect.attention import find_attention
from longfx.rewrite.detect.kv import find_kv
from longfx.rewrite.sites import AttentionSite, KVSite
from longfx.rewrite.testing import zoo

_MODELS: dict = {}


def model_of(name: str, impl: str):
    if (name, impl) not in _MODELS:
        _MODELS[name, impl] = zoo.build(name, attn_implementation=impl)
    return _MODELS[name, impl]


def dynamo_graph(fn, *args, dynamic=None, **kwargs) -> torch.fx.GraphModule:
    """The one graph Dynamo hands a recording backend for ``fn(*args, **kwargs)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    assert len(graphs) == 1
    return graphs[0]


def analyze(gm):
    attention = find_attention(gm)
    return attention, find_kv(gm, attention)


def check_hf_sites(attention, kv, *, static: bool, fresh: bool = False, layers: int = 2):
    """Key + value per layer, each linked to its own layer's attention site."""
    assert len(kv) == 2 * layers, [s.to_dict() for s in kv]
    by_layer = {a.layer: a for a in attention}
    for i, site in enumerate(kv):
        assert isinstance(site, KVSite)
        assert site.rewritable, site.reason
        assert site.index == i
        assert site.layer == i // 2
        assert site.module.endswith(f"layers.{i // 2}.self_attn")
        assert site.facts["role"] == ("key", "value")[i % 2]
        assert site.facts["axis"] == 2
        assert site.facts["static"] is static
        assert site.facts["fresh"] is fresh
        assert site.facts["attention"] == by_layer[i // 2].key
        for name in ("past", "new", "result"):
            assert isinstance(site.nodes[name], torch.fx.Node)
        if not static:
            assert G.op(site.nodes["result"]) == "cat"
    return kv


# ---------------------------------------------------------------- Dynamo (torch level)

DYNAMO_MODELS = [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa"),
                 ("gemma3", "eager"), ("mistral", "sdpa"), ("qwen2", "eager")]


@pytest.mark.parametrize("name,impl", DYNAMO_MODELS)
def test_dynamo_prefill_fresh_cache(name, impl):
    model, inputs = model_of(name, impl)
    gm = dynamo_graph(model, input_ids=inputs["input_ids"], use_cache=True)
    attention, kv = analyze(gm)
    check_hf_sites(attention, kv, static=False, fresh=True)
    for site in kv:   # the fresh DynamicLayer: torch.cat([torch.tensor([]), k], dim=-2)
        assert G.op(site.nodes["past"]) == "tensor"
        assert G.shape(site.nodes["past"]) == (0,)
    # RoPE's cat(freqs, freqs) and rotate-half's cat(-x2, x1) are in the graph, not reported
    cats = [n for n in gm.graph.nodes if G.op(n) == "cat"]
    assert len(cats) > len(kv)


@pytest.mark.parametrize("name,impl", DYNAMO_MODELS)
def test_dynamo_decode_dynamic_cache(name, impl):
    model, inputs = model_of(name, impl)
    ids = inputs["input_ids"]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    gm = dynamo_graph(model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    attention, kv = analyze(gm)
    check_hf_sites(attention, kv, static=False)
    for site in kv:
        assert site.nodes["past"].op == "placeholder"
        assert site.nodes["state"] is site.nodes["past"]
        assert G.shape(site.nodes["result"])[2] == ids.shape[1] + 1


def test_dynamo_decode_symbolic_shapes():
    model, inputs = model_of("llama", "sdpa")
    ids = inputs["input_ids"]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    gm = dynamo_graph(model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True,
                      dynamic=True)
    attention, kv = analyze(gm)
    check_hf_sites(attention, kv, static=False)
    assert not G.shape(kv[0].nodes["result"])[2].node.is_constant()  # past + 1, symbolic


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("llama", "eager"),
                                       ("gemma3", "sdpa")])
def test_dynamo_decode_static_cache(name, impl):
    model, inputs = model_of(name, impl)
    ids = inputs["input_ids"]                      # 11 tokens: past Gemma 3's window of 4
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    gm = dynamo_graph(model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    attention, kv = analyze(gm)
    check_hf_sites(attention, kv, static=True)
    for site in kv:
        assert site.nodes["state"].op == "placeholder"
        # in place: attention reads the graph input itself after the write
        assert site.nodes["result"] is site.nodes["state"]
        assert G.raw_name(site.nodes["write"]) in ("index_copy_", "setitem")
        assert "index" in site.nodes
    if name == "gemma3":    # sliding layer, full: roll by one and write the last slot
        assert [s.spelling for s in kv] == ["setitem", "setitem", "index_copy_", "index_copy_"]
        assert [s.facts["rolled"] for s in kv] == [True, True, False, False]


# ---------------------------------------------------------------- export (aten level)

EXPORTS = [("llama", "sdpa", "decode", "dynamic"), ("llama", "sdpa", "decode", "static"),
           ("llama", "eager", "prefill", "dynamic"), ("llama", "eager", "decode", "static"),
           ("gemma3", "sdpa", "prefill", "static"), ("gemma3", "eager", "decode", "dynamic")]


@pytest.mark.parametrize("name,impl,mode,cache", EXPORTS)
def test_export(name, impl, mode, cache):
    model, _ = model_of(name, impl)
    cap = capture_export(model, mode=mode, cache=cache, max_cache_len=32, check=False)
    attention, kv = analyze(cap.gm)
    static = cache == "static"
    check_hf_sites(attention, kv, static=static, fresh=mode == "prefill" and not static)
    for site in kv:
        layer, role = site.layer, site.facts["role"]
        # what attention reads is what the program returns as the present state
        assert site.nodes["result"] is cap.output_node(f"present.{layer}.{role}")
        if static:
            assert site.spelling == "index_copy_"
            assert site.nodes["past"] is cap.input_node(f"past.{layer}.{role}")
            assert site.nodes["write"] is site.nodes["result"]
        elif mode == "decode":
            assert site.nodes["past"] is cap.input_node(f"past.{layer}.{role}")
        else:   # a lifted empty constant read through lift_fresh_copy / detach_
            assert site.nodes["state"].op == "placeholder"
            assert G.shape(site.nodes["past"]) == (0,)


def test_export_decomposed_static_is_index_put():
    model, _ = model_of("llama", "sdpa")
    cap = capture_export(model, mode="decode", cache="static", max_cache_len=32, check=False)
    gm = cap.program.run_decompositions().graph_module
    kv = find_kv(gm, find_attention(gm))
    assert [s.spelling for s in kv] == ["index_put"] * 4
    assert all(s.facts["axis"] == 2 and s.facts["static"] for s in kv)
    assert all(s.nodes["past"].op == "placeholder" for s in kv)


def test_handmade_attention_sites_link():
    """Linking only needs AttentionSite records with the right k/v nodes."""
    model, _ = model_of("llama", "sdpa")
    cap = capture_export(model, mode="decode", cache="dynamic", check=False)
    sdpas = [n for n in cap.gm.graph.nodes if G.op(n) == "sdpa"]
    sites = []
    for i, node in enumerate(sdpas):     # k/v straight from the call (after repeat_kv)
        site = AttentionSite(index=i)
        site.nodes.update(q=node.args[0], k=node.args[1], v=node.args[2], output=node)
        sites.append(site)
    kv = find_kv(cap.gm, sites)
    assert [(s.facts["role"], s.facts["attention"]) for s in kv] == [
        ("key", "attention[0]"), ("value", "attention[0]"),
        ("key", "attention[1]"), ("value", "attention[1]")]
    assert all(s.rewritable for s in kv)
    # and with no attention sites at all, every append is a near-miss
    kv = find_kv(cap.gm, [])
    assert len(kv) == 4 and not any(s.rewritable for s in kv)
    assert all("feed no attention" in s.reason for s in kv)


# ---------------------------------------------------------------- hand-written spellings

H, D, S, SMAX, START = 2, 8, 3, 16, 4


class OneLayer(nn.Module):
    """q/k/v projections, a KV state spelled ``style``, attention."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(H * D, H * D) for _ in range(3))
        shape = (1, SMAX, H, D) if style == "bshd" else (1, H, SMAX, D)
        self.register_buffer("k_cache", torch.randn(shape))
        self.register_buffer("v_cache", torch.randn(shape))

    def forward(self, x, past_k, past_v, pos):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, H, D).transpose(1, 2)        # [B, H, S, D]
        k = self.k(x).view(b, s, H, D)
        v = self.v(x).view(b, s, H, D)
        if self.style == "bshd":                              # Meta llama: [B, Smax, H, D]
            self.k_cache[:b, START:START + s] = k
            self.v_cache[:b, START:START + s] = v
            keys = self.k_cache[:b, :START + s].transpose(1, 2)
            values = self.v_cache[:b, :START + s].transpose(1, 2)
            w = torch.matmul(q, keys.transpose(2, 3)) / D ** 0.5
            return torch.matmul(F.softmax(w, dim=-1), values)
        k, v = k.transpose(1, 2), v.transpose(1, 2)           # [B, H, S, D]
        if self.style == "cat":
            keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        elif self.style == "cat_heads":                       # near-miss: the head axis
            keys, values = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
            q = torch.cat([q, q], dim=1)
        elif self.style == "cat_unused":                      # near-miss: not read
            keys, values = k, v
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
            return out, torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        elif self.style == "setitem":                         # index_put_ at aten level
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
            keys, values = self.k_cache, self.v_cache
        elif self.style == "index_copy":
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            keys, values = self.k_cache, self.v_cache
        elif self.style == "slice_scatter":                   # functional
            keys = torch.slice_scatter(self.k_cache, k, dim=2, start=START, end=START + s)
            values = torch.slice_scatter(self.v_cache, v, dim=2, start=START, end=START + s)
        elif self.style == "copy_":
            self.k_cache[:, :, START:START + s].copy_(k)
            self.v_cache[:, :, START:START + s].copy_(v)
            keys, values = self.k_cache, self.v_cache
        return F.scaled_dot_product_attention(q, keys, values)


def handmade_graphs(style: str):
    """(level, graph) for Dynamo and export of OneLayer(style)."""
    x = torch.randn(1, S, H * D)
    past = torch.randn(1, H, S, D), torch.randn(1, H, S, D)
    pos = torch.arange(START, START + S)
    yield "dynamo", dynamo_graph(OneLayer(style), x, *past, pos)
    with torch.no_grad():
        ep = torch.export.export(OneLayer(style), (x, *past, pos), strict=False)
    yield "export", ep.graph_module


GOOD = {"cat": ("cat", False, 2), "bshd": (None, True, 1), "setitem": (None, True, 2),
        "index_copy": ("index_copy_", True, 2), "slice_scatter": ("slice_scatter", True, 2),
        "copy_": ("copy_", True, 2)}


@pytest.mark.parametrize("style", list(GOOD))
def test_handmade_spellings(style):
    spelling, static, axis = GOOD[style]
    for level, gm in handmade_graphs(style):
        attention, kv = analyze(gm)
        assert len(attention) == 1
        assert len(kv) == 2, (level, [s.to_dict() for s in kv])
        for site, role in zip(kv, ("key", "value")):
            assert site.rewritable, (level, site.reason)
            assert site.facts["role"] == role
            assert site.facts["attention"] == "attention[0]"
            assert site.facts["static"] is static
            assert site.facts["axis"] == axis
            if spelling:
                assert site.spelling == spelling
            if static:
                assert site.nodes["state"].op in ("placeholder", "get_attr")
        if style in ("bshd", "setitem"):
            want = {"dynamo": "setitem", "export": {"bshd": "copy_",
                                                   "setitem": "index_put_"}[style]}[level]
            assert {s.spelling for s in kv} == {want}


def test_near_miss_head_axis():
    for level, gm in handmade_graphs("cat_heads"):
        attention, kv = analyze(gm)
        assert len(kv) == 2, level            # q's cat([q, q], 1) has no state: not reported
        for site in kv:
            assert not site.rewritable
            assert site.facts["axis"] == 1
            assert "axis 1" in site.reason and "sequence" in site.reason
            assert site.facts["attention"] == "attention[0]"


def test_near_miss_not_read_by_attention():
    for level, gm in handmade_graphs("cat_unused"):
        attention, kv = analyze(gm)
        assert len(kv) == 2, level
        for site in kv:
            assert not site.rewritable
            assert "feed no attention site" in site.reason
            assert site.facts["attention"] is None


def test_sites_serialize():
    _, gm = next(handmade_graphs("index_copy"))
    _, kv = analyze(gm)
    d = kv[0].to_dict()
    assert d["key"] == "kv[0]" and d["kind"] == "kv" and d["role"] == "key"
    assert d["static"] is True and d["axis"] == 2 and isinstance(d["state"], str)
