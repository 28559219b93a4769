"""Cache-consistent dynamic RoPE scaling: the run-time pieces the ``dynamic_*`` rule inserts.

Dynamic scaling picks the scale ``s`` from the longest position of the current call, so the
frequencies change as a sequence grows. transformers' ``"dynamic"`` rotates each call's new
keys with that call's frequencies and keeps older keys as they were rotated (issue #25104):
a query then scores cached keys with a mix of frequencies. Here the KV state keeps every key
rotated with the model's own frequencies θ (the k application is left alone), and at the
attention each call re-rotates the whole key history by ``pos_j · (θ(s) − θ)`` — the
composition of two rotations of one pair is the rotation by the sum of the angles, so every key
is read exactly as if it had been rotated by ``pos_j · θ(s)``, the same frequencies as the
query. Scores depend on ``t − j`` only, whatever call appended the key (PIE, "re-rotating
cached keys", is the same idea). The cost is one pass over the cached keys per call and layer.

Scale rules (L = max position id + 1 of the call, L₀ the trained length, f the factor):

* ``ntk`` (transformers ``"dynamic"``): s = max(f·L/L₀ − (f − 1), 1), θ'_i = θ_i·s^(−2i/(d−2)).
* ``yarn`` (YaRN, Peng et al. 2023, with the scale of "dynamic" YaRN in its reference code):
  s = clamp(m·L/L₀, 1, f) with the margin m (1 in YaRN's code: the scale just covers the
  length; m > 1 runs the scale ahead of the length, see ``scale_of``), θ'_i = θ_i·(γ_i/s + 1 − γ_i) with YaRN's ramp γ (1: interpolate),
  and its attention temperature 0.1·ln(s) + 1 on both q and k — applied here as its square on
  the query's tables, since the keys are not re-tabled.

At L ≤ L₀ both give s = 1: the tables equal the model's and the re-rotation is the identity.
"""
from __future__ import annotations

import math

import torch

from longfx.kernels.rope.reference import STYLES

METHODS = ("ntk", "yarn")


def ntk_exponent(n: int, dim: int) -> torch.Tensor:
    """−2i/(d−2) for the n pairs: θ_i·s^e_i is the NTK-aware base change b → b·s^(d/(d−2))."""
    i = torch.arange(n, dtype=torch.float64)
    return (-2.0 * i / (dim - 2)).float()


def scale_of(positions: torch.Tensor, original: int, factor: float, method: str,
             margin: float = 1.0, start: float | None = None, above: int = 0) -> torch.Tensor:
    """The call's scale ``s`` (0-d float32) from its position ids (any shape).

    ``margin`` (yarn only) multiplies the length before the clamp: with m = 2 a 16k call on a
    model trained at 8k gets s = 4, not 2. An interpolated model retrieves poorly when its
    longest distance sits right at the edge of the (scaled) trained range — transformers'
    ``"dynamic"`` NTK builds in the same kind of headroom with its f·L/L₀ − (f − 1).

    ``start`` (yarn only, a multiple of L₀, e.g. 0.5 or 2) moves where the scale leaves 1:
    s = 1 + m·(L/L₀ − start), so the margin becomes the slope. None: 1/m, which is the plain s = m·L/L₀ (kept as
    its own expression so that rule's numbers do not move).

    ``above`` (yarn only, tokens; 0: off) holds s = 1 while L ≤ ``above`` and lets the schedule
    apply from the next token on: the scale jumps there instead of rising from 1. It is the
    frequency half of the hand-over from ``self_extend(..., until=above)``, which needs the
    model's own frequencies while it runs (docs/rope.md, "extend")."""
    L = positions.reshape(-1).amax(0).to(torch.float32) + 1        # (a dim: ONNX export needs one)
    if method == "ntk":
        return torch.clamp_min(factor * L / original - (factor - 1), 1.0)
    if method != "yarn":
        raise ValueError(f"unknown dynamic method {method!r}; expected one of {METHODS}")
    if start is not None:
        s = torch.clamp(1 + margin * (L / original - start), 1.0, float(factor))
    else:
        s = torch.clamp(margin * L / original, 1.0, float(factor))
    return torch.where(L > above, s, torch.ones_like(s)) if above else s


def scaled_inv_freq(inv: torch.Tensor, s: torch.Tensor, method: str,
                    shape: torch.Tensor) -> torch.Tensor:
    """θ(s) [n] float32. ``shape``: the NTK exponents, or YaRN's ramp γ (1: interpolate)."""
    inv = inv.reshape(-1).to(torch.float32)
    if method == "ntk":
        return inv * s ** shape
    return inv * (shape / s + (1 - shape))


def temperature(s: torch.Tensor, method: str, mscale: float = 1.0) -> torch.Tensor:
    """The factor on q·k: YaRN's (0.1·mscale·ln s + 1)², 1 for NTK. ``mscale`` multiplies the
    paper's 0.1 (DeepSeek-V2's ``yarn_get_mscale(scale, mscale)`` convention; 1 = the paper)."""
    if method == "yarn":
        return (0.1 * mscale * torch.log(s) + 1) ** 2
    return torch.ones_like(s)


def _layout(angle: torch.Tensor, style: str) -> torch.Tensor:
    """Per-pair angles [..., n] → the table layout of the style: rotate_half ``cat(a, a)``,
    interleaved ``repeat_interleave(a, 2)``, complex one value per pair."""
    if style == "rotate_half":
        return torch.cat((angle, angle), dim=-1)
    if style == "interleaved":
        return torch.repeat_interleave(angle, 2, dim=-1)
    if style == "complex":
        return angle
    raise ValueError(f"unknown RoPE style {style!r}; expected one of {STYLES}")


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[Bp, S, R] → the rank/axis order of the model's table ``like``: [B, 1, S, R] (heads
    second), [B, S, 1, R] (heads third), [B, S, R] or [S, R]."""
    if like.dim() == 3:
        return t
    if like.dim() == 2:
        return t[0]
    if like.dim() == 4 and like.shape[1] == 1:
        return t.unsqueeze(1)
    if like.dim() == 4 and like.shape[2] == 1:
        return t.unsqueeze(2)
    raise ValueError(f"unsupported RoPE table layout {tuple(like.shape)}")


def query_tables(positions: torch.Tensor, inv_s: torch.Tensor, temp: torch.Tensor, style: str,
                 like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the call's positions at frequencies θ(s), times the temperature,
    in the layout and dtype of the model's table ``like``."""
    pos = positions.reshape(-1, positions.shape[-1]).to(torch.float32)       # [Bp, S]
    angle = pos[..., None] * inv_s                                            # [Bp, S, n]
    emb = _layout(angle, style)
    cos, sin = emb.cos() * temp, emb.sin() * temp
    return _like(cos, like).to(like.dtype), _like(sin, like).to(like.dtype)


def key_positions(positions: torch.Tensor, skv: int) -> torch.Tensor:
    """[Bp, Skv] positions of the cached keys: the keys end where the call's queries end
    (KV-cache alignment; rows left-padded by HF's cumsum positions stay aligned)."""
    pos = positions.reshape(-1, positions.shape[-1])
    last = pos[:, -1:].to(torch.float32)                                      # [Bp, 1]
    offs = torch.arange(skv, device=pos.device, dtype=torch.float32) - (skv - 1)
    return last + offs                                                        # [Bp, Skv]


def rerotate_keys(k: torch.Tensor, positions: torch.Tensor, inv: torch.Tensor,
                  inv_s: torch.Tensor, style: str, rotary_dim: int) -> torch.Tensor:
    """Keys [B, Hkv, Skv, D] rotated with θ at their positions → rotated with θ(s): a further
    rotation by ``pos_j · (θ(s) − θ)`` on the first ``rotary_dim`` channels."""
    from longfx.kernels.rope import reference

    pos = key_positions(positions, k.shape[-2])                               # [Bp, Skv]
    delta = (inv_s - inv.reshape(-1).to(torch.float32))                       # [n]
    angle = _layout(pos[..., None] * delta, style)                            # [Bp, Skv, R]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]                     # [Bp, 1, Skv, R]
    if style != "complex":
        cos, sin = cos.to(k.dtype), sin.to(k.dtype)
    return reference.rope(k, cos, sin, style, rotary_dim).to(k.dtype)


def yarn_gamma(n: int, dim: int, base: float, original: int, beta_fast: float,
               beta_slow: float) -> torch.Tensor:
    """YaRN's ramp γ_i (1: the pair is interpolated, 0: kept), float32 — the same ramp the
    static ``yarn`` recipe uses (passes/rope.py ``yarn_inv_freq``)."""
    from longfx.passes.rope import yarn_inv_freq

    ones = torch.ones(n, dtype=torch.float64)
    # yarn_inv_freq(1, f=2) = γ/2 + (1 − γ) = 1 − γ/2  →  γ = 2·(1 − value)
    gamma = 2 * (1 - yarn_inv_freq(ones, 2.0, dim, base, original, beta_fast, beta_slow))
    return gamma.clamp(0, 1).float()


def mscale_of(s: float) -> float:
    """YaRN's √(1/t) at a given scale (for reports)."""
    return 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0
