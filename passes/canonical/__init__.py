"""Canonicalization rules: each site becomes one ``longfx::`` op, exactly."""
from __future__ import annotations


def rules() -> list:
    """The canonical rules in order: attention, then RoPE when its rule is available."""
    from longfx.passes.canonical.attention import CanonicalAttention

    out = [CanonicalAttention()]
    try:
        from longfx.passes.canonical.rope import CanonicalRope
    except ImportError:
        pass
    else:
        out.append(CanonicalRope())
    return out
