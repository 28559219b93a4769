"""Dense ``F.scaled_dot_product_attention`` for the dense fallbacks of the sparse and
SelfExtend ops, with GQA that never picks the quadratic-memory path.

``enable_gqa=True`` is taken only by the flash and math backends on CUDA (PyTorch 2.5+ SDPA
docs). Flash takes neither fp32 nor an explicit mask, so an fp32 (or masked) GQA call falls to
the math backend, which materialises the [B, H, S, Skv] scores: 9 GiB and an out-of-memory
error for SmolLM2 (fp32, 9 query / 3 kv heads) at 32k tokens in one call on an H100
(2026-11-24). There the kv heads are repeated instead (k·G extra bytes, linear in the length)
so the memory-efficient backend runs. Elsewhere (fp16/bf16 without a mask, or CPU) the call
is ``enable_gqa`` unchanged.

cuDNN is never chosen (``BACKENDS``). SDPA picks it first on an H100 (torch 2.11, cuDNN 9.19)
and it builds an execution plan for every new shape (pytorch/pytorch#155958 made an opt-in
ragged path, TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, for exactly this), and the calls here change
shape on every use: a decode step's key length grows by one, a prefill chunk's by the chunk.
Measured on that H100 (2026-11-24, bf16, 32 query / 8 KV heads, D 128): one-query decode over
growing lengths 37.7 / 40.5 ms a call at 32k / 128k keys left to choose, 0.12 / 0.28 ms with
flash (benchmarks/experiment_sdpa_decode_lengths.py, results/debug/sdpa_decode_lengths_h100.json);
1024-query chunks over 17k-29k keys with the bottom-right causal mask 64.4 ms a chunk left to
choose, 3.9 ms without cuDNN (benchmarks/experiment_sdpa_prefill_chunks.py,
results/debug/sdpa_prefill_chunks_h100.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longfx.kernels.attention.reference import expand_kv

# every SDPA backend but cuDNN (module docstring: a plan per shape)
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask=None,
         is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` with k/v [B, Hkv, Skv, D] shared by
    H / Hkv query heads each (GQA), q [B, H, S, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.is_cuda and (q.dtype == torch.float32 or attn_mask is not None):
        k, v = expand_kv(q, k), expand_kv(q, v)                     # [B, H, Skv, D]
    with sdpa_kernel(BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=q.shape[1] != k.shape[1])
