"""``longfx::rope`` — the canonical rotary-embedding op every RoPE application becomes.

``rope(x, cos, sin, style, rotary_dim)``: ``x`` is q or k ([..., S, D], any head layout),
``cos``/``sin`` the model's own tables broadcastable to the rotated channels (for the
``complex`` style, the real and imaginary parts of ``freqs_cis``, one value per pair), the
style one of :data:`STYLES`, and ``rotary_dim`` how many leading channels rotate (the rest
pass through). Exact: it computes what the model computed (see reference.py). Frequency
transforms act on the tables' inputs (``inv_freq``), never on this op.
"""
from __future__ import annotations

import torch

from longfx.kernels.rope import reference
from longfx.kernels.rope.reference import STYLES

__all__ = ["rope", "OP", "STYLES"]


@torch.library.custom_op("longfx::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str,
         rotary_dim: int) -> torch.Tensor:
    return reference.rope(x, cos, sin, style, rotary_dim)


@rope.register_fake
def _(x, cos, sin, style, rotary_dim):
    # The reference is shape- and dtype-faithful and uses only fake-able ops.
    return reference.rope(x, cos, sin, style, rotary_dim)


OP = torch.ops.longfx.rope.default
