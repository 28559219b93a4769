"""Reference sparse attention: plain torch over a dense mask, obviously correct, any device.

The mask is a *spec*, not a tensor: ``sink`` first keys, a ``window`` of recent keys, causal,
optionally and-ed with a per-key padding vector. Positions follow the KV-cache convention
(bottom-right alignment): with S queries over Skv keys, query i sits at absolute position
``p_i = Skv - S + i`` and key j at position j, so prefill (S == Skv), chunked prefill and
decode (S == 1) are one rule::

    visible(i, j) = j <= p_i  and  (window <= 0  or  j < sink  or  p_i - j < window)
                    and key_keep[b, j]

This is StreamingLLM's attention sinks + sliding window (Xiao et al. 2023) and LM-Infinite's
Λ-shaped mask (Han et al. 2023); ``sink=0`` is a plain sliding window (Mistral, Gemma local
layers: HF writes it ``kv_idx > q_idx - sliding_window``, the same rule).

``cap`` > 0 adds LM-Infinite's distance ceiling for rotary models: a sink key is scored as if
the query stood at position ``min(p_i, cap)``, so no query–key distance the model sees exceeds
``cap`` (its training length). The keys in the cache are already rotated at their own
positions and the query at ``p_i``; rotating the query back by ``δ_i = max(0, p_i − cap)``
(``inv_freq``, channel pairing ``rope_style``) gives that score exactly, because rotations
compose: R(−δ)·R(p)·q = R(p − δ)·q. Every window key is within ``window <= cap`` already.
The rotated channels are the first ``2 * len(inv_freq)``; the rest pass through.

Shapes: q [B, H, S, D]; k [B, Hkv, Skv, D]; v [B, Hkv, Skv, Dv]; H % Hkv == 0 (query head h
reads kv head h // (H / Hkv)); key_keep [B, Skv] bool or None. Scores in the input dtype,
softmax in float32; fully masked rows give zeros (SDPA's convention).
"""
from __future__ import annotations

import torch

from longfx.kernels.attention.reference import expand_kv

PAIRINGS = ("rotate_half", "interleaved", "complex")


def positions(s: int, skv: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute query positions [S] and key positions [Skv] (bottom-right aligned)."""
    qp = torch.arange(skv - s, skv, device=device)
    kp = torch.arange(skv, device=device)
    return qp, kp


def visible(qp: torch.Tensor, kp: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """The keep-matrix [S, Skv] of the spec for query positions ``qp`` and key positions ``kp``."""
    d = qp[:, None] - kp[None, :]                                  # [S, Skv] distance
    keep = d >= 0
    if window > 0:
        keep = keep & ((kp[None, :] < sink) | (d < window))
    return keep


def rotate_back(q: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor,
                rope_style: str) -> torch.Tensor:
    """Rotate q [B, H, S, D] by −delta[S] positions on its first 2·len(inv_freq) channels."""
    if rope_style not in PAIRINGS:
        raise ValueError(f"rope_style must be one of {PAIRINGS}, got {rope_style!r}")
    half = inv_freq.numel()
    angle = -delta.double()[:, None] * inv_freq.double()[None, :]          # [S, R/2]
    cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
    rot, rest = q[..., : 2 * half], q[..., 2 * half:]
    if rope_style == "rotate_half":
        x1, x2 = rot[..., :half], rot[..., half:]                         # pairs (i, i + R/2)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]                           # pairs (2i, 2i + 1)
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


def check_args(q, k, v, key_keep, sink, window, cap, inv_freq, rope_style) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sparse attention takes [B, H, S, D] tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"{q.shape[2]} queries but only {k.shape[2]} keys: queries must be the "
                         f"last positions of the keys (KV-cache convention)")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if key_keep is not None and key_keep.shape[-1] != k.shape[2]:
        raise ValueError(f"key_keep has {key_keep.shape[-1]} keys, k has {k.shape[2]}")
    if cap > 0:
        if inv_freq is None:
            raise ValueError("cap > 0 needs the rotary frequencies (inv_freq)")
        if window <= 0 or window > cap:
            raise ValueError(f"cap={cap} needs a window in 1..cap (got {window}): keys in the "
                             f"window are read at their true distance")
        if rope_style not in PAIRINGS:
            raise ValueError(f"rope_style must be one of {PAIRINGS}, got {rope_style!r}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_keep: torch.Tensor | None = None, scale: float | None = None,
                     softcap: float = 0.0, sink: int = 0, window: int = 0, cap: int = 0,
                     inv_freq: torch.Tensor | None = None,
                     rope_style: str = "rotate_half") -> torch.Tensor:
    check_args(q, k, v, key_keep, sink, window, cap, inv_freq, rope_style)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s, skv = q.shape[2], k.shape[2]
    qp, kp = positions(s, skv, q.device)
    k, v = expand_kv(q, k), expand_kv(q, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                 # [B, H, S, Skv]
    if cap > 0 and sink > 0:
        delta = (qp - cap).clamp(min=0)
        qc = rotate_back(q, delta, inv_freq.to(q.device), rope_style)
        capped = torch.matmul(qc, k.transpose(-1, -2)) * scale
        is_sink = (kp < sink)[None, :] & (delta[:, None] > 0)             # [S, Skv]
        scores = torch.where(is_sink, capped, scores)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keep = visible(qp, kp, sink, window)[None, None]                      # [1, 1, S, Skv]
    if key_keep is not None:
        keep = keep & key_keep.bool()[:, None, None, :]
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v)


def row_counts(s: int, skv: int, sink: int, window: int) -> torch.Tensor:
    """Keys each query keeps under the spec (int64 [S]), without building the mask."""
    p = torch.arange(skv - s, skv, dtype=torch.int64)
    causal = p + 1
    if window <= 0:
        return causal
    far = (p + 1 - window).clamp(min=0)                     # keys left of the window
    return torch.minimum(causal, window + torch.clamp(far, max=sink))


def density(s: int, skv: int, sink: int, window: int) -> float:
    """Kept query–key pairs over causal pairs (1.0: the spec keeps everything causal keeps)."""
    if s == 0:
        return 1.0
    kept = row_counts(s, skv, sink, window).sum()
    causal = row_counts(s, skv, 0, 0).sum()
    return float(kept) / float(causal)
