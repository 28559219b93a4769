"""RoPE context-extension recipes: formulas against the published equations, rewritten zoo
graphs against transformers configured with the equivalent ``rope_parameters``, and the
hand-written spellings (interleaved, complex) against the same model with its frequency
buffer replaced."""
import copy
import math

import pytest
import torch
import transformers

import longfx
from longfx import recipes, testing
from longfx.passes import rope as R
from longfx.rewrite.engine import rewrite_graph
from longfx.rewrite.testing import handmade, zoo

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------
# formulas, each against a direct transcription of the published equations

D, BASE = 128, 10000.0


def theta(base=BASE, dim=D):
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def close(a, b, tol=1e-12):
    a = [float(x) for x in a]
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(y), 1e-30) for x, y in zip(a, b))


def test_default_and_pi():
    inv = R.default_inv_freq(BASE, D)
    assert close(inv, theta())
    # PI (Chen et al., eq. f'(x, m) = f(x, m L / L')): angle m·θ/s
    assert close(R.pi_inv_freq(inv, 4.0), [t / 4 for t in theta()])


def test_ntk_is_a_base_change():
    # NTK-aware: b' = b · s^(|D|/(|D|-2)), θ'_i = b'^(-2i/|D|)
    s = 8.0
    b2 = BASE * s ** (D / (D - 2))
    assert R.ntk_base(BASE, s, D) == pytest.approx(b2)
    assert close(R.ntk_inv_freq(R.default_inv_freq(BASE, D), s, D), theta(b2), 1e-10)
    # the lowest frequency is interpolated by exactly s, the highest is unchanged
    new = R.ntk_inv_freq(R.default_inv_freq(BASE, D), s, D)
    assert float(new[0]) == 1.0
    assert float(new[-1]) == pytest.approx(BASE ** (-(D - 2) / D) / s, rel=1e-9)


def test_dynamic_ntk_base():
    # HF "dynamic": b' = b·((s·L/L0) − (s−1))^(d/(d−2)) for L > L0, b for L ≤ L0
    assert R.dynamic_ntk_base(BASE, 2.0, D, 100, 128) == BASE
    assert R.dynamic_ntk_base(BASE, 2.0, D, 512, 128) == pytest.approx(
        BASE * (2 * 512 / 128 - 1) ** (D / (D - 2)))


@pytest.mark.parametrize("s,L", [(4.0, 2048), (16.0, 4096), (2.0, 64)])
def test_yarn_against_the_paper(s, L):
    """YaRN (Peng et al. 2023): r(d) = L/λ_d with λ_d = 2π/θ_d; γ = 0 for r < α, 1 for r > β,
    linear in between; h(θ_d) = (1 − γ)θ_d/s + γθ_d; √(1/t) = 0.1 ln s + 1. The reference
    code ramps linearly over the pair index between the (floored/ceiled) indices where
    r = β and r = α: d(r) = |D| ln(L / (2π r)) / (2 ln b), the inverse of r(d)."""
    alpha, beta = 1.0, 32.0
    th = theta()
    new = R.yarn_inv_freq(R.default_inv_freq(BASE, D), s, D, BASE, L, beta, alpha)

    def d_of(r):
        return D * math.log(L / (2 * math.pi * r)) / (2 * math.log(BASE))

    lo, hi = max(math.floor(d_of(beta)), 0), min(math.ceil(d_of(alpha)), D - 1)
    for i, t in enumerate(th):
        r = L / (2 * math.pi / t)
        assert abs(d_of(r) - i) < 1e-9                          # d(r) inverts r(d)
        g = min(max((i - lo) / (hi - lo), 0.0), 1.0)            # 1: interpolate
        want = t / s * g + t * (1 - g)
        assert float(new[i]) == pytest.approx(want, rel=1e-12)
        if r > beta and i < lo:                                 # paper: γ = 1 (keep θ)
            assert float(new[i]) == pytest.approx(t, rel=1e-12)
        if r < alpha and i > hi:                                # paper: γ = 0 (θ / s)
            assert float(new[i]) == pytest.approx(t / s, rel=1e-12)
        assert t / s * (1 - 1e-12) <= float(new[i]) <= t * (1 + 1e-12)
    assert R.yarn_mscale(s) == pytest.approx(0.1 * math.log(s) + 1)
    assert R.yarn_mscale(1.0) == 1.0 and R.yarn_mscale(0.5) == 1.0


def test_llama3_against_the_published_rule():
    """Llama 3.1: λ = 2π/θ; λ < L0/high → θ; λ > L0/low → θ/s; else
    (1 − σ)θ/s + σθ with σ = (L0/λ − low)/(high − low)."""
    base, s, L0, low, high = 500000.0, 8.0, 8192, 1.0, 4.0
    th = theta(base)
    new = R.llama3_inv_freq(R.default_inv_freq(base, D), s, L0, low, high)
    kinds = set()
    for t, n in zip(th, new.tolist()):
        lam = 2 * math.pi / t
        if lam < L0 / high:
            want, k = t, "high"
        elif lam > L0 / low:
            want, k = t / s, "low"
        else:
            sigma = (L0 / lam - low) / (high - low)
            want, k = (1 - sigma) * t / s + sigma * t, "mid"
        kinds.add(k)
        assert n == pytest.approx(want, rel=1e-12)
    assert kinds == {"high", "low", "mid"}


def test_longrope_and_truncated_basis():
    inv = R.default_inv_freq(BASE, 8)
    lam = (1.0, 1.5, 2.0, 4.0)
    assert close(R.longrope_inv_freq(inv, lam), [t / x for t, x in zip(theta(BASE, 8), lam)])
    with pytest.raises(ValueError):
        R.longrope_inv_freq(inv, (1.0,))
    assert R.longrope_mscale(2.0, 64) == pytest.approx(math.sqrt(1 + math.log(2) / math.log(64)))
    # Giraffe: θ ≥ b → θ; a < θ < b → ρ; θ ≤ a → 0
    a, b, rho = 1e-3, 0.05, 0.01
    want = [t if t >= b else (0.0 if t <= a else rho) for t in theta(BASE, 8)]
    assert close(R.truncated_basis_inv_freq(inv, a, b, rho), want)


def test_formulas_agree_with_transformers():
    """A cross-check with transformers' own initializers (same formulas, their code)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = zoo.config("llama")
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": BASE, "factor": 4.0,
                           "original_max_position_embeddings": 64}
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours = R.yarn_inv_freq(R.default_inv_freq(BASE, 16), 4.0, 16, BASE, 64)
    assert torch.allclose(inv.double(), ours, rtol=1e-6) and att == pytest.approx(R.yarn_mscale(4))
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": BASE, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = R.llama3_inv_freq(R.default_inv_freq(BASE, 16), 8.0, 64)
    assert torch.allclose(inv.double(), ours, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# recipes: registration, parsing, validation


def test_recipes_parse_without_imports_and_round_trip():
    for text in ("pi(factor=2.0)", "ntk(factor=4.0)", "yarn(factor=4.0, original=64)",
                 "llama3(factor=8.0, original=64)", "dynamic_ntk(factor=2.0, original=16)",
                 "longrope(short=(1.0, 1.0), long=(2.0, 4.0), original=64)",
                 "truncated_basis(b=0.05, a=0.001, rho=0.01)", "extend(to=256, original=64)"):
        p = recipes.parse(text)
        assert recipes.parse(str(p)) == p
        # frequency-table rules act on RoPE sites; the cache-consistent dynamic ones
        # (dynamic_ntk, extend) on attention sites (passes/rope_dynamic.py)
        kind = "attention" if text.startswith(("dynamic_ntk", "extend")) else "rope"
        assert p.rules() and all(r.kind == kind and r.stage == "transform" for r in p.rules())
    assert str(recipes.parse("yarn(4)")) == "yarn(factor=4.0)"
    (hf_like,) = recipes.parse("dynamic_ntk(factor=2, consistent=false)").rules()
    assert hf_like.kind == "rope" and hf_like.name == "rope.dynamic_ntk"
    with pytest.raises(recipes.RecipeError, match="factor must be > 0"):
        recipes.parse("pi(factor=0)")


# ---------------------------------------------------------------------------------------------
# rewritten zoo models against transformers configured with the same method

_IDS = torch.randint(3, zoo.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama")[0]


def _hf(name: str, model, rope_parameters: dict, **config) -> torch.nn.Module:
    cfg = zoo.config(name)
    cfg.rope_parameters = rope_parameters
    for k, v in config.items():
        setattr(cfg, k, v)
    ref = getattr(transformers, zoo.ZOO[name].model_class)(cfg).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return ref


def _logits(m, ids=_IDS):
    with torch.no_grad():
        return m(ids).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("recipe,params,config,ids_len", [
    ("pi(factor=2)", {"rope_type": "linear", "factor": 2.0}, {}, 40),
    ("yarn(factor=4, original=64)", {"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}, {}, 40),
    ("llama3(factor=8, original=64)", {"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}, {}, 40),
    ("longrope(short=(1,1.1,1.2,1.3,1.4,1.5,1.6,1.7), long=(1,1.5,2,3,4,6,8,9), original=64, "
     "length=128)", {"rope_type": "longrope", "short_factor": [1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                     "long_factor": [1, 1.5, 2, 3, 4, 6, 8, 9],
                     "original_max_position_embeddings": 64}, {}, 70),
    ("longrope(short=(1,1.1,1.2,1.3,1.4,1.5,1.6,1.7), long=(1,1.5,2,3,4,6,8,9), original=64, "
     "length=64, factor=2)", {"rope_type": "longrope",
                              "short_factor": [1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                              "long_factor": [1, 1.5, 2, 3, 4, 6, 8, 9],
                              "original_max_position_embeddings": 64}, {}, 40),
    ("dynamic_ntk(factor=2, original=16, consistent=false)", {"rope_type": "dynamic", "factor": 2.0},
     {"max_position_embeddings": 16}, 40),
])
def test_llama_matches_transformers(llama, recipe, params, config, ids_len):
    ids = torch.randint(3, zoo.VOCAB, (1, ids_len), generator=torch.Generator().manual_seed(5))
    ref = _hf("llama", llama, {"rope_theta": 10000.0, **params}, **config)
    fast = longfx.compile(llama, recipe)
    out, want, base = _logits(fast, ids), _logits(ref, ids), _logits(llama, ids)
    assert _rel(base, want) > 1e-4                  # the method does change the logits
    assert _rel(out, want) <= 1e-5
    rows = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "rope"]
    assert rows and all(r["status"] == "rewritten" for r in rows)
    assert _rel(_logits(llama, ids), base) == 0     # the original is untouched


def test_gemma3_two_tables_match_transformers():
    model, _ = zoo.build("gemma3")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    ref = _hf("gemma3", model, {"sliding_attention": {**yarn, "rope_theta": 10000.0},
                                "full_attention": {**yarn, "rope_theta": 1000000.0}})
    fast = longfx.compile(model, "yarn(factor=4, original=16)")
    assert _rel(_logits(fast), _logits(ref)) <= 1e-5
    rows = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "rope"]
    assert len(rows) == 2 and all(r["status"] == "rewritten" for r in rows)
    assert {r["base"] for r in rows} == {10000.0, 1000000.0}


def test_phi3_partial_rotary_matches_transformers():
    model, _ = zoo.build("phi3")
    ref = _hf("phi3", model, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "partial_rotary_factor": 0.5,
                              "original_max_position_embeddings": 16},
              original_max_position_embeddings=16)    # Phi3Config's own field wins otherwise
    assert ref.config.rope_parameters["original_max_position_embeddings"] == 16
    fast = longfx.compile(model, "yarn(factor=4, original=16)")
    assert _rel(_logits(fast), _logits(ref)) <= 1e-5
    (row,) = [r for r in fast.longfx_backend.report.rows() if r["kind"] == "rope"]
    assert row["rotary_dim"] == 8 and len(row["inv_freq_after"]) == 4


# ---------------------------------------------------------------------------------------------
# hand-written spellings: the same model with its inv_freq buffer replaced is the reference


@pytest.mark.parametrize("name", ["gptj_interleaved", "meta_complex", "sdpa_rope"])
@pytest.mark.parametrize("recipe,fn", [
    ("pi(factor=2)", lambda inv, rd, base: R.pi_inv_freq(inv, 2.0)),
    ("yarn(factor=4, original=8, mscale=1.0)",
     lambda inv, rd, base: R.yarn_inv_freq(inv, 4.0, rd, base, 8)),
    ("llama3(factor=4, original=8)", lambda inv, rd, base: R.llama3_inv_freq(inv, 4.0, 8)),
])
def test_handmade_spellings(name, recipe, fn):
    model, ids = handmade.make(name)
    ref = copy.deepcopy(model)
    bufs = [(mod, k) for mod in ref.modules() for k, b in mod.named_buffers(recurse=False)
            if k == "inv_freq"]
    for mod, k in bufs:
        inv = getattr(mod, k)
        rd = 2 * inv.numel()
        base = BASE if name != "meta_complex" else 500000.0
        setattr(mod, k, fn(inv.double(), rd, base).float())
    result = testing.run_pass(model, (ids,), recipes.parse(recipe).rules())
    testing.assert_counts(result, "rope", rewritten=1)
    with torch.no_grad():
        want = ref(ids)
        (gm,), (example,) = result.rewritten, result.inputs
        out = gm(*example)
        out = out[0] if isinstance(out, (tuple, list)) else out
    assert _rel(out, want) <= 1e-5
    assert _rel(out, model(ids)) > 1e-5


def test_mscale_scales_the_complex_table():
    """yarn's temperature on the complex spelling: cos/sin (the polar table) times mscale, so
    each rotated q/k is mscale times the unscaled yarn rotation."""
    model, ids = handmade.make("meta_complex")
    plain = testing.run_pass(model, (ids,), recipes.parse(
        "yarn(factor=4, original=8, mscale=1.0)").rules())
    scaled = testing.run_pass(model, (ids,), recipes.parse(
        "yarn(factor=4, original=8, mscale=1.5)").rules())
    ropes = [n for n in scaled.rewritten[0].graph.nodes if "longfx.rope" in str(n.target)
             or "longfx::rope" in str(n.target) or str(n.target) == "longfx.rope.default"]
    assert ropes
    (site,) = scaled.sites("rope")
    assert site.facts["mscale"] == 1.5
    # logits differ (temperature changes attention) but both ran
    assert _rel(scaled.rewritten[0](*scaled.inputs[0])[0],
                plain.rewritten[0](*plain.inputs[0])[0]) > 1e-6


# ---------------------------------------------------------------------------------------------
# rejections, extend(), composition, diff, export


def assert_rope_rejected(result, reason: str) -> None:
    """A rope.* rule rejected some site with ``reason`` (the site still counts as rewritten
    by canonical.rope in the report's status, so read the per-rule results)."""
    got = [(r.rule, r.reason) for g in result.graphs for r in g.results
           if r.rule.startswith("rope.") and r.status == "rejected"]
    assert any(reason in (why or "") for _, why in got), got


def test_precomputed_table_is_rejected():
    model, ids = handmade.make("rope_cached_gather")
    result = testing.run_pass(model, (ids,), recipes.parse("pi(factor=2)").rules())
    assert_rope_rejected(result, "precomputed, table='input'")
    testing.assert_close(result)


def test_missing_original_and_extend_rule(llama):
    _, x = zoo.build("llama")
    r = testing.run_pass(llama, x, recipes.parse("yarn(factor=4)").rules())
    assert_rope_rejected(r, "pass original=N")
    r = testing.run_pass(llama, x, recipes.parse("extend(to=64, original=128)").rules())
    assert_rope_rejected(r, "nothing to do")
    testing.assert_close(r)
    r = testing.run_pass(llama, x, recipes.parse("extend(to=512, original=128)").rules())
    assert {s.facts["dynamic_rope"]["chosen"] for s in r.sites("attention")} == \
        {"dynamic_yarn(factor=6.0, original=128, margin=2.0)"}
    testing.assert_close(r)              # 16 example tokens < 128/2: s = 1, unchanged


def test_composition(llama):
    _, x = zoo.build("llama")
    p = recipes.parse("none + pi(factor=2) + yarn(factor=4, original=64)")
    r = testing.run_pass(llama, x, p.rules())
    (site,) = r.sites("rope")
    assert site.facts["rope_method"] == "pi(factor=2.0)"
    assert_rope_rejected(r, "frequency recipes do not stack")

    @recipes.register("_test_noop_family")
    class Noop(recipes.Recipe):
        def rules(self):
            return []
    try:
        fast = longfx.compile(llama, "_test_noop_family + pi(factor=2)")
        ref = _hf("llama", llama, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
        assert _rel(_logits(fast), _logits(ref)) <= 1e-5
    finally:
        recipes.unregister("_test_noop_family")


def test_diff_shows_the_frequency_table(llama):
    d = longfx.diff(llama, "yarn(factor=4, original=64)")
    text = d.text
    assert "frequency table" in text and "inv_freq before [1.0, 0.316228" in text
    assert "inv_freq after  [1.0, 0.237171" in text and "mscale 1.1386" in text
    assert "longfx_rope0_ratio" in text          # the graph diff shows the new multiply


def test_empty_recipe_stays_exact(llama):
    _, x = zoo.build("llama")
    r = testing.run_pass(llama, x, recipes.parse("").rules())
    testing.assert_close(r)


def test_export_path_matches_transformers(llama):
    from longfx.rewrite.capture_export import capture_export

    cap = capture_export(llama, mode="prefill", cache="dynamic")
    gm = cap.program.module()
    new, report = rewrite_graph(gm, None, recipes.parse("yarn(factor=4, original=8)").rules())
    rows = [s for s in report.sites if s.kind == "rope"]
    assert rows and rows[0].facts.get("inv_freq_after")
    ref = _hf("llama", llama, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 8})
    ids, mask, pos = cap.example_inputs[:3]
    with torch.no_grad():
        out = new(*[t.clone() for t in cap.example_inputs])[0]
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        base = gm(*[t.clone() for t in cap.example_inputs])[0]
    assert _rel(out, want) <= 1e-5 and _rel(base, want) > 1e-4
