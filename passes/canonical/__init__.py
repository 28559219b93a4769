"""Canonicalization rules: each site becomes one ``longfx::`` op, exactly."""
from __future__ import annotations


def rules() -> list:
    """The canonical rules in order: attention, then RoPE; and, in the lower stage, a decode
    step's all-visible mask dropped (unmasked_decode.py)."""
    from longfx.passes.canonical.attention import CanonicalAttention
    from longfx.passes.canonical.rope import CanonicalRope
    from longfx.passes.canonical.unmasked_decode import UnmaskedDecode

    return [CanonicalAttention(), CanonicalRope(), UnmaskedDecode()]
