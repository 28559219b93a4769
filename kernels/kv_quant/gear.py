"""GEAR-corrected quantized KV state: plain torch reference, any device.

GEAR (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM"): a quantized matrix ``Q`` is corrected by (1) a sparse matrix
``S`` of outliers kept exactly and (2) a low-rank approximation ``L`` of what quantization lost,
so ``X ≈ Q(X − S) + L + S``. Here it is applied per head to each block of ``group`` tokens as
the block leaves the full-precision ring (GEAR's streaming "buffer"), on top of the KIVI layout
of ``reference.py`` (keys per channel, values per token), and the corrections are **stored**:

* outliers: the ``n_out = ceil(outliers · group · D)`` entries of each ``[group, D]`` block
  farthest from the median of their quantization group (keys: their channel over the block's
  tokens; values: their token's channel group). GEAR's paper keeps the largest magnitudes;
  the distance from the group's median is the same for centred data and, for per-channel keys
  whose channels sit far from zero, picks the entries that actually stretch a group's range.
  They are replaced by that median before quantization (so they do not widen the range) and
  stored as fp16 values + int16 positions within the flattened block (int32 when
  ``group · D > 32767``).
* low rank: ``E = X − (Q(X − S) + S)`` per block ``[group, D]``, its best rank-``r``
  approximation (truncated SVD; GEAR uses power iteration for speed, the SVD is the exact
  optimum it approximates) stored as fp16 ``A = U_r·Σ_r [group, r]`` and ``B = V_rᵀ [r, D]``.

Reconstruction: ``dequantize(codes, params) + A @ B``, then the outliers written back exactly.

Extra state, per layer (Gp = packed groups = Sp / group, n = n_out, r = rank), for keys and for
values alike (prefix ``k_`` / ``v_``):

    out_val  fp16          [B, Hkv, Gp, n]
    out_idx  int16|int32   [B, Hkv, Gp, n]
    lr_a     fp16          [B, Hkv, Gp, group, r]
    lr_b     fp16          [B, Hkv, Gp, r, D]

Bytes per quantized element over bf16 (2 bytes): codes ``bits/16``, scales as in
``reference.py``, outliers ``outliers · 4 / 2``, low rank ``r · (group + D) · 2 / (group · D) / 2``.
At group = D = 64, rank 4, 1 % outliers: +0.125× (low rank) +0.02× (outliers) over plain
``kv_quant`` — ``gear`` states its own bytes (``memory_ratio``) and is not held to kv_quant's
budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longfx.kernels.kv_quant import reference as R

__all__ = ["GearConfig", "EXTRA_NAMES", "compress", "decompress", "empty_extras", "append",
           "read", "extras_bytes", "state_bytes", "memory_ratio"]

EXTRA_NAMES = ("k_out_val", "k_out_idx", "k_lr_a", "k_lr_b",
               "v_out_val", "v_out_idx", "v_lr_a", "v_lr_b")


@dataclass(frozen=True)
class GearConfig:
    """``gear(bits=4, rank=4, outliers=0.01, group=64, residual=128)``."""
    kv: R.KVQuantConfig = R.KVQuantConfig()
    rank: int = 4
    outliers: float = 0.01

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {self.rank!r}")
        if not 0.0 <= float(self.outliers) < 1.0:
            raise ValueError(f"outliers must be a fraction in [0, 1), got {self.outliers!r}")

    def n_outliers(self, head_dim: int) -> int:
        return math.ceil(self.outliers * self.kv.group * head_dim - 1e-9)

    def rank_for(self, head_dim: int) -> int:
        return min(self.rank, self.kv.group, head_dim)

    def index_dtype(self, head_dim: int) -> torch.dtype:
        return torch.int16 if self.kv.group * head_dim <= 32767 else torch.int32


# ---------------------------------------------------------------- one batch of whole groups

def _centre(x: torch.Tensor, kind: str, group: int) -> torch.Tensor:
    """Median of each element's quantization group, broadcast to x [B, Hkv, G, g, D] (fp32)."""
    if kind == "keys":                                                 # channel over g tokens
        return x.median(dim=3, keepdim=True).values.expand_as(x)
    D = x.shape[-1]
    jv = -(-D // group)
    xp = torch.nn.functional.pad(x, (0, jv * group - D), value=float("nan"))
    med = xp.unflatten(-1, (jv, group)).nanmedian(-1).values            # [B, Hkv, G, g, Jv]
    return med.repeat_interleave(group, -1)[..., :D]


def _quantize(x: torch.Tensor, kind: str, kv: R.KVQuantConfig):
    return R.quantize_keys(x, kv) if kind == "keys" else R.quantize_values(x, kv)


def _dequantize(codes, params, kind: str, kv: R.KVQuantConfig) -> torch.Tensor:
    return R.dequantize_keys(codes, params, kv) if kind == "keys" else \
        R.dequantize_values(codes, params, kv)


def compress(x: torch.Tensor, kind: str, config: GearConfig):
    """x [B, Hkv, T, D] (T whole groups) -> (codes, params, out_val, out_idx, lr_a, lr_b):
    the KIVI codes/params of x with its outliers replaced by their group's median, then the
    outliers and the rank-r factors of the remaining error (layout: module docstring)."""
    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    kv = config.kv
    B, H, T, D = x.shape
    g = kv.group
    if T % g:
        raise ValueError(f"{T} tokens are not whole groups of {g}")
    G, n_out, r = T // g, config.n_outliers(D), config.rank_for(D)
    blocks = x.float().reshape(B, H, G, g, D)                          # [B, Hkv, G, g, D]
    flat = blocks.flatten(-2)                                          # [B, Hkv, G, g·D]
    idx = torch.zeros(B, H, G, n_out, dtype=torch.int64, device=x.device)
    if n_out:
        centre = _centre(blocks, kind, g).flatten(-2)
        idx = (flat - centre).abs().topk(n_out, dim=-1).indices         # [B, Hkv, G, n]
        flat = flat.scatter(-1, idx, centre.gather(-1, idx))
    out_val = x.float().reshape(B, H, G, g * D).gather(-1, idx)         # exact outliers
    codes, params = _quantize(flat.view(B, H, T, D), kind, kv)
    approx = _dequantize(codes, params, kind, kv).view(B, H, G, g * D)
    approx = approx.scatter(-1, idx, out_val)                           # Q(X - S) + S
    err = (x.float().reshape(B, H, G, g * D) - approx).view(B, H, G, g, D)
    if r:
        u, s, vh = torch.linalg.svd(err, full_matrices=False)          # [.., g, k] [.., k] [.., k, D]
        lr_a = (u[..., :r] * s[..., None, :r]).to(torch.float16)       # [B, Hkv, G, g, r]
        lr_b = vh[..., :r, :].to(torch.float16)                        # [B, Hkv, G, r, D]
    else:
        lr_a = err.new_zeros(B, H, G, g, 0, dtype=torch.float16)
        lr_b = err.new_zeros(B, H, G, 0, D, dtype=torch.float16)
    return (codes, params, out_val.to(torch.float16), idx.to(config.index_dtype(D)),
            lr_a, lr_b)


def decompress(codes, params, out_val, out_idx, lr_a, lr_b, kind: str,
               config: GearConfig) -> torch.Tensor:
    """Inverse of ``compress``: fp32 [B, Hkv, T, D]."""
    x = _dequantize(codes, params, kind, config.kv)
    B, H, T, D = x.shape
    g = config.kv.group
    G = T // g
    x = x.view(B, H, G, g, D)
    if lr_a.shape[-1]:
        x = x + lr_a.float() @ lr_b.float()
    x = x.reshape(B, H, G, g * D)
    if out_idx.shape[-1]:
        x = x.scatter(-1, out_idx.long(), out_val.float())
    return x.view(B, H, T, D)


def roundtrip(x: torch.Tensor, kind: str, config: GearConfig) -> torch.Tensor:
    return decompress(*compress(x, kind, config), kind, config).to(x.dtype)


# ---------------------------------------------------------------- the streaming state

def empty_extras(batch: int, kv_heads: int, head_dim: int, groups: int, config: GearConfig,
                 device=None) -> dict[str, torch.Tensor]:
    """The correction tensors for ``groups`` packed groups (layout: module docstring)."""
    B, H, Gp, g, D = batch, kv_heads, groups, config.kv.group, head_dim
    n, r = config.n_outliers(D), config.rank_for(D)
    out = {}
    for p in ("k_", "v_"):
        out[p + "out_val"] = torch.zeros(B, H, Gp, n, dtype=torch.float16, device=device)
        out[p + "out_idx"] = torch.zeros(B, H, Gp, n, dtype=config.index_dtype(D), device=device)
        out[p + "lr_a"] = torch.zeros(B, H, Gp, g, r, dtype=torch.float16, device=device)
        out[p + "lr_b"] = torch.zeros(B, H, Gp, r, D, dtype=torch.float16, device=device)
    return out


def append(state: R.QuantizedKV, extras: dict[str, torch.Tensor], k: torch.Tensor,
           v: torch.Tensor, config: GearConfig) -> R.QuantizedKV:
    """``reference.append`` with GEAR's correction: whole groups leaving the ring are compressed
    (``compress``) into the state's codes/params and the ``extras``; the rest goes to the ring."""
    c = state.config
    if (c.bits, c.group, c.ring, c.scales) != (config.kv.bits, config.kv.group, config.kv.ring,
                                               config.kv.scales):
        raise ValueError(f"the state is {c}, the GEAR config is for {config.kv}")
    if k.shape != v.shape or k.dim() != 4 or k.shape[:2] != state.k_ring.shape[:2] \
            or k.shape[-1] != state.head_dim:
        raise ValueError(f"k, v must both be [B, Hkv, s, D] = {tuple(state.k_ring.shape[:2])} + "
                         f"(s, {state.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
    L, s, Rg, g = int(state.length), k.shape[2], c.ring, c.group
    if L + s > state.capacity or extras["k_lr_a"].shape[2] * g < state.k_codes.shape[2]:
        raise ValueError(f"appending {s} tokens to {L} exceeds the capacity {state.capacity} "
                         f"(or the GEAR extras hold fewer groups than the packed storage)")
    n0, n1 = R.n_packed(L, c), R.n_packed(L + s, c)
    if n1 > n0:
        pos = torch.arange(n0, n1, device=k.device)
        old = pos[pos < L]
        fresh = max(0, n1 - L)
        for p, new, ring, codes_name, params_name, kind in (
                ("k_", k, state.k_ring, "k_codes", "k_params", "keys"),
                ("v_", v, state.v_ring, "v_codes", "v_params", "values")):
            x = torch.cat((ring[:, :, old % Rg], new[:, :, :fresh]), 2)  # [B, Hkv, n1 - n0, D]
            codes, params, ov, oi, la, lb = compress(x, kind, config)
            getattr(state, codes_name)[:, :, n0:n1] = codes
            if kind == "keys":
                state.k_params[:, :, n0 // g:n1 // g] = params
            else:
                state.v_params[:, :, n0:n1] = params
            for name, t in (("out_val", ov), ("out_idx", oi), ("lr_a", la), ("lr_b", lb)):
                extras[p + name][:, :, n0 // g:n1 // g] = t
    keep = torch.arange(max(L, n1), L + s, device=k.device)
    state.k_ring[:, :, keep % Rg] = k[:, :, keep - L]
    state.v_ring[:, :, keep % Rg] = v[:, :, keep - L]
    state.length += s
    return state


def read(state: R.QuantizedKV, extras: dict[str, torch.Tensor], length: int, config: GearConfig,
         dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` tokens [B, Hkv, length, D]: packed groups decompressed (quantized +
    low rank + outliers), the rest from the ring."""
    c = state.config
    n = R.n_packed(length, c)
    G = n // c.group
    e = {name: t[:, :, :G] for name, t in extras.items()}
    k = decompress(state.k_codes[:, :, :n], state.k_params[:, :, :G], e["k_out_val"],
                   e["k_out_idx"], e["k_lr_a"], e["k_lr_b"], "keys", config)
    v = decompress(state.v_codes[:, :, :n], state.v_params[:, :, :n], e["v_out_val"],
                   e["v_out_idx"], e["v_lr_a"], e["v_lr_b"], "values", config)
    slots = torch.arange(n, length, device=k.device) % c.ring
    dt = dtype or state.k_ring.dtype
    return (torch.cat((k.to(dt), state.k_ring[:, :, slots].to(dt)), 2),
            torch.cat((v.to(dt), state.v_ring[:, :, slots].to(dt)), 2))


# ---------------------------------------------------------------- memory

def extras_bytes(extras: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in extras.values())


def state_bytes(capacity: int, kv_heads: int, head_dim: int, config: GearConfig,
                batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a GEAR state of that capacity (KIVI state + corrections), without allocating."""
    base = R.state_bytes(capacity, kv_heads, head_dim, config.kv, batch, dtype)
    groups = R.n_packed(capacity, config.kv) // config.kv.group
    return base + extras_bytes(empty_extras(batch, kv_heads, head_dim, groups, config, "meta"))


def memory_ratio(capacity: int, kv_heads: int, head_dim: int, config: GearConfig,
                 dtype: torch.dtype = torch.bfloat16) -> float:
    plain = 2 * capacity * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return state_bytes(capacity, kv_heads, head_dim, config, 1, dtype) / plain
