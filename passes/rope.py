"""RoPE context extension: frequency-table recipes as transform-stage rewrites.

Every recipe here acts on a canonicalized :class:`~longfx.rewrite.sites.RopeSite` whose table
is computed in the graph (``inv_freq`` → angle → cos/sin, or ``polar`` for the complex
spelling). The rotation itself (``longfx::rope``) is never touched; what changes is the
frequency vector the table is computed from, and — for methods with an attention
temperature — the scale of the cos/sin tables:

    inv_freq ──► mul(inv_freq, ratio) ──► angle ──► cos ──► mul(cos, mscale) ──► longfx::rope
                  ratio: a buffer registered on the rewritten GraphModule (new / old, per pair)

``ratio`` is computed in float64 from the site's original frequencies (read from the buffer
when the graph holds it as ``get_attr``, else rebuilt from the detected ``base`` as
``base ** (-2i / rotary_dim)``) and the method's formula (the ``*_inv_freq`` functions
below, unit-tested against the published formulas). The model and the graph handed to the
engine are untouched; the empty recipe stays exact.

``dynamic_ntk`` is the one method whose table depends on the run: its ratio is computed in
the graph from the largest position id (see :class:`DynamicNTK` and docs/rope.md for why it
cannot be consistent with cached keys as a pure table rewrite).

The recipes (registered in :mod:`longfx.recipes` under these names): ``pi``, ``ntk``,
``dynamic_ntk``, ``yarn``, ``llama3``, ``longrope``, ``truncated_basis``, ``extend``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from longfx.recipes import Recipe, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule
from longfx.rewrite.sites import Site


def _opt(default: Any) -> Any:
    """A field written in the recipe's text only when it differs from its default."""
    return field(default=default, metadata={"omit_default": True})

aten = torch.ops.aten

__all__ = ["default_inv_freq", "pi_inv_freq", "ntk_base", "ntk_inv_freq", "yarn_inv_freq",
           "yarn_mscale", "llama3_inv_freq", "longrope_inv_freq", "longrope_mscale",
           "truncated_basis_inv_freq", "dynamic_ntk_base", "FrequencyRule", "DynamicNTKRule",
           "PI", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE", "TruncatedBasis", "Extend"]


# ==============================================================================================
# The formulas (float64, one value per rotated channel pair; i = 0 .. dim/2 - 1)


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """θ_i = base^(−2i/dim): the RoPE frequencies of a ``dim``-channel rotation."""
    i = torch.arange(0, dim // 2, dtype=torch.float64)
    return torch.as_tensor(float(base), dtype=torch.float64) ** (-2.0 * i / dim)


def pi_inv_freq(inv: torch.Tensor, factor: float) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023; HF "linear"): positions m → m/s, i.e. θ_i/s."""
    return inv / float(factor)


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware scaling: b' = b · s^(dim/(dim−2)) (the lowest frequency is stretched by s,
    the highest is unchanged)."""
    return float(base) * float(factor) ** (dim / (dim - 2))


def ntk_inv_freq(inv: torch.Tensor, factor: float, dim: int) -> torch.Tensor:
    """θ'_i = b'^(−2i/dim) = θ_i · s^(−2i/(dim−2)): the NTK-aware base change as a per-pair
    ratio on the model's own frequencies."""
    i = torch.arange(inv.numel(), dtype=torch.float64)
    return inv * float(factor) ** (-2.0 * i / (dim - 2))


def dynamic_ntk_base(base: float, factor: float, dim: int, seq_len: int, original: int) -> float:
    """Dynamic NTK (HF "dynamic"): b' = b·((s·L/L₀) − (s−1))^(dim/(dim−2)), L = max(seq_len, L₀)."""
    L = max(int(seq_len), int(original))
    return float(base) * ((factor * L / original) - (factor - 1)) ** (dim / (dim - 2))


def _correction_dim(rotations: float, dim: int, base: float, original: int) -> float:
    """The (fractional) pair index d whose wavelength makes ``rotations`` turns over the
    original context: L₀·θ_d / 2π = rotations, θ_d = base^(−2d/dim)."""
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(inv: torch.Tensor, factor: float, dim: int, base: float, original: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023), in the reference code's form.

    Pairs that turn more than ``beta_fast`` times over the original context keep θ_i
    (extrapolation), pairs turning fewer than ``beta_slow`` times get θ_i/s (interpolation);
    between the two a linear ramp over the pair index blends them:
    θ'_i = θ_i/s · γ_i + θ_i · (1 − γ_i), γ_i = clamp((i − lo)/(hi − lo), 0, 1), with
    lo/hi the pair indices of ``beta_fast``/``beta_slow`` turns (floored/ceiled when
    ``truncate``, as the YaRN code and HF do).
    """
    lo = _correction_dim(beta_fast, dim, base, original)
    hi = _correction_dim(beta_slow, dim, base, original)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    i = torch.arange(inv.numel(), dtype=torch.float64)
    gamma = ((i - lo) / (hi - lo)).clamp(0, 1)          # 1: interpolate, 0: extrapolate
    return inv / factor * gamma + inv * (1 - gamma)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature √(1/t) = 0.1·ln(s) + 1 (1 for s ≤ 1), applied to cos and
    sin so that q·k is scaled by its square."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def llama3_inv_freq(inv: torch.Tensor, factor: float, original: int,
                    low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama 3.1's scaling: wavelength λ = 2π/θ; λ < L₀/high: keep θ; λ > L₀/low: θ/s; in
    between θ' = (1 − σ)·θ/s + σ·θ with σ = (L₀/λ − low)/(high − low)."""
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > original / low_freq_factor, inv / factor, mid)
    return torch.where(wavelen < original / high_freq_factor, inv, out)


def longrope_inv_freq(inv: torch.Tensor, factors: tuple[float, ...] | list[float]) -> torch.Tensor:
    """LongRoPE (Ding et al. 2024; Phi-3): one searched rescale factor per pair, θ'_i = θ_i/λ_i."""
    f = torch.as_tensor(list(factors), dtype=torch.float64)
    if f.numel() != inv.numel():
        raise ValueError(f"longrope: {f.numel()} factors for {inv.numel()} frequency pairs")
    return inv / f


def longrope_mscale(factor: float, original: int) -> float:
    """LongRoPE/Phi-3's attention factor √(1 + ln s / ln L₀) (1 for s ≤ 1)."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def truncated_basis_inv_freq(inv: torch.Tensor, a: float, b: float, rho: float) -> torch.Tensor:
    """Giraffe's truncated basis (Pal et al. 2023): θ ≥ b kept, a < θ < b set to ρ, θ ≤ a set
    to 0 (those pairs stop rotating: position-independent channels)."""
    out = torch.where(inv >= b, inv, torch.full_like(inv, float(rho)))
    return torch.where(inv <= a, torch.zeros_like(inv), out)


# ==============================================================================================
# Reading a site


def _original(site: Site, given: int | None) -> int | None:
    """The trained context length: the recipe's ``original=`` or what the site records."""
    if given:
        return int(given)
    for key in ("original_max_position_embeddings", "max_position_embeddings", "trained_length"):
        v = site.facts.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return None


def _site_table(site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
    """The live inv_freq node of a computed-table site and its values (float64), or why not."""
    if not site.rewritable:
        return site.reason or "not rewritable"
    if site.facts.get("table") != "computed":
        return ("the cos/sin table is a graph input (precomputed, table='input'): there is no "
                "frequency vector in the graph to rescale")
    inv = site.nodes.get("inv_freq")
    if not isinstance(inv, fx.Node) or getattr(inv, "_erased", False):
        why = site.facts.get("inv_freq_reason")
        return "no frequency vector (inv_freq) found for this table" + (f": {why}" if why else "")
    if inv.graph is not gm.graph:
        return "the frequency vector lives in a subgraph, not in the top graph"
    if site.facts.get("inv_freq_after") is not None:
        return (f"frequencies already rescaled by {site.facts.get('rope_method')}: frequency "
                f"recipes do not stack (use one)")
    t = G.tensor_val(inv)
    n = int(G.as_int(t.shape[-1])) if t is not None and t.dim() >= 1 else None
    values = None
    if inv.op == "get_attr":
        real = G.fetch_attr(gm, inv.target)
        if isinstance(real, torch.Tensor) and real.device.type != "meta":
            values = real.detach().reshape(-1).double().cpu()
    base = site.facts.get("base")
    rd = site.facts.get("rotary_dim")
    if not isinstance(rd, int):
        return f"rotary_dim is not one number ({rd!r})"
    if values is None:
        if not base or n is None:
            return ("the frequency values are unknown: inv_freq is a graph input whose values "
                    "detection could not read as base^(-2i/d) (no base)")
        values = default_inv_freq(float(base), 2 * n)
    if values.numel() * 2 != rd:
        return f"{values.numel()} frequencies do not fit rotary_dim {rd}"
    if base is None:
        v = values
        base = float(math.exp(-math.log(float(v[-1])) * v.numel() / (v.numel() - 1))) \
            if v.numel() > 1 and (v > 0).all() else None
    return {"inv_freq": inv, "values": values, "base": base, "dim": rd,
            "dtype": t.dtype if t is not None else torch.float32}


def _rounded(t: torch.Tensor, digits: int = 6) -> list[float]:
    return [float(f"{float(x):.{digits}g}") for x in t.reshape(-1)]


# ==============================================================================================
# Graph edits


def _fake_like(ref: fx.Node, value: torch.Tensor) -> Any:
    """An example value for a new node holding ``value``, in the fake mode of ``ref``."""
    v = G.val(ref)
    if isinstance(v, torch.Tensor):
        mode = torch._guards.detect_fake_mode([v])
        if mode is not None:
            with mode:
                return mode.from_tensor(value, static_shapes=True)
    return value


def _meta_key(ref: fx.Node) -> str:
    return "val" if "val" in ref.meta or "example_value" not in ref.meta else "example_value"


def _constant(gm: fx.GraphModule, ref: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """A buffer registered on ``gm`` and its get_attr node (inserted before ``ref``'s users)."""
    stem, k = name, 0
    while hasattr(gm, name):
        k += 1
        name = f"{stem}_{k}"
    gm.register_buffer(name, value, persistent=False)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(name)
    node.meta[_meta_key(ref)] = _fake_like(ref, value)
    return node


def _device(node: fx.Node) -> torch.device:
    v = G.val(node)
    return v.device if isinstance(v, torch.Tensor) else torch.device("cpu")


def _first_user(node: fx.Node) -> fx.Node:
    order = {n: k for k, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def _after(node: fx.Node, target, args: tuple, meta_from: fx.Node) -> fx.Node:
    """Insert ``target(*args)`` just before the first user of ``node`` and point ``node``'s
    users at it."""
    with node.graph.inserting_before(_first_user(node)):
        new = node.graph.call_function(target, args)
    for key in ("val", "example_value", "nn_module_stack", "stack_trace"):
        if key in meta_from.meta:
            new.meta[key] = meta_from.meta[key]
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new,
                               propagate_meta=False)
    return new


def _scale_tables(site: Site, mscale: float) -> list[fx.Node]:
    """Multiply each cos/sin (or polar) table of the site by ``mscale``."""
    made = []
    for pair in site.nodes.get("tables") or []:
        for table in pair:
            if isinstance(table, fx.Node):
                made.append(_after(table, aten.mul.Tensor, (table, float(mscale)), table))
    return made


# ==============================================================================================
# Rules


class FrequencyRule(Rule):
    """Replace a site's frequencies by ``fn(site info) -> (new inv_freq float64, mscale)``."""

    kind = "rope"
    stage = "transform"

    def __init__(self, method: str, fn: Callable[[dict[str, Any], Site], tuple | str],
                 recipe: str = ""):
        self.name = f"rope.{method}"
        self.method = method
        self.fn = fn
        self.recipe = recipe

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        info = _site_table(site, gm)
        if isinstance(info, str):
            return info
        out = self.fn(info, site)
        if isinstance(out, str):
            return out
        new, mscale, extra = (*out, {})[:3] if len(out) == 2 else out
        if new.shape != info["values"].shape:
            return f"{self.method} produced {tuple(new.shape)} frequencies for " \
                   f"{tuple(info['values'].shape)}"
        if (info["values"] == 0).any():
            return "the model's frequency vector has zeros: cannot express a ratio"
        return {**info, "new": new, "mscale": float(mscale), "extra": dict(extra)}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        inv: fx.Node = facts["inv_freq"]
        ratio = (facts["new"] / facts["values"]).to(dtype=facts["dtype"], device=_device(inv))
        made = []
        if not torch.equal(ratio, torch.ones_like(ratio)):
            const = _constant(gm, inv, f"longfx_rope{site.index}_ratio", ratio)
            made.append(const)
            made.append(_after(inv, aten.mul.Tensor, (inv, const), inv))
        if facts["mscale"] != 1.0:
            made += _scale_tables(site, facts["mscale"])
        _record(site, self, facts["values"], facts["new"], facts["mscale"], facts["extra"])
        return made


def _record(site: Site, rule: Rule, before: torch.Tensor, after: torch.Tensor | None,
            mscale: float, extra: dict) -> None:
    site.facts["rope_method"] = getattr(rule, "recipe", "") or rule.name
    site.facts["inv_freq_before"] = _rounded(before)
    site.facts["inv_freq_after"] = _rounded(after) if after is not None else "computed at run time"
    site.facts["mscale"] = mscale
    site.facts.update(extra)


class DynamicNTKRule(Rule):
    """HF's dynamic NTK as a graph computation: ``L = max(position ids) + 1``,
    ``s = max(factor·L/L₀ − (factor − 1), 1)``, ``θ'_i = θ_i · s^(−2i/(dim−2))``."""

    kind = "rope"
    stage = "transform"
    name = "rope.dynamic_ntk"

    def __init__(self, factor: float, original: int | None, recipe: str = ""):
        self.factor, self.original, self.recipe = float(factor), original, recipe

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        info = _site_table(site, gm)
        if isinstance(info, str):
            return info
        original = _original(site, self.original)
        if original is None:
            return "dynamic_ntk needs the trained context length: pass original=N"
        pos = site.nodes.get("positions")
        if not isinstance(pos, fx.Node) or pos.graph is not gm.graph:
            return "the position ids of the table are not a node of the top graph"
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        first = _first_user(info["inv_freq"])
        if order[pos] >= order[first]:
            return "the position ids are computed after the frequency vector is first used"
        return {**info, "positions": pos, "original": original, "insert_before": first}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        inv: fx.Node = facts["inv_freq"]
        pos: fx.Node = facts["positions"]
        g = gm.graph
        dim, f, L0 = facts["dim"], self.factor, facts["original"]
        i = torch.arange(facts["values"].numel(), dtype=torch.float64)
        expo = (-2.0 * i / (dim - 2)).to(dtype=torch.float32, device=_device(inv))
        const = _constant(gm, inv, f"longfx_rope{site.index}_ntk_exponent", expo)
        made = [const]
        nodes = []
        with g.inserting_before(facts["insert_before"]):
            def call(target, *args, **kwargs):
                n = g.call_function(target, args, kwargs)
                nodes.append(n)
                return n
            L = call(aten.add.Tensor, call(aten.amax.default, pos), 1)           # max id + 1
            s = call(aten.mul.Tensor, L, f / L0)                                 # s·L/L₀
            s = call(aten.sub.Tensor, s, f - 1)
            s = call(aten.clamp_min.default, s, 1.0)                             # L ≤ L₀: 1
            s = call(aten._to_copy.default, s, dtype=torch.float32)
            r = call(aten.pow.Tensor_Tensor, s, const)                           # [dim/2]
            r = call(aten._to_copy.default, r, dtype=facts["dtype"])
            new = call(aten.mul.Tensor, inv, r)
        _fake_values(nodes)
        inv.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new,
                                  propagate_meta=False)
        made += nodes
        _record(site, self, facts["values"], None, 1.0,
                {"dynamic_ntk": {"factor": f, "original": L0}})
        return made


def _fake_values(nodes: list[fx.Node]) -> None:
    """Propagate example values through freshly made aten nodes (best effort)."""
    for n in nodes:
        args = [G.val(a) if isinstance(a, fx.Node) else a for a in n.args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        mode = torch._guards.detect_fake_mode(tensors)
        if mode is None:
            continue
        try:
            with mode:
                v = n.target(*args, **n.kwargs)
        except Exception:  # noqa: BLE001 - meta is informative only
            continue
        ref = next(a for a in n.args if isinstance(a, fx.Node))
        n.meta[_meta_key(ref)] = v


# ==============================================================================================
# Recipes


def _positive(name: str, **values: Any) -> None:
    for k, v in values.items():
        if v is not None and not v > 0:
            raise ValueError(f"{k} must be > 0, got {v!r}")


@register("pi")
@dataclass(frozen=True)
class PI(Recipe):
    """Position interpolation (HF "linear"): every frequency divided by ``factor``."""

    factor: float = 2.0

    def __post_init__(self):
        _positive("pi", factor=self.factor)

    def rules(self) -> list:
        return [FrequencyRule("pi", lambda info, site: (pi_inv_freq(info["values"], self.factor),
                                                        1.0), str(self))]


@register("ntk")
@dataclass(frozen=True)
class NTK(Recipe):
    """NTK-aware scaling: base → base·factor^(d/(d−2)) (static)."""

    factor: float = 2.0

    def __post_init__(self):
        _positive("ntk", factor=self.factor)

    def rules(self) -> list:
        def fn(info, site):
            new = ntk_inv_freq(info["values"], self.factor, info["dim"])
            extra = {"base_after": ntk_base(info["base"], self.factor, info["dim"])} \
                if info["base"] else {}
            return new, 1.0, extra
        return [FrequencyRule("ntk", fn, str(self))]


@register("dynamic_ntk")
@dataclass(frozen=True)
class DynamicNTK(Recipe):
    """Dynamic NTK (HF "dynamic"): the base grows with the longest position seen in the call.

    ``consistent=True`` (the default): each call's queries get that call's base and the
    whole key history is re-rotated to it at the attention (passes/rope_dynamic.py), so every
    query scores every cached key with one base. ``consistent=False`` is transformers'
    documented behaviour: the call rotates its queries and its *new* keys with its base, while
    keys already in the cache keep the rotation of the call that appended them (transformers
    issue #25104). Both equal transformers' "dynamic" on a call without a cache.
    """

    factor: float = 2.0
    original: int | None = _opt(None)
    consistent: bool = _opt(True)

    def __post_init__(self):
        _positive("dynamic_ntk", factor=self.factor, original=self.original)

    def rules(self) -> list:
        if self.consistent:
            from longfx.passes.rope_dynamic import ConsistentDynamicRule

            return [ConsistentDynamicRule("ntk", self.factor, self.original, recipe=str(self))]
        return [DynamicNTKRule(self.factor, self.original, str(self))]


@register("yarn")
@dataclass(frozen=True)
class YaRN(Recipe):
    """YaRN: NTK-by-parts frequencies plus attention temperature 0.1·ln(factor)+1 on cos/sin."""

    factor: float = 4.0
    beta_fast: float = _opt(32.0)
    beta_slow: float = _opt(1.0)
    original: int | None = _opt(None)
    mscale: float | None = _opt(None)

    def __post_init__(self):
        _positive("yarn", factor=self.factor, beta_fast=self.beta_fast,
                  beta_slow=self.beta_slow, original=self.original)

    def rules(self) -> list:
        return [FrequencyRule("yarn", self._table, str(self))]

    def _table(self, info, site):
        original = _original(site, self.original)
        if original is None:
            return "yarn needs the trained context length: pass original=N"
        if not info["base"]:
            return "yarn needs the RoPE base (not detected for this site)"
        new = yarn_inv_freq(info["values"], self.factor, info["dim"], info["base"], original,
                            self.beta_fast, self.beta_slow)
        m = yarn_mscale(self.factor) if self.mscale is None else self.mscale
        return new, m, {"original": original}


@register("llama3")
@dataclass(frozen=True)
class Llama3(Recipe):
    """Llama 3.1 scaling: long wavelengths ÷ factor, short kept, smooth blend in between."""

    factor: float = 8.0
    low_freq_factor: float = _opt(1.0)
    high_freq_factor: float = _opt(4.0)
    original: int | None = _opt(None)

    def __post_init__(self):
        _positive("llama3", factor=self.factor, low_freq_factor=self.low_freq_factor,
                  high_freq_factor=self.high_freq_factor, original=self.original)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must exceed low_freq_factor")

    def rules(self) -> list:
        def fn(info, site):
            original = _original(site, self.original)
            if original is None:
                return "llama3 needs the trained context length: pass original=N"
            return llama3_inv_freq(info["values"], self.factor, original, self.low_freq_factor,
                                   self.high_freq_factor), 1.0, {"original": original}
        return [FrequencyRule("llama3", fn, str(self))]


@register("longrope")
@dataclass(frozen=True)
class LongRoPE(Recipe):
    """LongRoPE per-pair rescale factors: ``short`` up to the trained length, ``long`` beyond.

    A static graph holds one table, so the set is chosen once: ``long`` when ``length`` (the
    context the rewritten model is meant for) exceeds ``original`` or when ``length`` is not
    given, ``short`` otherwise. The attention factor is √(1 + ln s/ln L₀) with s = ``factor``,
    or ``length/original`` when ``factor`` is not given (1 when neither is).
    """

    short: tuple[float, ...] = ()
    long: tuple[float, ...] = ()
    original: int | None = _opt(None)
    length: int | None = _opt(None)
    factor: float | None = _opt(None)

    def __post_init__(self):
        _positive("longrope", original=self.original, length=self.length, factor=self.factor)
        if not self.long:
            raise ValueError("longrope needs the long factors: long=(...)")
        if any(not x > 0 for x in (*self.short, *self.long)):
            raise ValueError("rescale factors must be > 0")

    def rules(self) -> list:
        def fn(info, site):
            original = _original(site, self.original)
            if original is None:
                return "longrope needs the trained context length: pass original=N"
            use_long = self.length is None or self.length > original
            if not use_long and not self.short:
                return "longrope: length <= original needs the short factors: short=(...)"
            factors = self.long if use_long else self.short
            if len(factors) != info["values"].numel():
                return (f"longrope: {len(factors)} factors given for {info['values'].numel()} "
                        f"frequency pairs")
            s = self.factor if self.factor is not None else (
                self.length / original if self.length else 1.0)
            return (longrope_inv_freq(info["values"], factors), longrope_mscale(s, original),
                    {"original": original, "longrope_set": "long" if use_long else "short"})
        return [FrequencyRule("longrope", fn, str(self))]


@register("truncated_basis")
@dataclass(frozen=True)
class TruncatedBasis(Recipe):
    """Giraffe's truncated basis: θ ≥ b kept, a < θ < b set to rho, θ ≤ a set to 0."""

    b: float = 0.0
    a: float = 0.0
    rho: float = 0.0

    def __post_init__(self):
        if not self.b > 0:
            raise ValueError("b (the frequency at and above which θ is kept) must be > 0")
        if not 0 <= self.a <= self.b:
            raise ValueError("need 0 <= a <= b")
        if not 0 <= self.rho <= self.b:
            raise ValueError("need 0 <= rho <= b")

    def rules(self) -> list:
        def fn(info, site):
            return truncated_basis_inv_freq(info["values"], self.a, self.b, self.rho), 1.0
        return [FrequencyRule("truncated_basis", fn, str(self))]


@register("extend")
@dataclass(frozen=True)
class Extend(Recipe):
    """The recommended training-free way to reach ``to`` tokens: ``dynamic_yarn(factor=
    1.5·to/original, margin=2)`` — the model unchanged up to half its trained length, YaRN
    scaled ahead of the current length beyond it (s = 2L/L₀, capped at 1.5·to/L₀), keys
    re-rotated so the cache stays consistent (``ExtendRule``; docs/rope.md says why this
    choice, with the measurements behind it)."""

    to: int = 0
    original: int | None = _opt(None)

    def __post_init__(self):
        if not self.to > 0:
            raise ValueError("extend needs the target length: to=N")
        _positive("extend", original=self.original)

    def rules(self) -> list:
        from longfx.passes.rope_dynamic import ExtendRule

        return [ExtendRule(self.to, self.original, recipe=str(self))]
