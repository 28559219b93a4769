"""Dense ``F.scaled_dot_product_attention`` for the dense fallbacks of the sparse and
SelfExtend ops, with GQA that never picks the quadratic-memory path.

``enable_gqa=True`` is taken only by the flash and math backends on CUDA (PyTorch 2.5+ SDPA
docs). Flash takes neither fp32 nor an explicit mask, so an fp32 (or masked) GQA call falls to
the math backend, which materialises the [B, H, S, Skv] scores: 9 GiB and an out-of-memory
error for SmolLM2 (fp32, 9 query / 3 kv heads) at 32k tokens in one call on an H100
(2026-11-24). There the kv heads are repeated instead (k·G extra bytes, linear in the length)
so the memory-efficient backend runs. Elsewhere (fp16/bf16 without a mask, or CPU) the call
is ``enable_gqa`` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longfx.kernels.attention.reference import expand_kv


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask=None,
         is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` with k/v [B, Hkv, Skv, D] shared by
    H / Hkv query heads each (GQA), q [B, H, S, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.is_cuda and (q.dtype == torch.float32 or attn_mask is not None):
        k, v = expand_kv(q, k), expand_kv(q, v)                     # [B, H, Skv, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])
