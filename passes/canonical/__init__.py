"""Canonicalization rules: each site becomes one ``longfx::`` op, exactly."""
from __future__ import annotations


def rules() -> list:
    """The canonical rules in order: attention, then RoPE."""
    from longfx.passes.canonical.attention import CanonicalAttention
    from longfx.passes.canonical.rope import CanonicalRope

    return [CanonicalAttention(), CanonicalRope()]
