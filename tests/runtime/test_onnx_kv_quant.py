"""export_onnx with ``kv_quant(...)``: the ONNX file carries the quantized state and computes
what the runtime's own cache computes.

The reference is the HF model run eagerly with the recipe's ``QuantizedCache`` (what
``longfx.compile`` gives a model; the compiled path is the reference for the composed recipe).
A left-padded batch of 2 goes through prefill chunks and decode steps that pack groups both
ways (a decode step packs the group it reads quantized, a chunk does not); logits must agree
within 1e-4 and the packed codes and scales must be the runtime's bytes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longfx.kernels.kv_quant import concat_state as C
from longfx.runtime.onnx_export import META_FILE, OnnxExportError
from longfx.runtime.ort import ORTModel, _positions

CASES = [
    ("llama", "kv_quant(bits=4, group=4, residual=8, sink=2)"),
    ("llama", "kv_quant(bits=2, group=4, residual=4, rotate=true, clip=true, key_bits=4, "
              "key_layers=(1,))"),
    ("gemma3", "kv_quant(bits=4, group=4, residual=4, scales=fp16, sink=0)"),   # sliding layers
]
CHUNKS = [5, 3] + [1] * 12 + [9] + [1] * 5


def _recipe(text):
    from longfx import recipes

    return recipes.parse(text).recipes[0]


def _run(model, ort_model, cache, chunks=CHUNKS, seed=0, b=2):
    """Both sides through the same steps; the worst relative logits error over real tokens and
    ORT's final state."""
    rng = np.random.default_rng(seed)
    vocab = int(ort_model.meta["model"]["vocab_size"])
    mask, state, worst = np.ones((b, 0), np.int64), ort_model.empty_state(b), 0.0
    for i, n in enumerate(chunks):
        ids = rng.integers(3, vocab, (b, n))
        new = np.ones((b, n), np.int64)
        if i == 0:
            new[1, :2] = 0                                        # row 1 is left-padded
        mask = np.concatenate([mask, new], 1)
        pos = _positions(mask)[:, -n:]
        got, state = ort_model.step(ids, mask, pos, state)
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(pos), past_key_values=cache,
                         use_cache=True).logits.numpy()
        real = mask[:, -n:] == 1
        worst = max(worst, float(np.abs(got - want)[real].max() / np.abs(want[real]).max()))
    return worst, state


@pytest.mark.parametrize("name,recipe", CASES, ids=[f"{n}-{r[:22]}" for n, r in CASES])
def test_kv_quant_export_equals_the_runtime_cache(zoo_export, record_property, name, recipe):
    model, exp = zoo_export(name, recipe)
    ort_model = ORTModel.from_dir(exp.path)
    r = _recipe(recipe)
    cache = r.make_cache(model)
    err, state = _run(model, ort_model, cache)
    record_property("max_rel_error", err)
    assert err <= 1e-4

    names = C.names(r.sink)
    checked = 0
    for i, layer in enumerate(cache.layers):
        if layer.window is not None:         # the runtime trims sliding layers, the export not
            continue
        for j, want in enumerate(C.from_layer(layer)):
            got = state[i * len(names) + j].numpy()
            assert got.shape == tuple(want.shape), (i, names[j])
            if want.dtype == torch.uint8:              # codes, u8 scales: the runtime's bytes
                same = float(np.mean(got == want.numpy()))
                assert same >= 0.999, (i, names[j], same)                  # (a rounding apart)
            elif want.dtype == torch.float16:          # fp16 scales: an fp16 rounding apart
                np.testing.assert_allclose(got.astype(np.float32), want.float().numpy(),
                                           rtol=2e-3, atol=1e-5)
            else:
                np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
            checked += 1
    assert checked and state[0].shape()[2] > 0                 # groups were packed

    # greedy tokens: onnxruntime's loop against HF generate with the recipe's cache
    ids = np.random.default_rng(3).integers(3, int(ort_model.meta["model"]["vocab_size"]), (2, 7))
    got = ort_model.generate(ids, max_new_tokens=24, eos_token_id=[])
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), max_new_tokens=24, do_sample=False,
                              past_key_values=r.make_cache(model), eos_token_id=None,
                              min_new_tokens=24, pad_token_id=0).numpy()
    np.testing.assert_array_equal(got, want)


def test_kv_quant_torch_graph_equals_onnx(zoo_export, parity):
    """The rewritten torch graph the export made (its run_torch) and the file agree, sizes the
    trace did not see included (P = 0, a chunk with nothing to pack)."""
    _, exp = zoo_export(*CASES[0])
    ort_model = ORTModel.from_dir(exp.path)
    b, rng = 2, np.random.default_rng(5)
    t_state, o_state = parity.torch_state(exp, b), ort_model.empty_state(b)
    mask = np.ones((b, 0), np.int64)
    for n in (2, 1, 6, 1, 1, 11, 1):
        ids = rng.integers(3, 100, (b, n))
        mask = np.concatenate([mask, np.ones((b, n), np.int64)], 1)
        pos = _positions(mask)[:, -n:]
        t_logits, t_state = parity.torch_step(exp, ids, mask, pos, t_state)
        o_logits, o_state = ort_model.step(ids, mask, pos, o_state)
        assert parity.rel(o_logits, t_logits) <= 1e-5
    for t, o in zip(t_state, o_state):
        assert tuple(t.shape) == tuple(o.shape())
        if t.dtype == torch.uint8:
            assert np.mean(o.numpy() == t.numpy()) >= 0.999


def test_torch_graph_ties_every_layers_sizes_to_layer_0s(zoo_export, parity):
    """The graph the re-export traces starts by asserting that each layer's state sizes are
    layer 0's (``_tie_state_sizes``): one assert per (layer, tensor, dim) after the first, and
    a state whose layers disagree is refused instead of read."""
    _, exp = zoo_export(*CASES[0])
    asserts = [n for n in exp.graph.graph.nodes
               if n.target is torch.ops.aten._assert_scalar.default
               and "differs from layer 0's" in str(n.args[1])]
    named = [d for layer in exp.meta["state"]["layers"] for t in layer["tensors"]
             for d in t["shape"] if isinstance(d, str)]                  # batch, packed, ...
    assert len(asserts) == len(named) - len(set(named)) > 0
    ids, mask = np.zeros((2, 3), np.int64), np.ones((2, 3), np.int64)
    state = parity.torch_state(exp, 2)
    state[len(C.names(2)) + 4] = torch.zeros(2, state[4].shape[1], 1, state[4].shape[3])
    with pytest.raises(RuntimeError, match="layer 1 k_tail: tail differs"):
        exp.run_torch(torch.from_numpy(ids), torch.from_numpy(mask),
                      torch.from_numpy(_positions(mask)), *state)


def test_kv_quant_composes_with_sink_window(zoo_export):
    """kv_quant + sink_window: the sparse mask and the quantized state in one file, against
    longfx.compile of the same recipe."""
    import longfx

    recipe = "sink_window(sink=2, window=6) + kv_quant(bits=4, group=4, residual=4)"
    model, exp = zoo_export("llama", recipe)
    assert any("sparse_attention" in row["op"] for row in exp.meta["attention"])
    fast = longfx.compile(model, recipe)
    cache = _recipe("kv_quant(bits=4, group=4, residual=4)").make_cache(model)
    err, _ = _run(fast, ORTModel.from_dir(exp.path), cache, chunks=[7, 1, 1, 5, 1, 1])
    assert err <= 1e-4


def test_no_packing_equals_the_dense_export(zoo_export, parity):
    """While every token fits the full-precision tail nothing is quantized: the quantized
    export is the dense one; once groups are packed it is not."""
    _, dense = zoo_export("llama", "")
    _, quant = zoo_export("llama", "kv_quant(bits=2, group=4, residual=8, sink=2)")
    ids = np.random.default_rng(2).integers(3, 100, (2, 20))
    a = ORTModel.from_dir(dense.path)(ids[:, :8])[0]
    b = ORTModel.from_dir(quant.path)(ids[:, :8])[0]
    assert parity.rel(b, a) <= 1e-5
    a_model, q_model = ORTModel.from_dir(dense.path), ORTModel.from_dir(quant.path)
    _, sa = a_model(ids[:, :14])
    _, sq = q_model(ids[:, :14])
    la, _ = a_model(ids[:, 14:], state=sa)     # a chunk after 14 tokens: 8 of them packed
    lq, _ = q_model(ids[:, 14:], state=sq)
    assert parity.rel(lq, la) > 1e-4


def test_meta_describes_the_quantized_state(zoo_export):
    _, exp = zoo_export(*CASES[1])
    meta = json.loads((exp.path / META_FILE).read_text())
    st = meta["state"]
    assert st["layout"] == "kv_quant" and "kv_quant(bits=2" in st["recipe"]
    assert [t["name"] for t in st["layers"][0]["tensors"]] == list(C.names(4))
    assert st["layers"][1]["config"]["key_bits"] == 4 and st["layers"][0]["config"]["key_bits"] == 2
    codes = {t["name"]: t for t in st["layers"][0]["tensors"]}
    assert codes["k_codes"]["dtype"] == "uint8" and codes["k_codes"]["shape"][2] == "packed"
    assert codes["k_params"]["shape"][2] == "packed_groups"
    assert codes["sink_k"]["empty_shape"] == ["batch", codes["sink_k"]["shape"][1], 4,
                                              codes["sink_k"]["shape"][3]]
    inputs = [i["name"] for i in meta["inputs"]]
    assert inputs[3:3 + 8] == [f"past.0.{n}" for n in C.names(4)]
    assert [o["name"] for o in meta["outputs"]][1:9] == [f"present.0.{n}" for n in C.names(4)]
    m = ORTModel.from_dir(exp.path)
    empty = m.empty_state(3)
    assert [tuple(e.shape()) for e in empty[:8]][6] == (3, codes["sink_k"]["shape"][1], 4,
                                                        codes["sink_k"]["shape"][3])
    assert m.past_length(empty) == 0
    _, state = m(np.zeros((1, 13), np.int64))
    assert m.past_length(state) == 13 and state[0].shape()[2] == 12     # 12 packed, 1 in the tail


def test_state_holds_exactly_the_runtime_bytes(zoo_export):
    """No spare capacity: the exported state's bytes are those of the runtime layer's tokens."""
    model, exp = zoo_export(*CASES[0])
    ort_model = ORTModel.from_dir(exp.path)
    r = _recipe(CASES[0][1])
    cache = r.make_cache(model)
    _, state = _run(model, ort_model, cache, chunks=[17, 1, 1, 1])
    got = sum(s.numpy().nbytes for s in state)
    want = sum(t.numel() * t.element_size() for layer in cache.layers
               for t in C.from_layer(layer))
    assert got == want


@pytest.mark.parametrize("recipe", ["gear(bits=4)", "snapkv(ratio=0.5) + kv_quant(bits=4)",
                                    "think(ratio=0.5)"])
def test_unexported_cache_recipes_are_clear_errors(tmp_path, recipe):
    from longfx.rewrite.testing import zoo
    from longfx.runtime.onnx_export import export_onnx

    model = zoo.build("llama", "sdpa")[0]
    dest = tmp_path / "out"
    with pytest.raises(OnnxExportError, match="no exported form"):
        export_onnx(model, dest, recipe)
    assert not dest.exists()


def test_slow_rewrite_rules_are_left_out_only_while_exporting():
    """``_without_rules`` takes SlicesSplit (quadratic in onnxscript 0.7.2) out of the
    optimizer's rule list and puts the list back afterwards, also after an error."""
    from onnxscript import rewriter

    from longfx.runtime.onnx_export import SLOW_RULES, _without_rules

    before = rewriter._DEFAULT_REWRITE_RULES
    names = [getattr(r, "name", None) for r in before]
    assert "SlicesSplit" in names
    with pytest.raises(RuntimeError):
        with _without_rules(SLOW_RULES):
            inside = [getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES]
            assert "SlicesSplit" not in inside
            assert len(inside) == len(names) - 1
            raise RuntimeError("export failed")
    assert rewriter._DEFAULT_REWRITE_RULES is before
