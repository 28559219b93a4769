"""Reference SelfExtend attention (Jin et al. 2024, "LLM Maybe LongLM"): plain torch, dense.

Training-free context extension by remapping positions inside attention: a key within the
``window`` nearest positions is scored at its true distance; a farther key is scored at a
*grouped* distance, with query and key positions floor-divided by ``group`` and the query
shifted so both regimes meet at the window edge::

    d(p, j) = p − j                                     if p − j < window     (neighbour)
            = (p // group + window − window // group) − j // group   otherwise  (grouped)

so the largest distance the model sees at context N is about N/group + window − window/group,
which stays inside the trained length. One softmax over the merged scores — the two attention
passes of the paper's code fused into one.

The cache holds keys already rotated at their own positions j and the query at p (the
KV-cache convention of ``longfx::sparse_attention``: query i at p = Skv − S + i). Rotations
compose, so the grouped scores come from re-rotating: q by (q_group_pos − p) and each key by
(j // group − j), on the first 2·len(inv_freq) channels with pairing ``rope_style``
(``reference.rotate_back`` of the sparse op). Because the frequencies never change with the
length, cached keys stay valid: the method is consistent in decode.

Shapes: q [B, H, S, D]; k [B, Hkv, Skv, D]; v [B, Hkv, Skv, Dv]; key_keep [B, Skv] bool or None.
"""
from __future__ import annotations

import torch

from longfx.kernels.attention.reference import expand_kv
from longfx.kernels.sparse_attention.reference import PAIRINGS, positions, rotate_back


def grouped_positions(qp: torch.Tensor, kp: torch.Tensor, group: int, window: int):
    """(query positions, key positions) of the grouped regime."""
    return qp // group + (window - window // group), kp // group


def effective_window(keys: int, window: int, until: int = 0) -> int:
    """The neighbour window a call over ``keys`` keys uses: ``window``, or every key (plain
    causal attention: all distances true) when ``until`` > 0 and ``keys`` > ``until``."""
    if until < 0:
        raise ValueError(f"until must be >= 0 (0: no limit), got {until}")
    return max(window, keys) if until and keys > until else window


def check_args(q, k, v, key_keep, group, window, inv_freq, rope_style) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("self_extend attention takes [B, H, S, D] tensors")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"{q.shape[2]} queries but only {k.shape[2]} keys: queries must be the "
                         f"last positions of the keys (KV-cache convention)")
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got group={group}, window={window}")
    if inv_freq is None or inv_freq.dim() != 1 or 2 * inv_freq.numel() > q.shape[-1]:
        raise ValueError("self_extend needs the rotary frequencies inv_freq [R/2], R <= head dim")
    if rope_style not in PAIRINGS:
        raise ValueError(f"rope_style must be one of {PAIRINGS}, got {rope_style!r}")
    if key_keep is not None and key_keep.shape[-1] != k.shape[2]:
        raise ValueError(f"key_keep has {key_keep.shape[-1]} keys, k has {k.shape[2]}")


def grouped_qk(q, k, qp, kp, group, window, inv_freq, rope_style):
    """q and k re-rotated to the grouped positions."""
    gq, gk = grouped_positions(qp, kp, group, window)
    inv = inv_freq.to(q.device)
    qg = rotate_back(q, qp - gq, inv, rope_style)          # now at position gq
    kg = rotate_back(k, kp - gk, inv, rope_style)          # now at position gk
    return qg, kg


def self_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_keep: torch.Tensor | None, scale: float | None, softcap: float,
                          group: int, window: int, inv_freq: torch.Tensor,
                          rope_style: str = "rotate_half", until: int = 0) -> torch.Tensor:
    check_args(q, k, v, key_keep, group, window, inv_freq, rope_style)
    window = effective_window(k.shape[2], window, until)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s, skv = q.shape[2], k.shape[2]
    qp, kp = positions(s, skv, q.device)
    qg, kg = grouped_qk(q, k, qp, kp, group, window, inv_freq, rope_style)
    k, kg, v = expand_kv(q, k), expand_kv(q, kg), expand_kv(q, v)
    near = torch.matmul(q, k.transpose(-1, -2)) * scale                  # [B, H, S, Skv]
    far = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    d = qp[:, None] - kp[None, :]                                        # [S, Skv]
    scores = torch.where(d < window, near, far)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keep = (d >= 0)[None, None]
    if key_keep is not None:
        keep = keep & key_keep.bool()[:, None, None, :]
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v)
