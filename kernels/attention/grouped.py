"""GQA attention with the query-head group folded into the query rows: no repeated K/V.

Under grouped-query attention (Ainslie et al. 2023) the H / Hkv query heads of a group read
the same K and V. The reference (reference.py) repeats K and V to H heads first, as
transformers' ``repeat_kv`` does; for a decode step over a long cache that copy is most of the
step (32 query / 8 KV heads, head_dim 128, 128k keys, bf16: 2 GiB written and read again per
layer). Here the group's query heads become extra query rows of their KV head instead,

    q [B, H, S, D] -> [B, Hkv, G·S, D]        (head h = kv·G + g, the order repeat_kv uses)

so K and V are read once, straight from the cache; the same layout FlashInfer's and vLLM's
decode kernels use for GQA. The arithmetic is the reference's (scores in the input dtype,
softmax in float32), so the result equals the reference up to the matmul's float rounding.

It applies where folding keeps every row's mask: no ``is_causal`` (top-left causality is per
query row, which folding would shift) and a mask that does not vary over the heads
(size 1 in the head dimension, or absent).
"""
from __future__ import annotations

import torch

from longfx.kernels.attention.reference import weigh


def applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether ``attention`` can run this call: 4-D GQA, no ``is_causal``, a head-shared mask."""
    if q.dim() != 4 or k.dim() != 4 or is_causal:
        return False
    if q.shape[1] == k.shape[1] or q.shape[1] % k.shape[1]:
        return False
    return mask is None or mask.dim() < 3 or (mask.dim() == 4 and mask.shape[1] == 1) \
        or (mask.dim() == 3 and mask.shape[0] == 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ·scale [→ softcap] [+ mask])·v for q [B, H, S, D], k/v [B, Hkv, Skv, D]
    with H = G·Hkv; ``mask`` bool (True = attend) or float, broadcastable to [B, 1, S, Skv]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    b, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qf = q.reshape(b, hkv, g * s, d)                                   # [B, Hkv, G·S, D]
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale             # [B, Hkv, G·S, Skv]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    m = mask
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)                                         # [b|1, 1, S|1, Skv]
        if m.shape[2] != 1:                                            # row r = g·S + s reads s
            m = m.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(m.shape[0], 1, g * s, -1)
    out = weigh(scores, m, None, v)                                    # [B, Hkv, G·S, Dv]
    return out.reshape(b, h, s, v.shape[-1])                           # [B, H, S, Dv]
