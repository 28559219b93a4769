"""The RoPE reference against independent formulations, and the ``longfx::rope`` op.

Each style is checked against the complex-number definition of a rotary embedding computed
in float64 (pairs (i, i+d/2) for rotate_half, (2i, 2i+1) for interleaved and complex), on odd
shapes (S=423, D=80) per dtype; plus the properties that make RoPE what it is.
"""
import pytest
import torch

from longfx.kernels.rope import reference as R
from longfx.kernels.rope.op import OP, STYLES

B, H, S, D = 2, 3, 423, 80
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _angles(S, half, base=10000.0, offset=0):
    inv = 1.0 / base ** (torch.arange(0, half, dtype=torch.float64) / half)
    pos = torch.arange(offset, offset + S, dtype=torch.float64)
    return torch.outer(pos, inv)                                          # [S, half]


def _tables(style, S, rd, dtype, offset=0):
    """cos/sin laid out as each style's models compute them, broadcastable to [B, H, S, rd]."""
    theta = _angles(S, rd // 2, offset=offset)
    if style == "rotate_half":
        theta = torch.cat([theta, theta], -1)
    elif style == "interleaved":
        theta = torch.repeat_interleave(theta, 2, -1)
    return theta.cos().to(dtype)[None, None], theta.sin().to(dtype)[None, None]


def _expected(style, x, rd):
    """Rotate each channel pair as a complex number by its angle, in float64."""
    x64 = x.double()
    xr, xp = x64[..., :rd], x64[..., rd:]
    theta = _angles(x.shape[-2], rd // 2)
    rot = torch.polar(torch.ones_like(theta), theta)
    if style == "rotate_half":
        z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2:]) * rot
        out = torch.cat([z.real, z.imag], -1)
    else:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rot
        out = torch.stack([z.real, z.imag], -1).flatten(-2)
    return torch.cat([out, xp], -1)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rd", [D, 32])
def test_reference_matches_complex_rotation(style, dtype, rd):
    if style == "complex" and dtype != torch.float32:
        pytest.skip("the complex spelling computes in complex64 (float32) by definition")
    torch.manual_seed(0)
    x = torch.randn(B, H, S, D, dtype=dtype)
    cos, sin = _tables(style, S, rd, torch.float32 if style == "complex" else dtype)
    out = R.rope(x, cos, sin, style, rd)
    assert out.shape == x.shape
    assert out.dtype == (torch.float32 if style == "complex" else dtype)
    assert _rel(out, _expected(style, x, rd)) <= TOL[dtype]
    # pass-through channels are untouched, bit for bit
    assert torch.equal(out[..., rd:], x[..., rd:].to(out.dtype))


def test_interleaved_is_complex_with_repeated_tables():
    torch.manual_seed(1)
    x = torch.randn(B, S, H, D)                                      # [B, S, H, D] layout
    theta = _angles(S, D // 2).float()[None, :, None]                 # [1, S, 1, D/2]
    full = torch.repeat_interleave(theta, 2, -1)
    a = R.rope(x, full.cos(), full.sin(), "interleaved", D)
    b = R.rope(x, theta.cos(), theta.sin(), "complex", D)
    assert _rel(a, b) <= 1e-6


def test_rotate_half_is_interleaved_after_a_channel_permutation():
    torch.manual_seed(2)
    x = torch.randn(B, H, S, D, dtype=torch.float64)
    half = D // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()
    cos_h, sin_h = _tables("rotate_half", S, D, torch.float64)
    cos_i, sin_i = _tables("interleaved", S, D, torch.float64)
    a = R.rope(x, cos_h, sin_h, "rotate_half", D)[..., perm]
    b = R.rope(x[..., perm], cos_i, sin_i, "interleaved", D)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_rotation_properties(style):
    torch.manual_seed(3)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64).expand(1, 1, 64, D)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64).expand(1, 1, 64, D)
    cos, sin = _tables(style, 64, D, torch.float64)
    rq, rk = R.rope(q, cos, sin, style, D), R.rope(k, cos, sin, style, D)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))      # a rotation keeps norms
    scores = rq[0, 0] @ rk[0, 0].T                                   # [64, 64]
    # <R_m q, R_n k> depends only on m - n: constant along each diagonal
    for off in (-5, 0, 7):
        diag = torch.diagonal(scores, off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("style", STYLES)
def test_op_matches_reference_and_fake(style):
    torch.manual_seed(4)
    x = torch.randn(B, H, 17, D)
    width = 32 // 2 if style == "complex" else 32
    cos, sin = torch.randn(1, 1, 17, width), torch.randn(1, 1, 17, width)
    assert torch.equal(OP(x, cos, sin, style, 32), R.rope(x, cos, sin, style, 32))
    torch.library.opcheck(OP, (x, cos, sin, style, 32),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.FakeTensorMode():
        fx_ = torch.empty(B, H, 17, D, dtype=torch.bfloat16)
        fc = torch.empty(1, 1, 17, width, dtype=torch.bfloat16)
        out = OP(fx_, fc, fc, style, 32)
    assert out.shape == (B, H, 17, D)
    assert out.dtype == (torch.float32 if style == "complex" else torch.bfloat16)


def test_unknown_style_is_an_error():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown RoPE style"):
        R.rope(x, x, x, "spiral", 8)
