"""SelfExtend attention in query blocks: the CPU lowering (and any-device fallback).

Same math as reference.py, one block of ``block`` queries at a time over the keys it can see
([0, P1]), so memory is [block, Skv] scores instead of [S, Skv]. Keys are re-rotated to their
grouped positions once per call. When the whole context fits in the neighbour window
(Skv <= window) every distance is the true one and the site runs dense causal SDPA: short
prompts pay nothing for the extension.
"""
from __future__ import annotations

import torch

from longfx.kernels.attention import dense
from longfx.kernels.self_extend.reference import grouped_positions
from longfx.kernels.sparse_attention.reference import positions, rotate_back

BLOCK = 1024


def self_extend_attention(q, k, v, key_keep, scale, softcap, group, window, inv_freq,
                          rope_style, block: int = BLOCK) -> torch.Tensor:
    s, skv = q.shape[2], k.shape[2]
    if skv <= window and key_keep is None and not softcap and s in (1, skv):
        return dense.sdpa(q, k, v, is_causal=s == skv and s > 1, scale=scale)
    qp_all, kp_all = positions(s, skv, q.device)
    inv = inv_freq.to(q.device)
    gq_all, gk_all = grouped_positions(qp_all, kp_all, group, window)
    kg_all = rotate_back(k, kp_all - gk_all, inv, rope_style)          # [B, Hkv, Skv, D]
    groups = q.shape[1] // k.shape[1]
    pad = None if key_keep is None else key_keep.bool()[:, None, None, :]
    outs = []
    for i0 in range(0, s, block):
        i1 = min(s, i0 + block)
        qp = qp_all[i0:i1]
        n = int(qp[-1]) + 1                                             # keys [0, P1]
        qb = q[:, :, i0:i1]
        qg = rotate_back(qb, qp - gq_all[i0:i1], inv, rope_style)
        kb, kgb, vb = k[:, :, :n], kg_all[:, :, :n], v[:, :, :n]
        if groups > 1:
            kb, kgb, vb = (x.repeat_interleave(groups, dim=1) for x in (kb, kgb, vb))
        d = qp[:, None] - kp_all[None, :n]                              # [Sq, n]
        near = torch.matmul(qb, kb.transpose(-1, -2)) * scale          # [B, H, Sq, n]
        far = torch.matmul(qg, kgb.transpose(-1, -2)) * scale
        scores = torch.where(d < window, near, far)
        del near, far
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        keep = (d >= 0)[None, None]
        if pad is not None:
            keep = keep & pad[..., :n]
        scores = scores.float().masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(probs.to(vb.dtype), vb))
    return torch.cat(outs, dim=2)
