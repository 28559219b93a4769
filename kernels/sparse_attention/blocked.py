"""Sparse attention that reads only the kept keys: the CPU lowering (and any-device fallback).

Queries are taken in blocks of ``block`` rows. A block whose positions run from P0 to P1 needs
at most the sink keys ``[0, min(sink, P1 + 1))`` and the window keys ``[lo, P1]`` with
``lo = max(sinks, P0 − window + 1)``; those two slices are gathered and attended with the spec's
keep-matrix for that block only ([block, sink + window + block] booleans). Work and memory
follow the kept keys, not the context: decode at 128k with a 1k window reads ~1k keys.

When the spec keeps every causal key (no window, or a window covering the whole context),
the site runs dense ``F.scaled_dot_product_attention`` — the dense fallback, so the rewrite is
never slower than the model it replaced. Semantics are exactly those of reference.py.
"""
from __future__ import annotations

import torch

from longfx.kernels.attention import dense
from longfx.kernels.sparse_attention.reference import positions, rotate_back, visible

BLOCK = 1024


def covers_all(s: int, skv: int, window: int) -> bool:
    """True when the window hides no causal key (every query sees all keys up to itself)."""
    return window <= 0 or window >= skv


def _attend(q, k, v, keep, scale, softcap, qc=None, n_sink=0):
    """softmax(q·kᵀ) v over gathered keys; keep [.., Sq, Sk] bool. ``qc`` scores the first
    ``n_sink`` keys (the capped query); GQA is read without copying k/v when possible."""
    groups = q.shape[1] // k.shape[1]
    if qc is None and not softcap:
        out = dense.sdpa(q, k, v, attn_mask=keep, scale=scale)
        return out.nan_to_num(0.0)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)                      # [B, H, Sk, D]
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale           # [B, H, Sq, Sk]
    if qc is not None and n_sink:
        capped = torch.matmul(qc, k[:, :, :n_sink].transpose(-1, -2)) * scale
        scores = torch.cat((capped, scores[..., n_sink:]), dim=-1)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_keep: torch.Tensor | None, scale: float, softcap: float, sink: int,
                     window: int, cap: int, inv_freq: torch.Tensor | None, rope_style: str,
                     block: int = BLOCK) -> torch.Tensor:
    s, skv = q.shape[2], k.shape[2]
    pad = None if key_keep is None else key_keep.bool()[:, None, None, :]   # [B, 1, 1, Skv]
    if covers_all(s, skv, window) and not softcap:
        if pad is None and s == skv:
            return dense.sdpa(q, k, v, is_causal=True, scale=scale)
        if pad is None and s == 1:
            return dense.sdpa(q, k, v, scale=scale)
    qp_all, _ = positions(s, skv, q.device)
    outs = []
    for i0 in range(0, s, block):
        i1 = min(s, i0 + block)
        qp = qp_all[i0:i1]
        p0, p1 = int(qp[0]), int(qp[-1])
        n_sink = min(sink, p1 + 1) if window > 0 else 0
        lo = max(n_sink, p0 - window + 1) if window > 0 else 0
        kp = torch.cat((torch.arange(n_sink, device=q.device),
                        torch.arange(lo, p1 + 1, device=q.device)))          # [Sk]
        if n_sink:
            kb = torch.cat((k[:, :, :n_sink], k[:, :, lo:p1 + 1]), dim=2)    # [B, Hkv, Sk, D]
            vb = torch.cat((v[:, :, :n_sink], v[:, :, lo:p1 + 1]), dim=2)
        else:
            kb, vb = k[:, :, lo:p1 + 1], v[:, :, lo:p1 + 1]
        keep = visible(qp, kp, sink, window)[None, None]                      # [1, 1, Sq, Sk]
        if pad is not None:
            keep = keep & pad[..., kp]
        qb = q[:, :, i0:i1]
        qc = None
        if cap > 0 and n_sink and p1 > cap:          # sinks scored from min(p, cap)
            qc = rotate_back(qb, (qp - cap).clamp(min=0), inv_freq.to(q.device), rope_style)
        outs.append(_attend(qb, kb, vb, keep, scale, softcap, qc, n_sink if qc is not None else 0))
    return torch.cat(outs, dim=2)
