"""``longfx::self_extend_attention`` — attention with SelfExtend's grouped far positions.

What the ``self_extend`` recipe turns a ``longfx::attention`` site into (semantics:
reference.py). Lowering: the blocked implementation (blocked.py) on every device for now;
the fused CUDA kernel (re-rotation in the Q/K load) is not written yet.
"""
from __future__ import annotations

import torch

from longfx.kernels.self_extend import blocked, reference


@torch.library.custom_op("longfx::self_extend_attention", mutates_args=())
def self_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_keep: torch.Tensor | None, scale: float, softcap: float,
                          group: int, window: int, inv_freq: torch.Tensor,
                          rope_style: str) -> torch.Tensor:
    reference.check_args(q, k, v, key_keep, group, window, inv_freq, rope_style)
    return blocked.self_extend_attention(q, k, v, key_keep, scale, softcap, group, window,
                                         inv_freq, rope_style)


@self_extend_attention.register_fake
def _(q, k, v, key_keep, scale, softcap, group, window, inv_freq, rope_style):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.self_extend_attention.default
