"""Cache-consistent dynamic RoPE (passes/rope_dynamic.py, kernels/rope/dynamic.py): equal to
transformers' dynamic NTK / YaRN on a call without a cache, unchanged below the trained length,
and — the point — decode through a KV cache scores cached keys with the current frequencies
(a one-layer model, where that is the only thing a cache can change, decodes exactly like
running each prefix without a cache; transformers' behaviour does not)."""
import pytest
import torch
import transformers

import longfx
from longfx import recipes
from longfx.kernels.rope import dynamic as D
from longfx.kernels.rope import reference
from longfx.rewrite.testing import zoo

pytestmark = pytest.mark.filterwarnings("ignore")

IDS = torch.randint(3, zoo.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _model(layers: int | None = None):
    cfg = zoo.config("llama")
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf(model, params: dict, **config):
    cfg = zoo.config("llama")
    cfg.num_hidden_layers = model.config.num_hidden_layers
    cfg.rope_parameters = {"rope_theta": 10000.0, **params}
    for k, v in config.items():
        setattr(cfg, k, v)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    return ref


@pytest.fixture(scope="module")
def llama():
    return _model()


def test_rerotation_composes_rotations():
    """Keys rotated with θ, re-rotated by pos·(θ' − θ), equal keys rotated with θ' directly."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 11, 16, generator=g)
    inv = 10000.0 ** (-torch.arange(8) / 8)
    inv2 = inv * torch.linspace(1, 0.25, 8)
    pos = torch.arange(20, 31)[None]                       # the call's queries: positions 20..30
    for style in ("rotate_half", "interleaved"):
        kp = D.key_positions(pos, 11)[:, None, :, None]    # keys end where the queries end
        def rot(x, th):
            a = D._layout(kp[..., 0, None] * th, style)     # [Bp, 1, Skv, D]
            return reference.rope(x, a.cos(), a.sin(), style, 16)
        got = D.rerotate_keys(rot(k, inv), pos, inv, inv2, style, 16)
        assert torch.allclose(got, rot(k, inv2), atol=1e-5)


def test_dynamic_ntk_equals_transformers_without_cache(llama):
    fast = longfx.compile(llama, "dynamic_ntk(factor=2, original=16)")
    ref = _hf(llama, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    with torch.no_grad():
        out, want, base = fast(IDS).logits, ref(IDS).logits, llama(IDS).logits
    assert _rel(base, want) > 1e-3
    assert _rel(out, want) <= 1e-5
    rows = fast.longfx_backend.report.rows()
    att = [r for r in rows if r["kind"] == "attention"]
    assert att and all(r["status"] == "rewritten" for r in att)
    assert all(r["dynamic_rope"]["method"] == "ntk" for r in att)


def test_dynamic_yarn_is_yarn_at_the_call_length(llama):
    """40 tokens over a trained length of 16: s = 2.5 — transformers' static YaRN(2.5)."""
    fast = longfx.compile(llama, "dynamic_yarn(factor=4, original=16)")
    ref = _hf(llama, {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 16})
    with torch.no_grad():
        assert _rel(fast(IDS).logits, ref(IDS).logits) <= 1e-5
        # beyond factor·L₀ the scale stops at the factor
        capped = longfx.compile(llama, "dynamic_yarn(factor=2, original=16)")
        ref2 = _hf(llama, {"rope_type": "yarn", "factor": 2.0,
                           "original_max_position_embeddings": 16})
        assert _rel(capped(IDS).logits, ref2(IDS).logits) <= 1e-5


def test_mscale_scales_the_temperature_coefficient(llama):
    """mscale=m: the temperature is (0.1·m·ln s + 1)² on q·k — transformers' YaRN with that
    attention factor on cos and sin (DeepSeek's ``yarn_get_mscale(s, m)``); m = 0: none."""
    import math

    s = torch.tensor(2.5)
    assert float(D.temperature(s, "yarn", 2.0)) == pytest.approx((0.2 * math.log(2.5) + 1) ** 2)
    assert float(D.temperature(s, "yarn", 0.0)) == 1.0
    fast = longfx.compile(llama, "dynamic_yarn(factor=4, original=16, mscale=2)")
    ref = _hf(llama, {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 16,
                      "attention_factor": 0.2 * math.log(2.5) + 1})
    with torch.no_grad():
        assert _rel(fast(IDS).logits, ref(IDS).logits) <= 1e-5
    with pytest.raises(ValueError, match="mscale"):
        longfx.compile(llama, "dynamic_yarn(factor=8, mscale=-1)")


def test_margin_runs_the_scale_ahead_of_the_length(llama):
    """margin=2: 40 tokens over L₀ = 16 give s = 5 (not 2.5), capped at the factor."""
    assert float(D.scale_of(torch.arange(40), 16, 8.0, "yarn", 2.0)) == 5.0
    assert float(D.scale_of(torch.arange(40), 16, 4.0, "yarn", 2.0)) == 4.0
    assert float(D.scale_of(torch.arange(8), 16, 8.0, "yarn", 2.0)) == 1.0
    fast = longfx.compile(llama, "dynamic_yarn(factor=8, original=16, margin=2)")
    ref = _hf(llama, {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": 16})
    with torch.no_grad():
        assert _rel(fast(IDS).logits, ref(IDS).logits) <= 1e-5
    with pytest.raises(ValueError, match="margin"):
        longfx.compile(llama, "dynamic_yarn(factor=8, margin=0)")


def test_start_moves_where_the_scale_leaves_one(llama):
    """start=0.5, margin=4: s = 1 + 4·(L/L₀ − 0.5): 1 up to L₀/2, then a slope of 4 per L₀."""
    assert float(D.scale_of(torch.arange(8), 16, 8.0, "yarn", 4.0, 0.5)) == 1.0
    assert float(D.scale_of(torch.arange(16), 16, 8.0, "yarn", 4.0, 0.5)) == 3.0
    assert float(D.scale_of(torch.arange(40), 16, 8.0, "yarn", 4.0, 0.5)) == 8.0
    # start = 1/margin is the plain rule
    assert float(D.scale_of(torch.arange(40), 16, 8.0, "yarn", 2.0, 0.5)) == 5.0
    fast = longfx.compile(llama, "dynamic_yarn(factor=8, original=16, margin=4, start=0.5)")
    ids = IDS[:, :24]                                     # s = 1 + 4·(24/16 − 0.5) = 5
    ref = _hf(llama, {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": 16})
    with torch.no_grad():
        assert _rel(fast(ids).logits, ref(ids).logits) <= 1e-5
    with pytest.raises(ValueError, match="start"):
        longfx.compile(llama, "dynamic_yarn(factor=8, start=-1)")


def test_above_holds_the_scale_at_one_then_jumps():
    """above=N: s = 1 while L <= N, the plain schedule from N + 1 tokens on (no ramp)."""
    assert float(D.scale_of(torch.arange(40), 16, 8.0, "yarn", 2.0, None, 40)) == 1.0
    assert float(D.scale_of(torch.arange(41), 16, 8.0, "yarn", 2.0, None, 40)) == 5.125
    assert float(D.scale_of(torch.arange(41), 16, 4.0, "yarn", 2.0, None, 40)) == 4.0
    assert float(D.scale_of(torch.arange(8), 16, 8.0, "yarn", 2.0, None, 0)) == 1.0
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="above"):
            recipes.parse(f"dynamic_yarn(factor=8, above={bad})")
    assert str(recipes.parse("dynamic_yarn(factor=6, margin=2, above=20480)")) == \
        "dynamic_yarn(factor=6.0, margin=2.0, above=20480)"


@pytest.mark.parametrize("recipe, unchanged_up_to", [
    ("dynamic_yarn(factor=4, original=16)", 16), ("dynamic_ntk(factor=4, original=16)", 16),
    ("dynamic_yarn(factor=8, original=16, margin=2)", 8), ("extend(to=64, original=16)", 8),
    ("dynamic_yarn(factor=8, original=16, margin=4, start=0.5)", 8)])
def test_unchanged_below_the_trained_length(llama, recipe, unchanged_up_to):
    """Unchanged up to L₀/margin tokens (extend's margin is 2: half the trained length)."""
    fast = longfx.compile(llama, recipe)
    with torch.no_grad():
        short = IDS[:, :unchanged_up_to]
        assert _rel(fast(short).logits, llama(short).logits) <= 1e-6, recipe
        longer = IDS[:, :unchanged_up_to + 4]
        assert _rel(fast(longer).logits, llama(longer).logits) > 1e-4, recipe


def _decode_logits(model, ids, prefill: int):
    """Logits of every position after ``prefill``, decoded one token at a time."""
    cache = transformers.DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        o = model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        out.append(o.logits[:, -1])
        for t in range(prefill, ids.shape[1]):
            o = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            out.append(o.logits[:, -1])
    return torch.stack(out[:-1], 1)                          # predictions for positions ≥ prefill


def _nocache_logits(model, ids, prefill: int):
    with torch.no_grad():
        return torch.stack([model(input_ids=ids[:, :t]).logits[:, -1]
                            for t in range(prefill, ids.shape[1])], 1)


@pytest.mark.parametrize("recipe", ["dynamic_ntk(factor=2, original=16)",
                                    "dynamic_yarn(factor=4, original=16)"])
def test_decode_through_the_cache_is_consistent(recipe):
    """One layer: keys and values come from the embeddings, so the only thing a cache can
    change is how cached keys are rotated. Consistent scaling decodes each token exactly as a
    cache-free call over its prefix; transformers' behaviour (consistent=false) does not."""
    model = _model(layers=1)
    ids = IDS[:, :32]
    fast = longfx.compile(model, recipe)
    want = _nocache_logits(fast, ids, 12)
    got = _decode_logits(fast, ids, 12)
    assert _rel(got, want) <= 1e-5
    if recipe.startswith("dynamic_ntk"):
        hf_like = longfx.compile(model, recipe.replace(")", ", consistent=false)"))
        assert _rel(_decode_logits(hf_like, ids, 12), _nocache_logits(hf_like, ids, 12)) > 1e-3


def test_extend_reports_its_choice_and_refuses_short_targets(llama):
    fast = longfx.compile(llama, "extend(to=64, original=16)")
    with torch.no_grad():
        fast(IDS)
    att = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "attention"]
    assert att[0]["dynamic_rope"]["chosen"] == "dynamic_yarn(factor=6.0, original=16, margin=2.0)"
    none = longfx.compile(llama, "extend(to=16, original=16)")
    with torch.no_grad():
        assert _rel(none(IDS).logits, llama(IDS).logits) == 0
    reasons = [r["reason"] for r in none.longfx_backend.report.rows() if r["kind"] == "attention"]
    assert reasons and all("nothing to do" in (r or "") for r in reasons)


def test_local_layers_keep_their_frequencies():
    """Gemma3: the sliding layer (window 4 < L₀) is left alone with its reason; the global
    layer is rewritten."""
    model, _ = zoo.build("gemma3", "sdpa")
    fast = longfx.compile(model, "extend(to=512, original=16)")
    with torch.no_grad():
        fast(IDS)
    att = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "attention"]
    assert sorted(r["status"] for r in att) == ["rejected", "rewritten"]
    assert any("local layer (window 4)" in (r["reason"] or "") for r in att)
