"""Export capture: the exported, state-explicit program equals the eager model.

Tiny random-weight Llama (2 layers, hidden 64, 4 heads, 2 KV heads) and Gemma 3 (layer 0
sliding with window 4, layer 1 full) from the zoo; eager and sdpa attention; prefill and decode;
dynamic and static cache. Runs use other sizes than the trace (batch 2, 5 new tokens, 6 past
tokens), so the dynamic dims are exercised too. fp32, <= 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from longfx.rewrite.capture_export import CaptureError, ExportCapture, capture_export
from longfx.rewrite.testing import zoo

B, S, P, M = 2, 5, 6, 32       # run sizes (the trace uses batch 2, 8 new / 8 past tokens)
TOL = 1e-5

_MODELS: dict = {}
_CAPS: dict = {}


def model_of(name: str, impl: str):
    if (name, impl) not in _MODELS:
        _MODELS[name, impl] = zoo.build(name, attn_implementation=impl)[0]
    return _MODELS[name, impl]


def capture(name: str, impl: str, mode: str, cache: str) -> ExportCapture:
    key = (name, impl, mode, cache)
    if key not in _CAPS:
        _CAPS[key] = capture_export(model_of(name, impl), mode=mode, cache=cache,
                                    max_cache_len=M)
    return _CAPS[key]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def kv_of(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        out += [layer.keys.clone(), layer.values.clone()]
    return out


def ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, zoo.VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def in_buffers(kv: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """Static buffers of length M holding ``kv`` in their first ``length`` slots."""
    out = []
    for t in kv:
        buf = torch.zeros(*t.shape[:2], M, t.shape[-1], dtype=t.dtype)
        buf[:, :, :length] = t[:, :, :length]
        out.append(buf)
    return out


MODELS = [("llama", "eager"), ("llama", "sdpa"), ("gemma3", "eager"), ("gemma3", "sdpa")]


@pytest.mark.parametrize("name,impl", MODELS)
def test_prefill_matches_eager(name, impl):
    model = model_of(name, impl)
    x = ids(B, S, 1)
    mask = torch.ones(B, S, dtype=torch.long)
    with torch.no_grad():
        c = DynamicCache()
        ref = model(input_ids=x, attention_mask=mask, past_key_values=c, use_cache=True)
        native = model(input_ids=x, attention_mask=mask, use_cache=True).logits  # HF's own cache
        sc = StaticCache(config=model.config, max_cache_len=M)
        native_static = model(input_ids=x, past_key_values=sc, use_cache=True).logits
    present = kv_of(c)

    dyn = capture(name, impl, "prefill", "dynamic")
    pos = torch.arange(S).expand(B, S)
    out = dyn.run(x, mask, pos)
    assert rel(out[0], ref.logits) <= TOL
    assert rel(out[0], native) <= TOL
    for got, want in zip(out[1:], present):
        assert rel(got, want) <= TOL

    st = capture(name, impl, "prefill", "static")
    bufs = in_buffers([torch.zeros_like(t) for t in present], 0)
    out = st.run(x, torch.ones(B, M, dtype=torch.long), torch.arange(S), *bufs)
    assert rel(out[0], ref.logits) <= TOL
    assert rel(out[0], native_static) <= TOL
    for got, want, buf in zip(out[1:], in_buffers(present, S), bufs):
        assert rel(got, want) <= TOL
        assert rel(buf, want) <= TOL            # written in place as well


@pytest.mark.parametrize("name,impl", MODELS)
def test_decode_matches_eager(name, impl):
    model = model_of(name, impl)
    prefix, tok = ids(B, P, 2), ids(B, 1, 3)
    with torch.no_grad():
        c = DynamicCache()
        model(input_ids=prefix, past_key_values=c, use_cache=True)
        past = kv_of(c)
        ref = model(input_ids=tok, attention_mask=torch.ones(B, P + 1, dtype=torch.long),
                    past_key_values=c, use_cache=True)
        present = kv_of(c)
        # transformers' own pipelines: default (sliding layers trimmed) and static caches
        native = model(input_ids=prefix, use_cache=True).past_key_values
        native = model(input_ids=tok, past_key_values=native, use_cache=True).logits
        sc = StaticCache(config=model.config, max_cache_len=M)
        model(input_ids=prefix, past_key_values=sc, use_cache=True)
        native_static = model(input_ids=tok, past_key_values=sc, use_cache=True).logits

    dyn = capture(name, impl, "decode", "dynamic")
    out = dyn.run(tok, torch.ones(B, P + 1, dtype=torch.long), torch.full((B, 1), P), *past)
    assert rel(out[0], ref.logits) <= TOL
    assert rel(out[0], native) <= TOL
    for got, want in zip(out[1:], present):
        assert rel(got, want) <= TOL

    st = capture(name, impl, "decode", "static")
    bufs = in_buffers(past, P)
    out = st.run(tok, torch.ones(B, M, dtype=torch.long), torch.tensor([P]), *bufs)
    assert rel(out[0], ref.logits) <= TOL
    assert rel(out[0], native_static) <= TOL
    for got, want in zip(out[1:], in_buffers(present, P + 1)):
        assert rel(got, want) <= TOL


def test_names_dims_and_meta():
    cap = capture("llama", "sdpa", "decode", "dynamic")
    assert cap.input_names == ["input_ids", "attention_mask", "position_ids", "past.0.key",
                               "past.0.value", "past.1.key", "past.1.value"]
    assert cap.output_names == ["logits", "present.0.key", "present.0.value",
                                "present.1.key", "present.1.value"]
    assert [n.name for n in cap.user_input_nodes()] == [
        "input_ids", "attention_mask", "position_ids", "past_0_key", "past_0_value",
        "past_1_key", "past_1_value"]
    assert cap.dynamic_dims["past.0.key"] == {0: "batch", 2: "past"}
    assert cap.dynamic_dims["attention_mask"] == {0: "batch", 1: "past+1"}
    assert cap.dynamic_dims["input_ids"] == {0: "batch"}
    # one symbol for the batch and one for the past length, shared by every input
    past_shapes = {tuple(map(str, cap.input_node(f"past.{i}.{r}").meta["val"].shape))
                   for i in range(2) for r in ("key", "value")}
    assert len(past_shapes) == 1
    (b, h, p, d), = past_shapes
    assert (h, d) == ("2", "16") and not b.isdigit() and not p.isdigit()
    assert str(cap.input_node("attention_mask").meta["val"].shape[1]) == f"{p} + 1"
    assert str(cap.output_node("present.1.value").meta["val"].shape[2]) == f"{p} + 1"
    assert cap.gm is cap.program.graph_module
    stacks = [n.meta.get("nn_module_stack") for n in cap.gm.graph.nodes
              if n.op == "call_function"]
    paths = {list(s.values())[-1][0] for s in stacks if s}
    assert "model.layers.1.self_attn" in paths      # the model's own module paths
    # example inputs are at the requested sizes (batch 1), the trace was at batch 2
    assert cap.example_inputs[0].shape == (1, 1)
    assert cap.example_inputs[3].shape == (1, 2, 8, 16)
    out = cap.run()
    assert out[1].shape == (1, 2, 9, 16)


def test_static_dims_and_inplace():
    cap = capture("llama", "sdpa", "prefill", "static")
    assert cap.input_names[2] == "cache_position"
    assert cap.dynamic_dims["cache_position"] == {0: "seq"}
    assert cap.dynamic_dims["past.1.value"] == {0: "batch"}
    assert cap.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
    assert cap.input_node("past.0.key").meta["val"].shape[2] == M
    inputs = [x.clone() for x in cap.example_inputs]
    before = inputs[3].clone()
    out = cap.run(*inputs)
    assert not torch.equal(before, inputs[3])
    assert torch.equal(out[1], inputs[3])


def test_static_shapes_when_not_dynamic():
    model = model_of("llama", "sdpa")
    cap = capture_export(model, mode="decode", cache="dynamic", batch=1, past_len=4,
                         dynamic=False)
    assert cap.dynamic_dims == {}
    assert tuple(cap.input_node("past.0.key").meta["val"].shape) == (1, 2, 4, 16)
    assert not cap.program.range_constraints



def test_data_dependent_branch_raises():
    from transformers import LlamaForCausalLM

    class Branchy(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            if input_ids.max() > zoo.VOCAB // 2:        # data-dependent
                input_ids = input_ids % (zoo.VOCAB // 2)
            return super().forward(input_ids=input_ids, **kwargs)

    model = Branchy(zoo.config("llama", "sdpa")).eval()
    with pytest.raises(CaptureError, match="data-dependent"):
        capture_export(model, mode="prefill", cache="dynamic")


def test_not_a_causal_lm_raises():
    with pytest.raises(CaptureError, match="not a transformers"):
        capture_export(torch.nn.Linear(4, 4))
    bert, _ = zoo.build("bert")
    with pytest.raises(CaptureError, match="no logits"):
        capture_export(bert)
    t5, _ = zoo.build("t5")          # encoder-decoder: the probe forward itself fails
    with pytest.raises(CaptureError, match="KV layout is unknown"):
        capture_export(t5)


def test_bad_arguments():
    model = model_of("llama", "sdpa")
    with pytest.raises(ValueError):
        capture_export(model, mode="train")
    with pytest.raises(ValueError):
        capture_export(model, mode="decode", cache="static", past_len=70, max_cache_len=64)
