"""kernels/attention/dense.py: GQA dense attention equals SDPA over repeated kv heads."""
import pytest
import torch
import torch.nn.functional as F

from longfx.kernels.attention import dense


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("causal,s", [(True, 7), (False, 1), (False, 5)])
def test_sdpa_matches_repeated_heads(mask, causal, s):
    if mask and causal:
        pytest.skip("SDPA takes a mask or is_causal")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, s, 16, generator=g)
    k = torch.randn(2, 2, 7, 16, generator=g)
    v = torch.randn(2, 2, 7, 16, generator=g)
    keep = torch.rand(2, 1, s, 7, generator=g) > 0.3 if mask else None
    if keep is not None:
        keep[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                         attn_mask=keep, is_causal=causal, scale=0.3)
    out = dense.sdpa(q, k, v, attn_mask=keep, is_causal=causal, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory-safe path is CUDA's")
def test_fp32_gqa_long_prefill_does_not_take_math_path():
    # 16k fp32 GQA: the math backend would need 9·16k²·4 B ≈ 9.7 GB of scores
    q = torch.randn(1, 9, 16384, 64, device="cuda")
    k = torch.randn(1, 3, 16384, 64, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    dense.sdpa(q, k, k, is_causal=True)
    assert torch.cuda.max_memory_allocated() < 2 ** 30


@pytest.mark.parametrize("case", ["causal", "bool", "float", "causal+mask", "softcap", "3d",
                                  "masked_row"])
def test_attention_op_equals_reference(case, monkeypatch):
    from longfx.kernels.attention import op, reference
    monkeypatch.setattr(op, "REFERENCE_MAX_SCORES", 0)      # take the SDPA path where it can
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    v = torch.randn(2, 2, 6, 8, generator=g)
    mask, causal, softcap = None, False, 0.0
    if case in ("bool", "causal+mask", "masked_row"):
        mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
        if case == "masked_row":
            mask[:, :, 2] = False                          # a row with no key: zeros, as SDPA
        else:
            mask[..., 0] = True
    if case == "float":
        mask = torch.randn(2, 1, 6, 6, generator=g)
    causal = case in ("causal", "causal+mask")
    softcap = 5.0 if case == "softcap" else 0.0
    if case == "3d":
        q, k, v = q[0], k[0].repeat_interleave(2, 0), v[0].repeat_interleave(2, 0)
    out = op.OP(q, k, v, mask, 0.4, causal, softcap)
    ref = reference.attention(q, k, v, mask, 0.4, causal, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if case == "masked_row":
        assert out[:, :, 2].abs().max() == 0


def test_attention_op_small_calls_are_the_reference_bit_for_bit():
    from longfx.kernels.attention import op, reference
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    assert torch.equal(op.OP(q, k, v, None, 0.3, True, 0.0),
                       reference.attention(q, k, v, None, 0.3, True, 0.0))
