"""The attention reference and op against F.scaled_dot_product_attention and eager math."""
import pytest
import torch
import torch.nn.functional as F

from longfx.kernels.attention import op  # noqa: F401 - registers torch.ops.longfx.attention
from longfx.kernels.attention.reference import attention


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("S,Skv,H,Hkv,D", [(1, 17, 4, 2, 16), (13, 13, 6, 3, 80), (7, 23, 2, 2, 64)])
@pytest.mark.parametrize("masking", ["none", "bool", "float", "causal"])
def test_matches_sdpa(S, Skv, H, Hkv, D, masking):
    g = torch.Generator().manual_seed(S * 100 + Skv)
    q = torch.randn(2, H, S, D, generator=g)
    k = torch.randn(2, Hkv, Skv, D, generator=g)
    v = torch.randn(2, Hkv, Skv, D, generator=g)
    mask = None
    causal = masking == "causal"
    if masking == "bool":
        mask = torch.rand(2, 1, S, Skv, generator=g) > 0.3
        mask[..., 0] = True
    elif masking == "float":
        mask = torch.randn(2, 1, S, Skv, generator=g)
    out = torch.ops.longfx.attention(q, k, v, mask, D ** -0.5, causal, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         enable_gqa=Hkv != H)
    assert _rel(out, ref) < 1e-5


def test_softcap_and_fully_masked_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) * 4 for _ in range(3))
    cap = 5.0
    scores = torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / cap) * cap
    ref = torch.softmax(scores, -1) @ v
    assert _rel(attention(q, k, v, None, 0.5, False, cap), ref) < 1e-5
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False                                    # row 2 attends nothing
    out = attention(q, k, v, mask, 0.5)
    assert torch.all(out[:, :, 2] == 0) and not out.isnan().any()


def test_three_dim_inputs_and_fake_shapes():
    q = torch.randn(6, 5, 8)
    k = torch.randn(6, 9, 8)
    v = torch.randn(6, 9, 4)
    out = torch.ops.longfx.attention(q, k, v, None, 0.3, False, 0.0)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    assert out.shape == (6, 5, 4) and _rel(out, ref) < 1e-5
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert torch.ops.longfx.attention(fq, fk, fv, None, 0.3, False, 0.0).shape == (6, 5, 4)
