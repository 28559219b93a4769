"""The Triton quantize-on-append with the clip search (triton_clip.py) against
``reference.append`` on ``clip=True`` states.

Runs under the Triton interpreter on CPU, and on CUDA (compiled kernels) when a GPU is there
and TRITON_INTERPRET is not set: run it alone there, after ``pip install .``, from outside the
checkout, e.g. ``cd /tmp && python -m pytest -c /dev/null --rootdir=/tmp
<repo>/tests/kernels/kv_quant/test_triton_clip.py``.

Every state tensor must equal the reference's after each chunk: random data with outliers
(so that the search picks ratios below 1 — checked against a state without clipping, so the
test fails if the search is skipped), constant groups (zero and not), odd head dims, chunks of
1, group − 1, group + 3 and 3·group + 5 tokens into states that already hold tokens, 2/4/8 bits,
u8 and fp16 scales, keys wider / narrower than values, fp32 / bf16 / fp16. Under the
interpreter equality is exact. On CUDA a group's params may differ only at a near-tie of two
ratios (triton_clip's docstring: torch and Triton add a group's squared errors in different
orders): the errors of the two choices, summed in fp64, within 1e-5 relative, on at most 0.1%
of the groups, and the codes are always those of the params stored.
"""
import os

import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"    # before triton is imported anywhere

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from longfx.kernels.kv_quant import reference as R  # noqa: E402
from longfx.kernels.kv_quant import triton as T  # noqa: E402
from longfx.kernels.kv_quant import triton_clip as TC  # noqa: E402

pytestmark = pytest.mark.skipif(not TC.AVAILABLE or T.INTERPRET == CUDA,
                                reason="needs triton (CUDA, or the interpreter on CPU)")

DEV = torch.device("cuda" if CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NEAR_TIE = 1e-5             # CUDA only: relative gap of the two choices' errors at a near-tie


def _kv(B, Hkv, n, D, dtype, seed):
    """Random keys and values with outliers: a key channel offset (KIVI's fixed outlier
    channels), rare huge key tokens (so a key group's range is set by one token) and value
    channels with a few large entries; plus constant groups (keys: channel 0 zero and
    channel 2 constant over the first 64 tokens; values: token 9 all zero, token 10 all
    -1.25)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, D, generator=g)
    k[..., 1] += 4.0
    k[:, :, 5::23, 3] *= 25.0
    k[:, :, :64, 0] = 0.0
    k[:, :, :64, 2] = 0.3
    v = torch.randn(B, Hkv, n, D, generator=g)
    v[:, :, 3::7, D // 2] *= 30.0
    v[:, :, 9], v[:, :, 10] = 0.0, -1.25
    return k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def _group_check(x, valid, p_tri, p_ref, codes_tri, dim, bits):
    """One side (keys or values) on CUDA: codes are those of the stored params, and where the
    params differ from the reference's, the two choices' errors are a near-tie.

    x [..., g, ...] fp32 with the group axis ``dim``; params [..., 2] with ``dim`` removed."""
    a, b = (t.unsqueeze(dim) for t in R.affine(p_tri, bits))
    q = R.quantize_codes(x, a, b, bits)
    assert torch.equal(codes_tri, torch.where(valid, q, torch.zeros_like(q))), "codes"

    def err(p):
        a, b = (t.unsqueeze(dim) for t in R.affine(p, bits))
        e = (R.quantize_codes(x, a, b, bits).float() * a + b - x).square()    # as the reference
        return torch.where(valid, e, torch.zeros_like(e)).double().sum(dim)

    differ = (p_tri != p_ref).any(-1)
    if differ.any():
        e_tri, e_ref = err(p_tri)[differ], err(p_ref)[differ]
        gap = (e_tri - e_ref).abs() / e_ref.clamp_min(1e-30)
        assert float(gap.max()) <= NEAR_TIE, f"not a near-tie: {float(gap.max())}"
        assert int(differ.sum()) <= max(1, differ.numel() // 1000), int(differ.sum())


def _assert_same_state(tri, ref, k, v):
    """tri == ref, every tensor (under the interpreter); on CUDA near-ties only (module
    docstring). k, v [B, Hkv, L, D]: everything appended so far, in order."""
    if not CUDA:
        for name in R.QuantizedKV.NAMES:
            assert torch.equal(getattr(tri, name), getattr(ref, name)), name
        return
    c = ref.config
    for name in ("k_ring", "v_ring", "length"):
        assert torch.equal(getattr(tri, name), getattr(ref, name)), name
    n, g = R.n_packed(int(ref.length), c), c.group
    if n == 0:
        return
    B, H, _, D = k.shape
    kb, jv = T.key_bits(ref), c.value_groups(D)
    x = k[:, :, :n].float().view(B, H, n // g, g, D)                  # [B, Hkv, n/g, g, D]
    codes = R.unpack(tri.k_codes[:, :, :n], kb).view(B, H, n // g, g, D)
    every = torch.ones_like(x, dtype=torch.bool)
    _group_check(x, every, tri.k_params[:, :, :n // g].transpose(-1, -2),
                 ref.k_params[:, :, :n // g].transpose(-1, -2), codes, 3, kb)
    x = torch.nn.functional.pad(v[:, :, :n].float(), (0, jv * g - D)).view(B, H, n, jv, g)
    valid = (torch.arange(jv * g, device=DEV) < D).view(jv, g).expand_as(x)
    codes = torch.nn.functional.pad(R.unpack(tri.v_codes[:, :, :n], c.bits), (0, jv * g - D))
    _group_check(x, valid, tri.v_params[:, :, :n].transpose(-1, -2),
                 ref.v_params[:, :, :n].transpose(-1, -2), codes.view(B, H, n, jv, g), -1, c.bits)


def _clip_used(state, plain):
    """Fractions of key and value groups whose stored params differ from those without clipping
    (= the search picked a ratio below 1 there)."""
    n, g = R.n_packed(int(state.length), state.config), state.config.group
    fk = (state.k_params[:, :, :n // g] != plain.k_params[:, :, :n // g]).any(-2).float().mean()
    fv = (state.v_params[:, :, :n] != plain.v_params[:, :, :n]).any(-2).float().mean()
    return float(fk), float(fv)


def _run(c, B, Hkv, D, dtype, prefill, chunks, seed):
    """Prefill, then the chunks, through the reference and append_clip, the state compared
    after each append. Returns the reference state, the Triton one and the reference without
    clipping (same data)."""
    total = prefill + sum(chunks)
    k, v = _kv(B, Hkv, total, D, dtype, seed)
    ref = R.QuantizedKV.empty(B, Hkv, D, total, c, dtype, DEV)
    tri = R.QuantizedKV.empty(B, Hkv, D, total, c, dtype, DEV)
    plain = R.QuantizedKV.empty(B, Hkv, D, total, dataclasses.replace(c, clip=False), dtype, DEV)
    assert TC.supports_append_clip(tri, k, v) and T.key_bits(tri) == c.kbits
    t = 0
    for s in (prefill, *chunks):
        kn, vn = k[:, :, t:t + s], v[:, :, t:t + s]
        R.append(ref, kn, vn)
        R.append(plain, kn, vn)
        TC.append_clip(tri, kn.transpose(1, 2).contiguous().transpose(1, 2), vn)  # strided k
        t += s
        _assert_same_state(tri, ref, k[:, :, :t], v[:, :, :t])
    assert int(tri.length) == total and R.n_packed(total, c) > 0
    return ref, tri, plain


def _chunks(g):
    return (1, g - 1, g + 3, 3 * g + 5)


CASES = [  # bits, key_bits, group, residual, scales, D, dtype, prefill
    (2, 4, 64, 128, "u8", 128, BF16, 150),        # the recipe's K4V2, Llama-like head
    (2, None, 32, 32, "u8", 80, F16, 70),           # odd head dim: a short last value group
    (4, None, 32, 0, "fp16", 96, F32, 33),          # ring of one group
    (4, 2, 32, 40, "fp16", 72, BF16, 45),
    (8, 4, 32, 32, "u8", 64, F32, 40),
    (2, 8, 64, 64, "fp16", 40, F16, 100),           # one short value group (D < group)
]


@pytest.mark.parametrize("bits,key_bits,group,residual,scales,D,dtype,prefill", CASES)
def test_append_clip_matches_reference(bits, key_bits, group, residual, scales, D, dtype,
                                       prefill):
    c = R.KVQuantConfig(bits, group, residual, scales, clip=True, key_bits=key_bits)
    ref, _, plain = _run(c, 1, 2, D, dtype, prefill, _chunks(group), seed=bits * 100 + D)
    fk, fv = _clip_used(ref, plain)
    # the data makes the search matter: a skipped search (ratio 1 everywhere) would fail above
    if c.kbits < 8:
        assert fk > 0.01, fk
    if bits < 8:
        assert fv > 0.01, fv


def test_append_clip_token_by_token_across_group_boundaries():
    """One token at a time (a decode loop) over several group boundaries, B = 2."""
    c = R.KVQuantConfig(2, 32, 32, "u8", clip=True, key_bits=4)
    _run(c, 2, 2, 64, BF16, 40, (1,) * 70, seed=3)


def test_constant_and_tiny_groups():
    """Whole groups constant (zero, positive, negative, huge) or with values near the smallest
    u8 scale, keys and values: the search's ties (every ratio equally good) keep ratio 1."""
    c = R.KVQuantConfig(2, 32, 0, "u8", clip=True, key_bits=4)
    D, n = 64, 32 * 6
    k = torch.zeros(1, 2, n, D)
    k[:, :, 32:64] = 0.7
    k[:, :, 64:96] = -3.0e4
    k[:, :, 96:128] = 1e-7 * torch.randn(1, 2, 32, D, generator=torch.Generator().manual_seed(1))
    k[:, :, 128:] = torch.randn(1, 2, 64, D, generator=torch.Generator().manual_seed(2))
    v = k.flip(2).clone()
    v[:, :, :, ::2] = 2.5
    ref = R.append(R.QuantizedKV.empty(1, 2, D, n, c, F32, DEV), k.to(DEV), v.to(DEV))
    tri = TC.append_clip(R.QuantizedKV.empty(1, 2, D, n, c, F32, DEV), k.to(DEV), v.to(DEV))
    _assert_same_state(tri, ref, k.to(DEV), v.to(DEV))
    fp16 = dataclasses.replace(c, scales="fp16")
    ref = R.append(R.QuantizedKV.empty(1, 2, D, n, fp16, F32, DEV), k.to(DEV), v.to(DEV))
    tri = TC.append_clip(R.QuantizedKV.empty(1, 2, D, n, fp16, F32, DEV), k.to(DEV), v.to(DEV))
    _assert_same_state(tri, ref, k.to(DEV), v.to(DEV))


def test_scales_are_the_reference_table():
    """The kernel's u8 scales (fp64 exp2 rounded to fp32) are the reference's 256 floats."""
    want = torch.tensor(R._SCALE_OF_CODE, dtype=F32, device=DEV)
    assert torch.equal(TC.scale_table(DEV), want)


def test_supports_and_errors():
    k = torch.zeros(1, 2, 1, 64, device=DEV)
    clip = R.QuantizedKV.empty(1, 2, 64, 128, R.KVQuantConfig(4, 32, 32, clip=True), F32, DEV)
    plain = R.QuantizedKV.empty(1, 2, 64, 128, R.KVQuantConfig(4, 32, 32), F32, DEV)
    odd = R.QuantizedKV.empty(1, 2, 64, 96, R.KVQuantConfig(4, 48, 0, clip=True), F32, DEV)
    assert TC.supports_append_clip(clip, k, k)
    assert not TC.supports_append_clip(plain, k, k)             # no clip: triton.append's job
    assert not TC.supports_append_clip(odd, k, k)               # group 48
    assert not TC.supports_append_clip(clip, k.half(), k.half())
    with pytest.raises(ValueError, match="config.clip"):
        TC.append_clip(plain, k, k)
    before = [t.clone() for t in clip.tensors()]
    TC.append_clip(clip, k[:, :, :0], k[:, :, :0])              # nothing to append
    assert all(torch.equal(a, b) for a, b in zip(before, clip.tensors()))
