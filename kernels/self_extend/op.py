"""``longfx::self_extend_attention`` — attention with SelfExtend's grouped far positions.

What the ``self_extend`` recipe turns a ``longfx::attention`` site into (semantics:
reference.py). Lowering, chosen per call: on CUDA tensors with Triton installed, the fused
flash kernel (triton.py: neighbour and grouped scores from one load of each KV tile, the
re-rotation of q and k fused into their loads, one online softmax); elsewhere, or for inputs
the kernel does not take, the blocked implementation (blocked.py). Both run dense SDPA when
the context fits in the neighbour window (exact: every distance is the true one).

``until`` (0: always on): with more than ``until`` keys the op is plain causal attention —
SelfExtend for contexts up to ``until``, the model's own positions beyond (for a frequency
recipe to take over there, docs/rope.md).
"""
from __future__ import annotations

import torch

from longfx.kernels.self_extend import blocked, reference


def _triton_impl():
    try:
        from longfx.kernels.self_extend import triton as impl
    except Exception:  # noqa: BLE001 - no triton, or no CUDA build: the blocked path serves
        return None
    return impl if getattr(impl, "AVAILABLE", False) else None


def _on_gpu(q: torch.Tensor) -> bool:
    return q.is_cuda


@torch.library.custom_op("longfx::self_extend_attention", mutates_args=())
def self_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_keep: torch.Tensor | None, scale: float, softcap: float,
                          group: int, window: int, inv_freq: torch.Tensor,
                          rope_style: str, until: int = 0) -> torch.Tensor:
    reference.check_args(q, k, v, key_keep, group, window, inv_freq, rope_style)
    window = reference.effective_window(k.shape[2], window, until)
    if _on_gpu(q):
        impl = _triton_impl()
        if impl is not None and impl.supports(q, k, v, key_keep, inv_freq):
            return impl.self_extend_attention(q, k, v, key_keep, scale, softcap, group, window,
                                              inv_freq, rope_style)
    return blocked.self_extend_attention(q, k, v, key_keep, scale, softcap, group, window,
                                         inv_freq, rope_style)


@self_extend_attention.register_fake
def _(q, k, v, key_keep, scale, softcap, group, window, inv_freq, rope_style, until=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.self_extend_attention.default
