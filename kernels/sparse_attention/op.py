"""``longfx::sparse_attention`` — attention under a mask *spec* (sink + window + causal).

What sparse recipes turn a ``longfx::attention`` site into. The arguments carry the spec
(``sink``, ``window``, the LM-Infinite distance ``cap`` with the rotary ``inv_freq`` and
channel pairing it needs) and at most a per-key padding vector ``key_keep`` [B, Skv] — never a
dense [S, Skv] mask. Semantics: reference.py. Lowering, chosen per call from the device and
the shapes: the Triton block-sparse kernel on CUDA (triton.py) when it is installed, else the
blocked gather (blocked.py) — both fall back to dense SDPA when the spec keeps every causal key.
"""
from __future__ import annotations

import torch

from longfx.kernels.sparse_attention import blocked, reference


def _triton_impl():
    try:
        from longfx.kernels.sparse_attention import triton as impl
    except Exception:  # noqa: BLE001 - no triton, or no CUDA build: the blocked path serves
        return None
    return impl if getattr(impl, "AVAILABLE", False) else None


@torch.library.custom_op("longfx::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_keep: torch.Tensor | None, scale: float, softcap: float, sink: int,
                     window: int, cap: int, inv_freq: torch.Tensor | None,
                     rope_style: str) -> torch.Tensor:
    reference.check_args(q, k, v, key_keep, sink, window, cap, inv_freq, rope_style)
    if q.is_cuda:
        impl = _triton_impl()
        if impl is not None and impl.supports(q, k, v, key_keep, softcap, cap):
            return impl.sparse_attention(q, k, v, key_keep, scale, softcap, sink, window, cap,
                                         inv_freq, rope_style)
    return blocked.sparse_attention(q, k, v, key_keep, scale, softcap, sink, window, cap,
                                    inv_freq, rope_style)


@sparse_attention.register_fake
def _(q, k, v, key_keep, scale, softcap, sink, window, cap, inv_freq, rope_style):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.sparse_attention.default
