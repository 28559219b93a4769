"""The folded-GQA attention (kernels/attention/grouped.py) against the reference."""
import pytest
import torch

from longfx.kernels.attention import grouped, op
from longfx.kernels.attention.reference import attention as reference


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _qkv(B, H, Hkv, S, Skv, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Skv, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Skv, D, generator=g).to(dtype))


def _mask(kind, B, S, Skv, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    if kind == "bool":                                   # per batch row and query, head-shared
        m = torch.rand(B, 1, S, Skv, generator=g) > 0.4
        m[..., -1] = True
        return m
    if kind == "float":
        return torch.randn(B, 1, S, Skv, generator=g)
    if kind == "row":                                    # one row for every query (decode masks)
        m = torch.rand(1, 1, 1, Skv, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "2d":
        return torch.randn(S, Skv, generator=g)
    raise AssertionError(kind)


@pytest.mark.parametrize("B,H,Hkv,S,Skv,D", [(1, 8, 2, 1, 37, 16), (2, 12, 3, 5, 29, 32),
                                             (3, 6, 1, 3, 64, 8)])
@pytest.mark.parametrize("kind", ["none", "bool", "float", "row", "2d"])
def test_equals_reference(B, H, Hkv, S, Skv, D, kind):
    q, k, v = _qkv(B, H, Hkv, S, Skv, D, seed=B * 31 + S)
    mask = _mask(kind, B, S, Skv, seed=Skv)
    assert grouped.applies(q, k, mask, False)
    out = grouped.attention(q, k, v, mask, D ** -0.5, 0.0)
    assert out.shape == (B, H, S, D)
    assert _rel(out, reference(q, k, v, mask, D ** -0.5, False, 0.0)) < 1e-5


def test_softcap_bf16_and_fully_masked_row():
    q, k, v = _qkv(2, 8, 2, 3, 40, 16, seed=5, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 3, 40, dtype=torch.bool)
    mask[1, 0, 2] = False                                # a row with no key: zeros, as SDPA
    out = grouped.attention(q, k, v, mask, 0.25, 30.0)
    ref = reference(q, k, v, mask, 0.25, False, 30.0)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    assert _rel(out.float(), ref.float()) < 2e-2         # bf16 matmuls of another shape


def test_applies_only_where_folding_keeps_the_mask():
    q, k, _ = _qkv(2, 8, 2, 4, 10, 8, seed=0)
    assert not grouped.applies(q, k, None, True)                      # causal is per row
    assert not grouped.applies(q, torch.randn(2, 8, 10, 8), None, False)   # not GQA
    assert not grouped.applies(q, torch.randn(2, 3, 10, 8), None, False)   # 8 % 3 != 0
    assert not grouped.applies(q, k, torch.ones(2, 8, 4, 10, dtype=torch.bool), False)
    assert not grouped.applies(q, k, torch.ones(8, 4, 10, dtype=torch.bool), False)
    assert grouped.applies(q, k, torch.ones(1, 4, 10, dtype=torch.bool), False)


def test_op_keeps_the_reference_on_cpu():
    """CPU calls stay bit-exact with the reference (grouped is a CUDA path)."""
    q, k, v = _qkv(1, 8, 2, 1, 33, 16, seed=9)
    assert not op.grouped_can_run(q, k, None, False)
    out = torch.ops.longfx.attention(q, k, v, None, 0.25, False, 0.0)
    assert torch.equal(out, reference(q, k, v, None, 0.25, False, 0.0))


def test_unmasked_sdpa_path_is_cuda_half_only():
    """Only a CUDA fp16/bf16 call with no mask, no causal flag and no softcap takes SDPA whole."""
    q, k, _ = _qkv(1, 8, 2, 1, 33, 16, seed=3, dtype=torch.bfloat16)
    assert not op.unmasked_sdpa_can_run(q, k, None, False, 0.0)        # CPU keeps the reference
    if torch.cuda.is_available():
        qc, kc = q.cuda(), k.cuda()
        assert op.unmasked_sdpa_can_run(qc, kc, None, False, 0.0)
        assert not op.unmasked_sdpa_can_run(qc, kc, torch.ones(1, 1, 1, 33, dtype=torch.bool,
                                                               device="cuda"), False, 0.0)
        assert not op.unmasked_sdpa_can_run(qc, kc, None, True, 0.0)
        assert not op.unmasked_sdpa_can_run(qc, kc, None, False, 30.0)
        assert not op.unmasked_sdpa_can_run(qc.float(), kc.float(), None, False, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the SDPA decode path is CUDA only")
@pytest.mark.parametrize("B,H,Hkv,S,Skv,D", [(1, 8, 2, 1, 37, 64), (3, 32, 8, 1, 1029, 128),
                                             (2, 6, 6, 2, 17, 16)])
def test_unmasked_decode_on_cuda_matches_the_reference(B, H, Hkv, S, Skv, D):
    q, k, v = (t.cuda() for t in _qkv(B, H, Hkv, S, Skv, D, seed=B + Skv, dtype=torch.bfloat16))
    out = torch.ops.longfx.attention(q, k, v, None, D ** -0.5, False, 0.0)
    ref = reference(q.float(), k.float(), v.float(), None, D ** -0.5, False, 0.0)
    assert _rel(out.float(), ref) < 2e-2                     # bf16 inputs and output, fp32 reference
