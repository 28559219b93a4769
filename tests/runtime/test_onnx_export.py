"""export_onnx: the ONNX file computes what the rewritten torch graph computes.

For each (zoo model, recipe): a left-padded batch of 2 is prefilled with an empty past (the
one graph at P = 0), then a chunk of 3 tokens, then single-token decode steps, in onnxruntime
and in the rewritten torch graph, each carrying its own KV state: logits and final state
within 1e-4 relative (fp32). Then 64 greedy tokens must be identical. Sequences run past the
windows of the sparse recipes and of the models' own sliding layers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longfx.runtime.onnx_export import META_FILE, OnnxExportError
from longfx.runtime.ort import ORTModel

CASES = [
    ("llama", "", "sdpa"),
    ("llama", "yarn(factor=2)", "sdpa"),
    ("llama", "extend(to=64, original=8)", "sdpa"),         # dynamic: keys re-rotated per call
    ("llama", "dynamic_ntk(factor=4, original=8)", "sdpa"),
    ("llama", "sliding_window(window=5)", "sdpa"),
    ("llama", "sink_window(sink=2, window=5)", "sdpa"),
    ("llama", "rope_cap(max_distance=6, sink=2)", "sdpa"),
    ("mistral", "", "sdpa"),                    # its own sliding window (4) is in the mask
    ("qwen3", "", "sdpa"),
    ("gemma2", "", "eager"),                    # softcap, local + global layers
    ("gemma3", "sink_window(sink=2, window=6)", "sdpa"),
    ("phi3", "", "sdpa"),                       # partial rotary
]


def _batch(vocab: int, length: int = 13, pad: int = 2):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :pad] = 0                           # row 1 is left-padded
    return ids, mask


@pytest.mark.parametrize("name,recipe,attn", CASES, ids=[f"{n}-{r or 'dense'}" for n, r, _ in CASES])
def test_zoo_parity(zoo_export, parity, record_property, name, recipe, attn):
    model, exp = zoo_export(name, recipe, attn)
    ort_model = ORTModel.from_dir(exp.path)
    ids, mask = _batch(ort_model.meta["model"]["vocab_size"])
    err = parity.compare_steps(exp, ort_model, ids, mask, chunk=3, decode=4)
    record_property("max_rel_error", err)
    record_property("export_s", round(exp.timings["total_s"], 1))
    assert err <= 1e-4
    want = parity.torch_greedy(exp, ids, mask, 64)
    got = ort_model.generate(ids, max_new_tokens=64, attention_mask=mask, eos_token_id=[])
    np.testing.assert_array_equal(got, want)


def test_gqa_keys_reach_attention_unrepeated(zoo_export):
    """HF's repeat_kv (expand + reshape, with the whole-axis slices torch.export adds) is
    stripped: the Attention nodes read the KV heads themselves, and no Expand copies them
    per query head (it was most of a SmolLM2 decode step's layer time in onnxruntime)."""
    import onnx

    model, exp = zoo_export("llama", "")
    hkv = model.config.num_key_value_heads
    assert hkv < model.config.num_attention_heads
    ops = [n for n in exp.graph.graph.nodes if "longfx.attention" in str(n.target)]
    assert ops and all(n.args[1].meta["val"].shape[1] == hkv for n in ops)
    graph = onnx.load(str(exp.onnx_path), load_external_data=False).graph
    made_by = {out: n for n in graph.node for out in n.output}

    def ops_above(name: str, depth: int = 3) -> list[str]:
        n = made_by.get(name)
        if n is None or depth == 0:
            return []
        return [n.op_type] + [t for i in n.input[:1] for t in ops_above(i, depth - 1)]

    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention
    for n in attention:
        for kv in n.input[1:3]:
            assert "Expand" not in ops_above(kv), (n.name, ops_above(kv))


@pytest.mark.parametrize("name,attn", [("mistral", "sdpa"), ("gemma2", "eager")])
def test_sliding_layers_hold_only_their_window(zoo_export, parity, name, attn):
    """A sliding layer's state stops growing at window − 1 tokens, as transformers' own
    ``DynamicSlidingWindowLayer`` keeps it, and the file's logits are the model's with its own
    cache: prefill, a chunk and decode steps past the window (4), left-padded batch."""
    from transformers import DynamicCache

    model, exp = zoo_export(name, "", attn)
    ort_model = ORTModel.from_dir(exp.path)
    windows = [layer["window"] for layer in ort_model.meta["state"]["layers"]]
    assert windows[0] == model.config.sliding_window == 4
    ids, mask = _batch(ort_model.meta["model"]["vocab_size"], length=11)
    cache, state = DynamicCache(config=model.config), ort_model.empty_state(2)
    worst, seen = 0.0, 0
    for n in (5, 3, 1, 1, 1):
        step, seen = ids[:, seen:seen + n], seen + n
        pos = parity.positions(mask[:, :seen])[:, -n:]
        logits, state = ort_model.step(step, mask[:, :seen], pos, state)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(step), attention_mask=torch.from_numpy(
                mask[:, :seen]), position_ids=torch.from_numpy(pos), past_key_values=cache,
                use_cache=True).logits.numpy()
        real = mask[:, seen - n:seen] == 1
        worst = max(worst, parity.rel(logits[real], ref[real]))
        for i, w in enumerate(windows):
            held = state[2 * i].shape()[2]
            assert held == (min(seen, w - 1) if w else seen), (i, seen, held)
    assert worst <= 1e-4
    if all(windows):        # no layer holds the count of tokens seen: the mask must be given
        with pytest.raises(ValueError, match="attention_mask"):
            ort_model(ids[:, :1], state=state)


def test_recipe_is_in_the_graph(zoo_export, parity):
    """The sparse export is not the dense one: past the window the logits move."""
    _, dense = zoo_export("llama", "")
    _, sparse = zoo_export("llama", "sink_window(sink=2, window=5)")
    ids, mask = _batch(128, length=13, pad=0)
    a = ORTModel.from_dir(dense.path)(ids, mask)[0]
    b = ORTModel.from_dir(sparse.path)(ids, mask)[0]
    assert parity.rel(a[:, :5], b[:, :5]) <= 1e-5          # inside the window: same
    assert parity.rel(a[:, 8:], b[:, 8:]) > 1e-3           # beyond it: sinks + window only


def test_dynamic_rope_is_in_the_graph(zoo_export, parity):
    """extend (dynamic YaRN, keys re-rotated per call): a call up to L₀/2 positions is the
    dense model; a longer call is not (its scale is computed in the ONNX graph from the
    position ids)."""
    _, dense = zoo_export("llama", "")
    _, ext = zoo_export("llama", "extend(to=64, original=8)")
    sites = [s for s in ext.report.sites if s.kind == "attention"]
    assert sites and all("dynamic_rope" in s.facts for s in sites)
    ids, mask = _batch(128, length=13, pad=0)
    short = (ids[:, :4], mask[:, :4])
    a, b = (ORTModel.from_dir(e.path)(*short)[0] for e in (dense, ext))
    assert parity.rel(a, b) <= 1e-5                         # s = 1 up to L₀/2 = 4 tokens
    a, b = (ORTModel.from_dir(e.path)(ids, mask)[0] for e in (dense, ext))
    assert parity.rel(a, b) > 1e-3


def test_decomposed_target(zoo_export, parity):
    _, exp = zoo_export("llama", "sink_window(sink=2, window=5)", target="decomposed")
    ort_model = ORTModel.from_dir(exp.path)
    types = {n.op_type for n in __import__("onnx").load(str(exp.onnx_path)).graph.node}
    assert "Attention" not in types
    ids, mask = _batch(128)
    assert parity.compare_steps(exp, ort_model, ids, mask) <= 1e-4


def test_meta_describes_the_state(zoo_export):
    model, exp = zoo_export("gemma3", "sink_window(sink=2, window=6)")
    meta = json.loads((exp.path / META_FILE).read_text())
    assert meta["format"] == "longfx-onnx/1" and meta["opset"] == 23
    assert meta["recipe"] == "sink_window(sink=2, window=6)"
    names = [i["name"] for i in meta["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:7] == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert [o["name"] for o in meta["outputs"]][:2] == ["logits", "present.0.key"]
    local, full = meta["state"]["layers"][:2]
    hkv, d = model.config.num_key_value_heads, model.config.head_dim
    # the local layer holds its window (4 here) less one; the global one every token seen
    assert (local["window"], full["window"]) == (model.config.sliding_window, None)
    assert local["key"]["shape"] == ["batch", hkv, "window_past", d]
    assert full["key"]["shape"] == ["batch", hkv, "past", d]
    assert full["key"]["dtype"] == "float32"
    assert meta["state"]["length"] == [{"input": "past.1.key", "axis": 2}]
    # Gemma 3's local layer keeps its own window (narrower than... equal here) and no sinks;
    # the global layer takes the recipe's sinks + window.
    assert [(a["layer"], a["sink"], a["window"]) for a in meta["attention"]] == \
        [(0, 0, 4), (1, 2, 6)]
    assert meta["check"]["max_rel_logits_error"] <= 1e-4
    # the ONNX file's own dims carry the same names
    import onnx

    g = onnx.load(str(exp.onnx_path), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in [*g.input, *g.output]}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "past_seq"]
    assert dims["past.1.value"][2] == "past" and dims["present.1.value"][2] == "past_seq"
    assert dims["past.0.value"][2] == "window_past"


def test_missing_translation_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    from longfx.rewrite.testing import zoo
    from longfx.runtime import onnx_export

    real = onnx_export.translation_table

    def without_rope(target="opset23"):
        table = real(target)
        del table[torch.ops.longfx.rope.default]
        return table

    monkeypatch.setattr(onnx_export, "translation_table", without_rope)
    model, _ = zoo.build("llama", "sdpa")
    with pytest.raises(OnnxExportError, match="longfx.rope"):
        onnx_export.export_onnx(model, tmp_path / "out", "", check=False)
    assert list(tmp_path.iterdir()) == []


def test_not_a_causal_lm_is_a_clear_error(tmp_path):
    from longfx.runtime.onnx_export import export_onnx

    with pytest.raises(OnnxExportError, match="not a transformers"):
        export_onnx(torch.nn.Linear(4, 4), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ SmolLM2


def _long_batch(tok, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    text = ("The history of the Roman Empire spans many centuries, from the founding of the "
            "city to the fall of Constantinople. ") * 12
    ids = tok(text, return_tensors="np")["input_ids"][:, :n].astype(np.int64)
    ids = np.concatenate([ids, ids[:, ::-1]], 0)
    mask = np.ones_like(ids)
    mask[1, :7] = 0                                        # row 1 left-padded
    return ids, mask


@pytest.mark.slow
def test_smollm2_logits_parity(smollm2, smollm2_export, parity, record_property):
    """SmolLM2-135M with sink_window(sink=4, window=128): a 200-token prompt (past the window),
    a chunk and decode steps, ORT vs the rewritten graph; and inside the window the file is
    the dense model (HF logits)."""
    model, tok = smollm2
    ids, mask = _long_batch(tok)
    ort_model = ORTModel.from_dir(smollm2_export.path)
    err = parity.compare_steps(smollm2_export, ort_model, ids, mask, decode=3)
    record_property("max_rel_error", err)
    record_property("export_timings_s", smollm2_export.timings)
    assert err <= 1e-4
    got = ort_model(ids[:1])[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[:1])).logits.numpy()
    w = parity.smol_window
    record_property("max_rel_error_vs_hf_inside_window", parity.rel(got[:, :w], ref[:, :w]))
    assert parity.rel(got[:, :w], ref[:, :w]) <= 1e-4      # the spec keeps every causal key
    assert parity.rel(got[:, w + 20:], ref[:, w + 20:]) > 1e-3   # past it, sinks + window


@pytest.mark.slow
def test_smollm2_sparse_greedy_equals_rewritten_graph(smollm2, smollm2_export, parity):
    """64 greedy tokens after a 200-token prompt (past the window of 128): identical."""
    _, tok = smollm2
    ids, mask = _long_batch(tok)
    got = ORTModel.from_dir(smollm2_export.path).generate(ids, max_new_tokens=64,
                                                          attention_mask=mask, eos_token_id=[])
    want = parity.torch_greedy(smollm2_export, ids, mask, 64)
    np.testing.assert_array_equal(got, want)
