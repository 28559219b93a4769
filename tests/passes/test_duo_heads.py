"""duo_heads on the zoo Llama (2 layers, 4 query heads over 2 KV heads): streaming=1 is
sink_window, a covering window and streaming=0 are exact, mixed sites equal a per-head
emulation written against transformers' attention interface (prefill and chunked through the
cache), calibration ranks heads by what they lose, the JSON round-trips and is refused for
another model, bad arguments raise RecipeError."""
import json

import pytest
import torch

import longfx
import longfx.passes.duo_heads as D
from longfx import recipes
from longfx.kernels.sparse_attention import reference as R
from longfx.recipes import RecipeError
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

# layer 0 streams KV head 1, layer 1 streams KV head 0 (scores: lower streams first)
MIXED = {0: [1], 1: [0]}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _calibration(model, path, stream=MIXED, sink=2, window=4):
    """A hand-written calibration file whose 50% ranking streams the heads of ``stream``."""
    sites = {}
    for layer, heads in stream.items():
        scores = [0.1 + 0.01 * h if h in heads else 0.9 for h in range(2)]
        sites[f"attention[{layer}]"] = {"layer": layer, "num_heads": 4, "num_kv_heads": 2,
                                        "head_dim": 16, "scores": scores, "streaming": heads}
    calib = {"format": D.FORMAT, "model": D.model_identity(model), "sink": sink,
             "window": window, "streaming": 0.5, "sites": sites}
    D.save_calibration(calib, path)
    return str(path)


@pytest.fixture(scope="module")
def llama():
    model, inputs = zoo.build("llama", "eager")
    return model, inputs["input_ids"]


def _emulation(model, stream, sink, window):
    """The same model through transformers' attention interface, each query head masked by
    its KV head's spec (reference.visible); the rewrite is not involved."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attend(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        h, hkv, s, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        qp, kp = R.positions(s, skv)
        heads = stream.get(module.layer_idx, [])
        keep = torch.stack([R.visible(qp, kp, sink, window) if i // (h // hkv) in heads
                            else R.visible(qp, kp, 0, 0) for i in range(h)])  # [H, S, Skv]
        kk, vv = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        scores = (q @ kk.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ vv).transpose(1, 2).contiguous(), None

    AttentionInterface.register("longfx_duo_emulation", attend)
    return "longfx_duo_emulation", ALL_ATTENTION_FUNCTIONS


def test_streaming_one_is_sink_window_and_zero_is_dense(llama):
    model, ids = llama
    dense = _logits(model, ids)
    one = longfx.compile(model, "duo_heads(streaming=1.0, sink=2, window=4)")
    sw = longfx.compile(model, "sink_window(sink=2, window=4)")
    assert torch.equal(_logits(one, ids), _logits(sw, ids))
    assert _rel(_logits(one, ids), dense) > 1e-3
    zero = longfx.compile(model, "duo_heads(streaming=0, sink=2, window=4)")
    assert _rel(_logits(zero, ids), dense) < 1e-5
    rows = [r for r in zero.longfx_backend.report.rows() if r["kind"] == "attention"]
    assert all("retrieval heads" in r["reason"] for r in rows)


def test_covering_window_is_exact_with_mixed_heads(llama, tmp_path):
    model, ids = llama
    path = _calibration(model, tmp_path / "c.json", sink=2, window=64)
    fast = longfx.compile(model, f"duo_heads(streaming=0.5, sink=2, window=64, "
                                 f"calibration='{path}')")
    assert _rel(_logits(fast, ids), _logits(model, ids)) < 1e-5
    sites = [s for s in fast.longfx_backend.report.sites if s.kind == "attention"]
    assert [s.facts["duo"]["streaming_kv_heads"] for s in sites] == [[1], [0]]


def test_mixed_heads_equal_a_per_head_emulation(llama, tmp_path):
    from longfx.eval import infer

    model, ids = llama
    path = _calibration(model, tmp_path / "c.json")
    fast = longfx.compile(model, f"duo_heads(streaming=0.5, sink=2, window=4, "
                                 f"calibration='{path}')")
    got = _logits(fast, ids)
    name, table = _emulation(model, MIXED, 2, 4)
    try:
        model.config._attn_implementation = name
        want = _logits(model, ids)
        long_ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0))
        want_long = _logits(model, long_ids[None])[0]
    finally:
        model.config._attn_implementation = "eager"
        table._global_mapping.pop(name, None)
    assert _rel(got, want) < 1e-5
    assert _rel(got, _logits(model, ids)) > 1e-3                     # it did change
    assert _rel(got, _logits(longfx.compile(model, "sink_window(sink=2, window=4)"), ids)) > 1e-3
    # chunked prefill through the KV cache (S < Skv): the decode-shaped graphs are duo too
    with torch.no_grad():
        chunks = torch.cat([lg for _s, lg, _c in infer.chunked_logits(fast, long_ids, 9)])
    assert _rel(chunks, want_long) < 1e-5


def test_scores_rank_heads_by_attention_mass_outside_the_window():
    """A constructed site whose logits are set exactly (one-hot keys, head_dim = Skv): every
    head attends locally, and KV head h is drawn to one far key (its own value) by a logit
    ``boost[h]``. The output change ranks the heads as their attention mass outside
    sink + window does, and the 50% choice streams the two that look least far."""
    torch.manual_seed(0)
    s, sink, window, far = 64, 1, 8, 20
    qp, kp = R.positions(s, s)
    local = R.visible(qp, kp, sink, window)                                 # [S, Skv]
    boost = [2.0, -10.0, 5.0, 0.0]
    logits = torch.where(local, 0.0, -10.0).repeat(4, 1, 1)                # [H, S, Skv]
    for h, b in enumerate(boost):
        logits[h, far + window:, far] = b
    q = logits[None]                                                        # [1, 4, S, D=S]
    k = torch.eye(s).expand(1, 4, s, s)                                     # q·k_j = logits[.., j]
    v = torch.randn(1, 4, s, 8)
    _full, err, ref = D.head_errors(q, k, v, None, 1.0, 0.0, sink, window)
    scores = (err / ref).sqrt()
    probs = logits.masked_fill(~R.visible(qp, kp, 0, 0), float("-inf")).softmax(-1)
    outside = (probs * ~local).sum(-1).mean(-1)                             # [H]
    assert torch.equal(scores.argsort(), outside.argsort())
    assert scores.argsort().tolist() == [1, 3, 0, 2]
    assert D.choose({"attention[0]": scores.tolist()}, 0.5) == {"attention[0]": [1, 3]}


def test_calibration_round_trips_and_another_model_is_refused(llama, tmp_path):
    model, ids = llama
    text = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "calib.json"
    calib = D.calibrate(model, text, sink=2, window=4, length=64, samples=2, path=path,
                        progress=False)
    assert set(calib["sites"]) == {"attention[0]", "attention[1]"}
    assert sum(len(s["streaming"]) for s in calib["sites"].values()) == 2       # 50% of 4
    assert all(len(s["scores"]) == 2 and s["layer"] == int(k[-2])
               for k, s in calib["sites"].items())
    assert D.load_calibration(path, model, sink=2, window=4) == json.loads(json.dumps(calib))
    with pytest.raises(RecipeError, match="scored heads with window=4"):
        D.load_calibration(path, model, sink=2, window=8)
    other, _ = zoo.build("llama", "eager", seed=1)
    with pytest.raises(RecipeError, match="not for this model"):
        D.load_calibration(path, other)
    with pytest.raises(RecipeError, match="not for this model"):
        D.compile(other, f"duo_heads(streaming=0.5, sink=2, window=4, calibration='{path}')")
    # a file whose sites do not match the graph: sites kept dense with the reason
    bad = json.loads(path.read_text())
    bad["sites"]["attention[1]"]["num_kv_heads"] = 4
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    fast = longfx.compile(model, f"duo_heads(streaming=0.5, sink=2, window=4, "
                                 f"calibration='{tmp_path / 'bad.json'}')")
    _logits(fast, ids)
    reasons = [r.get("reason") or "" for r in fast.longfx_backend.report.rows()
               if r["key"] == "attention[1]"]
    assert any("calibration mismatch" in r for r in reasons)


def test_recall_calibration_ranks_heads_by_mass_on_the_hidden_lines(llama, monkeypatch):
    """data="recall": each sample hides access codes and recalls them at its end; a head's
    score is the attention mass its recall queries put on the hidden lines."""
    from longfx.eval.data import CharTokenizer

    model, _ids = llama
    seen = []
    real = D.retrieval_mass

    def spy(q, k, keep, scale, softcap, last, needles):
        seen.append((q.shape[2], last, needles))
        return real(q, k, keep, scale, softcap, last, needles)

    monkeypatch.setattr(D, "retrieval_mass", spy)
    tok = CharTokenizer(128)
    calib = D.calibrate(model, tok, sink=2, window=4, length=256, samples=2, progress=False,
                        data="recall", keys=2)
    assert calib["data"]["kind"] == "recall" and calib["data"]["keys"] == 2
    assert len(seen) == 4 and all(s == 256 and 0 < last < 100 for s, last, _ in seen)
    ids, (tail, needles) = D._samples(tok, 256, 2, "recall", 2)[0]
    text = tok.decode(ids[needles].tolist())
    assert text.count("The access code of") == 2 and len(needles) == len(text)
    assert all(0 <= x <= 1 for s in calib["sites"].values() for x in s["scores"])
    with pytest.raises(RecipeError, match="tokenizer"):
        D.calibrate(model, torch.arange(3, 300), length=64, progress=False, data="recall")
    with pytest.raises(RecipeError, match="must be one of"):
        D.calibrate(model, tok, length=64, progress=False, data="prose")


def test_retrieval_mass_is_the_attention_on_the_needles():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    needles = torch.tensor([2, 3, 5])
    mass = D.retrieval_mass(q, k, None, 0.35, 0.0, 3, needles)
    kk = k.repeat_interleave(2, dim=1)
    s = (q[:, :, -3:] @ kk.transpose(-1, -2)) * 0.35                      # [1, 4, 3, 12]
    vis = torch.arange(12)[None] <= torch.arange(9, 12)[:, None]
    p = s.masked_fill(~vis, float("-inf")).softmax(-1)
    assert torch.allclose(mass, p[..., needles].sum(-1).mean(dim=(0, 2)).double(), atol=1e-6)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 3] = False                                   # a padded needle gets no mass
    p2 = s.masked_fill(~(vis & keep[0]), float("-inf")).softmax(-1)
    assert torch.allclose(D.retrieval_mass(q, k, keep, 0.35, 0.0, 3, needles),
                          p2[..., needles].sum(-1).mean(dim=(0, 2)).double(), atol=1e-6)


def test_compile_calibrates_on_first_compile_and_reuses(llama, tmp_path, monkeypatch):
    model, ids = llama
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(2))
    recipe = "duo_heads(streaming=0.5, sink=2, window=4)"
    fast = D.compile(model, recipe, text, length=64, progress=False)
    _logits(fast, ids)
    notes = fast.longfx_backend.report.warnings
    assert any("calibrated on first compile" in n for n in notes), notes
    assert D.default_path(model, 2, 4).exists()
    again = D.compile(model, recipe)                                 # no text needed now
    assert any("reused" in n for n in again.longfx_backend.report.warnings)
    assert torch.equal(_logits(again, ids), _logits(fast, ids))
    # plain longfx.compile finds the calibration made for this model (recipe bound to it)
    plain = longfx.compile(model, recipe)
    assert torch.equal(_logits(plain, ids), _logits(fast, ids))
    assert str(D.default_path(model, 2, 4)) in plain.longfx_backend.report.recipe
    # without one it keeps the sites dense, and the report says how to calibrate
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    plain = longfx.compile(model, recipe)
    _logits(plain, ids)
    assert all("no calibration file" in (r.get("reason") or "")
               for r in plain.longfx_backend.report.rows() if r["kind"] == "attention")


def test_a_missing_file_leaves_the_graph_unrewritten_and_says_why(llama, tmp_path):
    model, ids = llama
    fast = longfx.compile(model, f"duo_heads(calibration='{tmp_path / 'none.json'}')")
    assert _rel(_logits(fast, ids), _logits(model, ids)) < 1e-5
    assert any("cannot read the calibration file" in w
               for w in fast.longfx_backend.report.warnings)


@pytest.mark.parametrize("text", ["duo_heads(streaming=1.5)", "duo_heads(streaming=-0.1)",
                                  "duo_heads(sink=-1)", "duo_heads(window=0)",
                                  "duo_heads(streaming=true)", "duo_heads(calibration='')",
                                  "duo_heads(window=2.5)"])
def test_bad_arguments_raise_recipe_error(text):
    with pytest.raises(RecipeError):
        recipes.parse(text)


def test_string_form_round_trips():
    r = recipes.parse("duo_heads(streaming=0.25, sink=4, window=256, calibration='a.json')")
    assert str(r) == "duo_heads(streaming=0.25, sink=4, window=256, calibration='a.json')"
    assert recipes.parse(str(r)) == r
