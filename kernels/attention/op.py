"""``longfx::attention`` — the canonical attention op every attention site becomes.

Arguments follow ``F.scaled_dot_product_attention`` (see reference.py for the exact
semantics) plus ``softcap``; k and v stay un-repeated under GQA. The op is exact: it computes
what the site computed. Later families attach a sparsity spec or a different state layout
to it; lowering picks the implementation (reference here; Triton/FlexAttention per device).
"""
from __future__ import annotations

import torch

from longfx.kernels.attention import reference


@torch.library.custom_op("longfx::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, is_causal: bool, softcap: float) -> torch.Tensor:
    return reference.attention(q, k, v, mask, scale, is_causal, softcap)


@attention.register_fake
def _(q, k, v, mask, scale, is_causal, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


OP = torch.ops.longfx.attention.default
