"""The quantized-KV reference: packing, KIVI group quantization, the state's append semantics,
memory ratios, GEAR, the decode-equivalent emulation and the custom ops."""
import math

import pytest
import torch

from longfx.kernels.attention.reference import attention
from longfx.kernels.kv_quant import op  # noqa: F401 - registers the ops
from longfx.kernels.kv_quant import reference as R


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-12))


def _kv(B, H, T, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g)
    k[..., 3] += 6.0                                        # a key outlier channel (KIVI's case)
    return k.to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)


@pytest.mark.parametrize("bits", R.BITS)
def test_pack_unpack_roundtrip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 40), generator=g, dtype=torch.uint8)
    packed = R.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 40 * bits // 8)
    assert torch.equal(R.unpack(packed, bits), codes)
    per = 8 // bits                                         # byte j: codes per·j + i at bits·i
    want = sum(int(codes[0, 0, i]) << (bits * i) for i in range(per))
    assert int(packed[0, 0, 0]) == want


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        R.pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        R.pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits"):
        R.KVQuantConfig(bits=3)
    with pytest.raises(ValueError, match="scales"):
        R.KVQuantConfig(scales="fp8")
    with pytest.raises(ValueError, match="head_dim 82"):
        R.QuantizedKV.empty(1, 1, 82, 64, R.KVQuantConfig(bits=2))


@pytest.mark.parametrize("scales", R.SCALES)
@pytest.mark.parametrize("bits", R.BITS)
@pytest.mark.parametrize("D,group", [(80, 32), (64, 64), (128, 64), (80, 64)])
def test_quantization_error_within_half_a_step(bits, scales, D, group):
    c = R.KVQuantConfig(bits=bits, group=group, scales=scales)
    k, v = _kv(2, 2, 2 * group, D, seed=D + bits)
    kc, kp = R.quantize_keys(k, c)
    vc, vp = R.quantize_values(v, c)
    assert kc.shape == (2, 2, 2 * group, D * bits // 8) and kp.shape == (2, 2, 2, 2, D)
    assert vp.shape == (2, 2, 2 * group, 2, math.ceil(D / group))
    assert kp.dtype == vp.dtype == c.params_dtype
    # keys: one step per (group, channel); values: one per (token, channel group)
    ka = R.step_size(kp.transpose(-1, -2), bits).repeat_interleave(group, 2)        # [B,H,T,D]
    va = R.step_size(vp.transpose(-1, -2), bits).repeat_interleave(group, -1)[..., :D]
    tol = 1e-3 if scales == "fp16" else 1e-5                 # fp16 rounding of min / scale
    kerr = (R.dequantize_keys(kc, kp, c) - k).abs()
    verr = (R.dequantize_values(vc, vp, c) - v).abs()
    assert bool((kerr <= ka / 2 * (1 + tol) + tol * k.abs()).all())
    assert bool((verr <= va / 2 * (1 + tol) + tol * v.abs()).all())
    # steps are the tight KIVI ones, up to the u8 format's slack
    rng = k.view(2, 2, 2, group, D).amax(3) - k.view(2, 2, 2, group, D).amin(3)
    if scales == "fp16":
        slack, ideal = 1 + 1e-3, rng
    else:
        slack = 2 ** (1 / 8) / (1 - 1 / 32) * (1 + 1e-6)
        ideal = torch.maximum(rng, k.view(2, 2, 2, group, D).amin(3).abs() * 32 / 127)
    assert bool((R.step_size(kp.transpose(-1, -2), bits) <= ideal / c.qmax * slack + 1e-6).all())


def test_u8_scales_cover_large_offsets_and_constant_groups():
    c = R.KVQuantConfig(bits=2, group=16)
    x = torch.zeros(1, 1, 16, 8)
    x[..., 0] = 1000.0 + torch.linspace(0, 0.01, 16)        # huge offset, tiny range
    x[..., 1] = -3000.0
    x[..., 2] = 5.0                                         # constant channel
    x[..., 3] = torch.linspace(-1e-7, 1e-7, 16)             # below the smallest scale
    kc, kp = R.quantize_keys(x, c)
    a = R.step_size(kp.transpose(-1, -2), 2)[:, :, 0]        # [1, 1, D]
    err = (R.dequantize_keys(kc, kp, c) - x).abs().amax(2)
    assert bool((err <= a / 2 * (1 + 1e-5) + 1e-6).all())
    assert float(err[0, 0, 0]) < 1000 / 64                  # |min| / (4·qmax) bound, roughly


@pytest.mark.parametrize("residual,group", [(0, 32), (128, 64), (100, 32)])
def test_n_packed_keeps_a_ring_of_recent_tokens(residual, group):
    c = R.KVQuantConfig(group=group, residual=residual)
    r = c.ring
    assert r % group == 0 and r >= max(residual, group)
    for L in range(0, 3 * r + 5):
        n = R.n_packed(L, c)
        assert n % group == 0 and 0 <= L - n <= r
        if L > r:
            assert L - n > r - group                        # only whole groups leave the ring
        assert int(R.n_packed(torch.tensor(L), c)) == n


@pytest.mark.parametrize("bits,group,residual,scales", [(4, 32, 0, "u8"), (2, 32, 64, "fp16"),
                                                        (8, 16, 40, "u8")])
def test_append_chunked_equals_one_shot_equals_fake_quantize(bits, group, residual, scales):
    c = R.KVQuantConfig(bits=bits, group=group, residual=residual, scales=scales)
    k, v = _kv(2, 3, 157, 16, seed=bits)
    one = R.QuantizedKV.empty(2, 3, 16, 160, c, torch.float32)
    R.append(one, k, v)
    step = R.QuantizedKV.empty(2, 3, 16, 160, c, torch.float32)
    t = 0
    for s in (5, 1, 1, 40, 1, 1, 1, 64, 3, 40):
        R.append(step, k[:, :, t:t + s], v[:, :, t:t + s])
        t += s
    assert t == 157 and int(one.length) == int(step.length) == 157
    n = R.n_packed(157, c)
    for name in ("k_codes", "v_codes", "v_params"):
        assert torch.equal(getattr(one, name)[:, :, :n], getattr(step, name)[:, :, :n]), name
    assert torch.equal(one.k_params[:, :, :n // group], step.k_params[:, :, :n // group])
    kd, vd = R.dequantize_state(step)
    kf, vf = R.fake_quantize(k, v, c)
    assert torch.equal(kd, kf) and torch.equal(vd, vf)
    assert torch.equal(kd[:, :, n:], k[:, :, n:])           # the ring is exact
    assert _rel(kd, k) < 0.4 and _rel(vd, v) < 0.4            # 2-bit: half a step of 4 levels


def test_append_rejects_overflow_and_mismatches():
    c = R.KVQuantConfig(bits=4, group=16, residual=16)
    st = R.QuantizedKV.empty(1, 2, 8, 40, c, torch.float32)
    assert st.capacity >= 40
    k, v = _kv(1, 2, st.capacity + 1, 8)
    with pytest.raises(ValueError, match="capacity"):
        R.append(st, k, v)
    with pytest.raises(ValueError, match="holds"):
        R.append(st, k[:, :, :3].double(), v[:, :, :3].double())
    with pytest.raises(ValueError, match="Hkv"):
        R.append(st, k[:, :1, :3], v[:, :1, :3])


@pytest.mark.parametrize("S", [1, 3])
def test_attention_decode_matches_attention_over_the_dequantized_cache(S):
    c = R.KVQuantConfig(bits=8, group=16, residual=0)
    k, v = _kv(2, 2, 75, 32, seed=S)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 8, S, 32, generator=g)
    st = R.append(R.QuantizedKV.empty(2, 2, 32, 80, c, torch.float32), k, v)
    out = R.attention_decode(q, st, 0.2)
    kd, vd = R.dequantize_state(st)
    mask = torch.ones(S, 75, dtype=torch.bool).tril(75 - S)
    assert _rel(out, attention(q, kd, vd, mask, 0.2)) < 1e-6
    assert _rel(out, attention(q, k, v, mask, 0.2)) < 2e-2  # 8-bit is close to exact
    with pytest.raises(ValueError, match="queries"):
        R.attention_decode(torch.randn(1, 8, 76, 32), st)


@pytest.mark.parametrize("gear", [None, R.Gear(rank=2, outliers=0.02)])
def test_emulated_attention_equals_token_by_token_decoding(gear):
    c = R.KVQuantConfig(bits=2, group=16, residual=16)
    T = 53
    k, v = _kv(1, 2, T, 16, seed=4)
    q = torch.randn(1, 4, T, 16, generator=torch.Generator().manual_seed(1))
    emu = R.attention_emulated(q, k, v, c, 0.25, gear=gear, chunk=7)
    want = []
    for p in range(T):                                      # decode: query p after p + 1 tokens
        kd, vd = R.fake_quantize(k[:, :, :p + 1], v[:, :, :p + 1], c, gear)
        want.append(attention(q[:, :, p:p + 1], kd, vd, None, 0.25))
    assert _rel(emu, torch.cat(want, 2)) < 1e-5
    if gear is None:
        st = R.QuantizedKV.empty(1, 2, 16, T, c, torch.float32)
        for p in range(T):
            R.append(st, k[:, :, p:p + 1], v[:, :, p:p + 1])
            assert _rel(R.attention_decode(q[:, :, p:p + 1], st, 0.25), want[p]) < 1e-5


def test_gear_reduces_error_and_degenerates_to_plain_quantization():
    c = R.KVQuantConfig(bits=2, group=32)
    k, _ = _kv(1, 2, 64, 32, seed=3)
    k[0, 0, 5, 7] = 40.0                                    # a token outlier
    plain = R.roundtrip_keys(k, c)
    assert torch.equal(R.gear_roundtrip(k, "keys", c, R.Gear(rank=0, outliers=0.0)), plain)
    errs = [float((R.gear_roundtrip(k, "keys", c, gr) - k).norm())
            for gr in (R.Gear(0, 0.0), R.Gear(0, 0.01), R.Gear(4, 0.01), R.Gear(32, 0.01))]
    assert errs[0] > errs[1] > errs[2] > 1e3 * errs[3]
    vg = R.gear_roundtrip(k, "values", c, R.Gear(4, 0.01))
    assert (vg - k).norm() < (R.roundtrip_values(k, c) - k).norm()
    with pytest.raises(ValueError, match="kind"):
        R.gear_roundtrip(k, "queries", c, R.Gear())
    with pytest.raises(ValueError, match="outliers"):
        R.Gear(outliers=1.5)


@pytest.mark.parametrize("name,H,D", [("llama-8b", 8, 128), ("smollm2-135m", 3, 64)])
def test_memory_ratio_at_32k(name, H, D):
    """Issue 6: KV-state bytes at 32k <= 0.27x bf16 (4-bit), <= 0.15x (2-bit), everything counted."""
    r4 = R.memory_ratio(32768, H, D, R.KVQuantConfig(bits=4))
    r2 = R.memory_ratio(32768, H, D, R.KVQuantConfig(bits=2))
    assert r4 <= 0.27 and r2 <= 0.15
    # exact: per head, 32640 packed tokens + a 128-token bf16 ring, 2-byte params per group
    per_head = lambda bits: (2 * 32640 * D * bits // 8 + 2 * (32640 // 64) * D      # noqa: E731
                             + 2 * 32640 * math.ceil(D / 64) + 2 * 128 * D * 2)
    bf16 = 2 * 32768 * H * D * 2
    assert R.state_bytes(32768, H, D, R.KVQuantConfig(bits=4)) == H * per_head(4) + 8
    assert abs(r4 - (H * per_head(4) + 8) / bf16) < 1e-12
    assert abs(r2 - (H * per_head(2) + 8) / bf16) < 1e-12
    # KIVI's fp16 (scale, zero) costs 0.5 bit per element: over the budget at group 64
    assert R.memory_ratio(32768, H, D, R.KVQuantConfig(bits=4, scales="fp16")) > 0.28
    st = R.QuantizedKV.empty(1, H, D, 32768, R.KVQuantConfig(bits=4), device="meta")
    assert R.nbytes(st) == R.state_bytes(32768, H, D, R.KVQuantConfig(bits=4))


def test_ops_match_reference_and_compile():
    c = R.KVQuantConfig(bits=4, group=16, residual=16)
    k, v = _kv(1, 2, 40, 16, seed=2)
    q = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(3))
    ref = R.append(R.QuantizedKV.empty(1, 2, 16, 64, c, torch.float32), k, v)
    want = R.attention_decode(q, ref, 0.3)

    def step(q, k, v, *state):
        torch.ops.longfx.kv_quant_append(*state, k, v, 4, 16)
        return torch.ops.longfx.kv_quant_attention(q, *state, 0.3, 4, 16)

    for fn in (step, torch.compile(step, backend="eager", fullgraph=True)):
        st = R.QuantizedKV.empty(1, 2, 16, 64, c, torch.float32)
        out = fn(q, k, v, *st.tensors())
        assert out.shape == q.shape and int(st.length) == 40
        assert _rel(out, want) < 1e-6
        assert torch.equal(st.k_codes, ref.k_codes) and torch.equal(st.v_ring, ref.v_ring)
    emu = torch.ops.longfx.kv_quant_attention_emulated(q, k, v, 0.3, 4, 16, 16, "u8", 0, 0.0)
    assert _rel(emu, R.attention_emulated(q, k, v, c, 0.3)) < 1e-6


# ---------------------------------------------------------------- rotate / clip (no bytes)

@pytest.mark.parametrize("D", [64, 128, 80, 96, 16])
def test_rotation_is_orthogonal_fixed_and_signed(D):
    q = R.rotation(D)
    assert q.shape == (D, D) and q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(D), rtol=0, atol=1e-6)
    assert torch.equal(q, R.rotation(D))                      # regenerated, not stored
    b = R.rotation_block(D)
    assert b == {64: 64, 128: 128, 80: 16, 96: 32, 16: 16}[D]
    assert bool((q.abs()[q != 0] == 1 / math.sqrt(b)).all())  # a (block) Hadamard up to signs
    assert int((q != 0).sum()) == D * b                        # block-diagonal
    signs = (q[:, 0] * math.sqrt(b)).round()[:b]               # column 0 of H is all ones
    assert 0 < int((signs > 0).sum()) < b                      # the ±1 diagonal is not trivial
    assert not torch.equal(q, R.rotation(D, seed=1))
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(D))
    torch.testing.assert_close(R.unrotate(R.rotate(x, q), q), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(R.rotate(x, q).norm(dim=-1), x.norm(dim=-1))   # norms kept


def test_rotation_lowers_the_error_of_channel_outliers():
    """Values are quantized per token over groups of channels: one outlier channel stretches
    every token's range; the rotation spreads it over all channels (QuaRot's argument)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 256, 64, generator=g)
    v[..., 5] *= 25.0
    v[..., 40] += 12.0
    k = torch.randn(1, 2, 256, 64, generator=g)
    for bits in (2, 4):
        plain = R.KVQuantConfig(bits=bits, residual=0)
        rot = R.KVQuantConfig(bits=bits, residual=0, rotate=True)
        err = {c.rotate: float((R.fake_quantize(k, v, c)[1] - v).square().mean())
               for c in (plain, rot)}
        assert err[True] < 0.5 * err[False], (bits, err)
    # the rotated state holds exactly the rotated tensors quantized: same bytes, same layout
    assert R.state_bytes(4096, 3, 64, rot) == R.state_bytes(4096, 3, 64, plain)


@pytest.mark.parametrize("scales", R.SCALES)
def test_clip_never_raises_a_groups_error_and_lowers_it_on_gaussian_data(scales):
    k, v = _kv(2, 3, 128, 64, seed=5)
    out = {}
    for clip in (False, True):
        c = R.KVQuantConfig(bits=2, scales=scales, clip=clip)
        out[clip] = ((R.roundtrip_keys(k, c) - k).square().view(2, 3, 2, 64, 64).sum(3),
                     (R.roundtrip_values(v, c) - v).square().sum(-1))
    for plain, clipped in zip(out[False], out[True]):
        assert bool((clipped <= plain + 1e-6).all())              # ratio 1.0 is a candidate
        assert float(clipped.sum()) < 0.9 * float(plain.sum())
    # the stored format is unchanged (a clipped state dequantizes with the usual code)
    c = R.KVQuantConfig(bits=2, scales=scales, clip=True)
    codes, params = R.quantize_values(v, c)
    assert codes.shape == R.quantize_values(v, R.KVQuantConfig(bits=2, scales=scales))[0].shape
    assert params.dtype == c.params_dtype


def test_clip_handles_a_short_last_value_group():
    v = torch.randn(1, 1, 8, 80, generator=torch.Generator().manual_seed(1))   # groups 64 + 16
    c = R.KVQuantConfig(bits=2, clip=True)
    rt = R.roundtrip_values(v, c)
    assert bool(rt.isfinite().all())
    plain = R.roundtrip_values(v, R.KVQuantConfig(bits=2))
    assert float((rt - v).square().sum()) <= float((plain - v).square().sum()) + 1e-6


def test_config_rotate_and_clip_are_checked_and_printed_only_when_set():
    assert str(R.KVQuantConfig(bits=2)) == "kv_quant(bits=2, group=64, residual=128)"
    assert str(R.KVQuantConfig(bits=2, rotate=True, clip=True)) == \
        "kv_quant(bits=2, group=64, residual=128, rotate=True, clip=True)"
    with pytest.raises(ValueError, match="rotate must be True or False"):
        R.KVQuantConfig(rotate=1)
    with pytest.raises(ValueError, match="clip must be True or False"):
        R.KVQuantConfig(clip="yes")
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        R.rotation(0)


def test_emulated_attention_with_rotation_equals_rotated_fake_quantize():
    """attention_emulated rotates the packed groups like fake_quantize: the last query sees
    every token, packed ones (n_packed(64) = 32) round-tripped in the rotated basis, so both
    read the same keys and values."""
    k, v = _kv(1, 2, 64, 32, seed=7)
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(8))
    c = R.KVQuantConfig(bits=2, group=32, residual=0, rotate=True, clip=True)
    kq, vq = R.fake_quantize(k, v, c)
    want = attention(q, kq.repeat_interleave(2, 1), vq.repeat_interleave(2, 1),
                     torch.ones(1, 64, dtype=torch.bool), None)
    got = R.attention_emulated(q, k, v, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- key_bits (keys wider than values)

def test_key_bits_config_is_checked_and_printed_only_when_set():
    c = R.KVQuantConfig(bits=2, key_bits=4)
    assert c.kbits == 4 and c.bits == 2 and c.keys_config.bits == 4
    assert R.KVQuantConfig(bits=2).kbits == 2 and R.KVQuantConfig(bits=2).keys_config.bits == 2
    assert str(c) == "kv_quant(bits=2, group=64, residual=128, key_bits=4)"
    assert "key_bits" not in str(R.KVQuantConfig(bits=2))
    with pytest.raises(ValueError, match="key_bits must be None or one of"):
        R.KVQuantConfig(bits=2, key_bits=3)
    with pytest.raises(ValueError, match="not a multiple of 2"):     # 4-bit keys need even D
        R.KVQuantConfig(bits=8, key_bits=4).check_head_dim(15)


@pytest.mark.parametrize("key_bits", [4, 8])
def test_key_bits_state_holds_wider_keys_and_reads_them_back(key_bits):
    """A K-wide / V-2-bit state: key codes D·key_bits/8 bytes a token, keys within half a step
    of their (finer) grid, values as in a plain 2-bit state, every tensor equal whether
    appended in one go or token by token, and the read op (given only the values' bits) reads
    the wider keys off the tensors."""
    D, group = 16, 16
    c = R.KVQuantConfig(bits=2, group=group, residual=16, key_bits=key_bits)
    plain = R.KVQuantConfig(bits=2, group=group, residual=16)
    k, v = _kv(1, 2, 70, D, seed=5)
    st = R.append(R.QuantizedKV.empty(1, 2, D, 80, c, torch.float32), k, v)
    ref = R.append(R.QuantizedKV.empty(1, 2, D, 80, plain, torch.float32), k, v)
    st.validate()
    assert st.k_codes.shape[-1] == D * key_bits // 8 and st.v_codes.shape[-1] == D // 4
    assert torch.equal(st.v_codes, ref.v_codes) and torch.equal(st.v_params, ref.v_params)
    n = R.n_packed(70, c)
    kd, vd = R.dequantize_state(st)
    kp, _ = R.dequantize_state(ref)
    step = R.step_size(st.k_params[:, :, :n // group].transpose(-1, -2), key_bits)
    err = (kd[:, :, :n] - k[:, :, :n]).abs().view(1, 2, n // group, group, D)
    assert bool((err <= step[:, :, :, None] / 2 + 1e-5).all())
    assert float((kd - k).square().mean()) < 0.1 * float((kp - k).square().mean())
    torch.testing.assert_close(vd, R.dequantize_state(ref)[1], rtol=0, atol=0)
    # token by token: the same packed bytes, the same read
    tok = R.QuantizedKV.empty(1, 2, D, 80, c, torch.float32)
    for t in range(70):
        R.append(tok, k[:, :, t:t + 1], v[:, :, t:t + 1])
    for name in ("k_codes", "k_params", "v_codes", "v_params"):    # (stale ring slots differ)
        assert torch.equal(getattr(tok, name), getattr(st, name)), name
    assert all(torch.equal(a, b) for a, b in zip(R.dequantize_state(tok), (kd, vd)))
    # the ops take one bits (the values'): the state's key width is read off its tensors
    again = R.QuantizedKV.from_tensors(st.tensors(), 2, group)
    assert again.config.key_bits == key_bits
    opst = R.QuantizedKV.empty(1, 2, D, 80, c, torch.float32)
    torch.ops.longfx.kv_quant_append(*opst.tensors(), k, v, 2, group)
    assert torch.equal(opst.k_codes, st.k_codes) and torch.equal(opst.k_params, st.k_params)
    ko, vo = torch.ops.longfx.kv_quant_read(st.k_codes, st.k_params, st.v_codes, st.v_params,
                                            st.k_ring, st.v_ring, 70, 2, group, 16, "u8")
    assert torch.equal(ko, kd) and torch.equal(vo, vd)
    q = torch.randn(1, 4, 1, D, generator=torch.Generator().manual_seed(6))
    want = attention(q, kd, vd, torch.ones(1, 70, dtype=torch.bool), 0.25)
    assert _rel(torch.ops.longfx.kv_quant_attention(q, *st.tensors(), 0.25, 2, group), want) < 1e-6


def test_key_bits_bytes_at_32k_add_only_the_wider_key_codes():
    """SmolLM2's 3 KV heads of 64: 4-bit keys add D/4 bytes a packed token and head over the
    2-bit state — 0.0625x of that layer's bf16 K + V; the key_bits_of check refuses widths
    that fit no bit count."""
    H, D = 3, 64
    two = R.state_bytes(32768, H, D, R.KVQuantConfig(bits=2))
    k4 = R.state_bytes(32768, H, D, R.KVQuantConfig(bits=2, key_bits=4))
    assert k4 - two == H * 32640 * D // 4
    assert abs(R.memory_ratio(32768, H, D, R.KVQuantConfig(bits=2, key_bits=4))
               - R.memory_ratio(32768, H, D, R.KVQuantConfig(bits=2)) - 0.0625 * 32640 / 32768) < 1e-9
    assert R.key_bits_of(torch.zeros(1, 1, 3, 32, dtype=torch.uint8), 64) == 4
    with pytest.raises(ValueError, match="do not fit head_dim"):
        R.key_bits_of(torch.zeros(1, 1, 3, 24, dtype=torch.uint8), 64)


def test_attention_with_exact_sinks_reads_the_copy_for_the_first_positions():
    """``attention_decode(..., sink_k, sink_v)``: positions < min(n, L) read the exact copy, the
    rest the stored state; the op gives the same on CPU, and bad copies are refused."""
    D, group = 16, 16
    k, v = _kv(1, 2, 70, D, seed=11)
    c = R.KVQuantConfig(bits=2, group=group, residual=16)
    st = R.QuantizedKV.empty(1, 2, D, 80, c, torch.float32)
    R.append(st, k, v)
    q = torch.randn(1, 4, 2, D, generator=torch.Generator().manual_seed(12))
    kd, vd = R.dequantize_state(st)
    assert float((kd[:, :, :4] - k[:, :, :4]).abs().max()) > 1e-3        # 2-bit: not exact
    mask = torch.ones(2, 70, dtype=torch.bool).tril(68)                  # bottom-right causal
    for n in (4, 1):
        want = attention(q, torch.cat((k[:, :, :n], kd[:, :, n:]), 2),
                         torch.cat((v[:, :, :n], vd[:, :, n:]), 2), mask, 0.3)
        sk, sv = k[:, :, :n].clone(), v[:, :, :n].clone()
        assert _rel(R.attention_decode(q, st, 0.3, sk, sv), want) < 1e-6
        got = torch.ops.longfx.kv_quant_attention(q, *st.tensors(), 0.3, 2, group, sk, sv)
        assert _rel(got, want) < 1e-6
    assert _rel(R.attention_decode(q, st, 0.3), attention(q, kd, vd, mask, 0.3)) < 1e-6
    with pytest.raises(ValueError, match="both or neither"):
        R.attention_decode(q, st, 0.3, k[:, :, :4], None)
    with pytest.raises(ValueError, match=r"\[B, Hkv, n, D\]"):
        R.attention_decode(q, st, 0.3, k[:, :1, :4], v[:, :1, :4])
    with pytest.raises(ValueError, match="the state holds"):
        R.attention_decode(q, st, 0.3, k[:, :, :4].double(), v[:, :, :4].double())


def test_a_scale_code_gives_the_same_float_wherever_it_sits():
    """u8 scale codes are read from a table: the same code in a tensor of any length, at any
    offset (vectorized body or scalar tail), gives the same fp32 scale, 2^((c − 160) / 8)
    rounded once (torch.exp2's two CPU paths disagreed in the last bit for 32 codes)."""
    codes = torch.arange(256, dtype=torch.uint8)
    full = R.scale_of_code(codes)
    for n in (1, 3, 7, 17, 33):
        for off in range(0, 256, 29):
            part = (torch.arange(off, off + n) % 256).to(torch.uint8)
            assert torch.equal(R.scale_of_code(part), full[part.long()])
    want = torch.tensor([2.0 ** ((c - 160) / 8) for c in range(256)], dtype=torch.float64)
    assert torch.equal(full, want.float())


def _brute_force_window(q, kd, vd, scale, window):
    """Attention one query row and one key at a time: query i of S at held index L − S + i
    sees the keys j with j <= L − S + i and, for window > 0, j >= L − S + i − window + 1
    (GQA: head h reads kv head h // G). fp64, no masks, no matmuls."""
    B, H, S, D = q.shape
    L, G = kd.shape[2], H // kd.shape[1]
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                p = L - S + i
                lo = max(0, p - window + 1) if window else 0
                keys = range(lo, p + 1)
                s = torch.tensor([float(q[b, h, i].double() @ kd[b, h // G, j].double()) * scale
                                  for j in keys], dtype=torch.float64)
                w = torch.softmax(s, 0)
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj * vd[b, h // G, j].double()
    return out


@pytest.mark.parametrize("S,window", [(1, 5), (1, 17), (1, 40), (1, 200), (3, 6), (4, 1),
                                      (2, 0)])
def test_windowed_decode_equals_brute_force_attention(S, window):
    """``attention_decode(..., window=w)`` against attention computed one key at a time over the
    dequantized state (and the exact sink copy): windows inside one group, across the packed /
    ring boundary, longer than the held length (= no window), one key, S > 1 queries, 0 = none.
    A window that was ignored moves the answer by far more than the tolerance (checked)."""
    D, group, L = 16, 16, 61
    k, v = _kv(1, 2, L, D, seed=21)
    st = R.append(R.QuantizedKV.empty(1, 2, D, 80, R.KVQuantConfig(4, group, 16), torch.float32),
                  k, v)
    q = torch.randn(1, 4, S, D, generator=torch.Generator().manual_seed(22))
    kd, vd = R.dequantize_state(st)
    want = _brute_force_window(q, kd, vd, 0.3, window)
    got = R.attention_decode(q, st, 0.3, window=window)
    assert _rel(got, want) < 1e-5
    assert _rel(torch.ops.longfx.kv_quant_attention(q, *st.tensors(), 0.3, 4, group, None, None,
                                                    window), want) < 1e-5
    sk, sv = 3 * k[:, :, :3], v[:, :, :3] + 2                 # a sink copy unlike the state
    with_sinks = R.with_sinks(kd, vd, sk, sv)
    assert _rel(R.attention_decode(q, st, 0.3, sk, sv, window),
                _brute_force_window(q, *with_sinks, 0.3, window)) < 1e-5
    if 0 < window < L:
        assert _rel(R.attention_decode(q, st, 0.3), want) > 0.05     # the window matters


def test_decode_mask_and_window_errors():
    m = R.decode_mask(3, 8, 4)
    assert m.tolist() == [[j <= 5 + i and j >= 5 + i - 3 for j in range(8)] for i in range(3)]
    assert torch.equal(R.decode_mask(2, 5, 0), torch.ones(2, 5, dtype=torch.bool).tril(3))
    st = R.QuantizedKV.empty(1, 2, 16, 32, R.KVQuantConfig(4, 16, 16), torch.float32)
    R.append(st, *_kv(1, 2, 5, 16))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="window"):
            R.attention_decode(torch.zeros(1, 2, 1, 16), st, window=bad)
