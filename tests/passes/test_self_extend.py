"""The self_extend recipe: wiring (the right frequencies, group and window reach the op),
exactness while the context fits the neighbour window, local layers left alone, settings."""
import pytest
import torch

import longfx
from longfx import recipes
from longfx.kernels.self_extend import reference as SE
from longfx.kernels.self_extend.op import OP
from longfx.passes.self_extend import SelfExtend, self_extend_settings
from longfx.rewrite.testing import zoo
from longfx.testing import run_pass

pytestmark = pytest.mark.filterwarnings("ignore")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt_neox", "falcon", "qwen3"])
def test_exact_while_the_context_fits_the_window(name):
    model, inputs = zoo.build(name, "sdpa")
    fast = longfx.compile(model, "self_extend(group=4, window=64)")
    with torch.no_grad():
        assert _rel(fast(**inputs).logits, model(**inputs).logits) < 1e-5


def test_the_op_receives_the_sites_frequencies_and_matches_the_reference():
    model, inputs = zoo.build("llama", "sdpa")
    res = run_pass(model, inputs, recipes.parse("self_extend(group=2, window=3)").rules())
    gm = res.rewritten[0]
    nodes = [n for n in gm.graph.nodes if n.target is OP]
    assert len(nodes) == 2
    seen = []

    def hook(*args):
        seen.append(args)
        return SE.self_extend_attention(*args)

    for n in nodes:
        n.target = hook
    gm.recompile()
    with torch.no_grad():
        out = gm(*res.inputs[0])
    q, k, v, keep, scale, softcap, group, window, inv, style, until = seen[0]
    assert (group, window, style, until) == (2, 3, "rotate_half", 0)
    assert torch.allclose(inv, model.model.rotary_emb.inv_freq)
    # and the graph's output equals the compiled model's
    fast = longfx.compile(model, "self_extend(group=2, window=3)")
    with torch.no_grad():
        want = fast(**inputs).logits
    outs = out if isinstance(out, (tuple, list)) else [out]
    logits = [t for t in outs if isinstance(t, torch.Tensor) and t.shape == want.shape]
    assert logits and _rel(logits[0], want) < 1e-5


def test_far_keys_change_the_output_and_generate_works():
    model, inputs = zoo.build("llama", "sdpa")
    ids = inputs["input_ids"][:1]
    fast = longfx.compile(model, "self_extend(group=2, window=3)")
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, fast(input_ids=ids).logits
        assert _rel(a[:, :3], b[:, :3]) < 1e-5 and _rel(a[:, 3:], b[:, 3:]) > 1e-4
        out = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 17)


def test_local_layers_are_left_alone():
    model, inputs = zoo.build("gemma3", "sdpa")
    d = longfx.diff(model, "self_extend(group=2, window=3)", inputs=inputs)
    rows = [r for r in d.report.rows() if r["kind"] == "attention"]
    assert rows[0]["status"] == "rejected" and "local layer" in rows[0]["reason"]
    assert rows[1]["status"] == "rewritten"


def test_settings_keep_the_largest_distance_inside_the_trained_length():
    for trained, target in [(8192, 32768), (8192, 16384), (4096, 65536), (32768, 131072)]:
        group, window = self_extend_settings(trained, target)
        assert window == trained // 2
        assert target / group + window - window / group <= 0.75 * trained
        if group > 1:       # the smallest such power of two
            g = group // 2
            assert target / g + window - window / g > 0.75 * trained
        assert SelfExtend(group=group, window=window).reach(trained) >= target


def test_bad_arguments():
    with pytest.raises(recipes.RecipeError, match="group"):
        recipes.parse("self_extend(group=0)")
    model, inputs = zoo.build("gpt2", "sdpa")
    d = longfx.diff(model, "self_extend", inputs=inputs)
    rows = [r for r in d.report.rows() if r["kind"] == "attention"]
    assert all(r["status"] == "rejected" and "RoPE" in r["reason"] for r in rows)


def test_until_hands_longer_calls_to_a_frequency_recipe():
    """self_extend(..., until=N): calls over at most N keys are SelfExtend, longer ones plain
    attention; composed with dynamic_yarn(start=N/L0) every call equals one recipe or the
    other (the hybrid docs/rope.md measures). With ``above=N`` the YaRN scale jumps at the
    switch: from N+1 tokens on the hybrid is plain ``dynamic_yarn`` without the floor."""
    model, _ = zoo.build("llama", "eager")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))

    def logits(m, n):
        with torch.no_grad():
            return m(input_ids=ids[:, :n]).logits

    se = longfx.compile(model, "self_extend(group=2, window=8)")
    yarn = longfx.compile(model, "dynamic_yarn(factor=4, margin=2, start=2, original=8)")
    hybrid = longfx.compile(model, "dynamic_yarn(factor=4, margin=2, start=2, original=8) + "
                                   "self_extend(group=2, window=8, until=16)")
    plain_yarn = longfx.compile(model, "dynamic_yarn(factor=4, margin=2, original=8)")
    jump = longfx.compile(model, "dynamic_yarn(factor=4, margin=2, original=8, above=16) + "
                                 "self_extend(group=2, window=8, until=16)")
    with pytest.raises(recipes.RecipeError, match="write the frequency recipe first"):
        recipes.parse("self_extend(group=2, window=8, until=16) + "
                      "dynamic_yarn(factor=4, margin=2, start=2, original=8)")
    for n in (12, 16):
        assert _rel(logits(hybrid, n), logits(se, n)) < 1e-6
        assert _rel(logits(hybrid, n), logits(model, n)) > 1e-5         # SelfExtend acts
        assert _rel(logits(jump, n), logits(se, n)) < 1e-6
    for n in (17, 40):
        assert _rel(logits(hybrid, n), logits(yarn, n)) < 1e-5
        assert _rel(logits(hybrid, n), logits(se, n)) > 1e-5
        assert _rel(logits(jump, n), logits(plain_yarn, n)) < 1e-5
    assert _rel(logits(jump, 17), logits(hybrid, 17)) > 1e-5     # s = 4 there, not 1.25
    # the op: more keys than ``until`` is plain causal attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (3, 30, 30))
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    args = (None, 0.25, 0.0, 4, 6, inv, "rotate_half")
    plain = SE.self_extend_attention(q, k, v, None, 0.25, 0.0, 4, 30, inv)
    assert _rel(OP(q, k, v, *args, 29), plain) < 1e-6
    assert _rel(OP(q, k, v, *args, 30), SE.self_extend_attention(q, k, v, *args)) < 1e-6
    assert _rel(SE.self_extend_attention(q, k, v, *args, 29), plain) < 1e-6
    with pytest.raises(ValueError, match="until"):
        SelfExtend(group=4, window=6, until=-1)
    assert str(recipes.parse("self_extend(group=4, window=6, until=16384)")) == \
        "self_extend(group=4, window=6, until=16384)"
