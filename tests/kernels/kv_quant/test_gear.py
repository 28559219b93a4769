"""GEAR's stored correction (kernels/kv_quant/gear.py): error strictly below plain KIVI
quantization on data with outliers, outliers reproduced exactly, the low rank really fitted,
streaming appends equal one-shot compression, and bytes counted from the tensors."""
import math

import pytest
import torch

from longfx.kernels.kv_quant import gear as G
from longfx.kernels.kv_quant import reference as R


def _outlier_kv(B, H, T, D, seed=0):
    """Keys with outlier channels and scattered spikes; values with spikes (GEAR's setting)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) * torch.linspace(0.3, 3.0, D)
    k[..., 1] += 8.0
    v = torch.randn(B, H, T, D, generator=g)
    for x in (k, v):
        spikes = torch.rand(x.shape, generator=g) < 0.004
        x[spikes] += 25.0 * torch.sign(torch.randn(int(spikes.sum()), generator=g))
    return k, v


@pytest.mark.parametrize("bits", (4, 2))
@pytest.mark.parametrize("D,group", [(80, 32), (48, 16), (64, 64)])
def test_gear_error_strictly_below_plain_quantization(bits, D, group):
    kv = R.KVQuantConfig(bits=bits, group=group)
    k, v = _outlier_kv(2, 3, 3 * group, D, seed=bits + D)
    for kind, x in (("keys", k), ("values", v)):
        plain = (R.roundtrip_keys if kind == "keys" else R.roundtrip_values)(x, kv)
        e_plain = float((plain - x).norm())
        e_out = float((G.roundtrip(x, kind, G.GearConfig(kv, 0, 0.01)) - x).norm())
        e_low = float((G.roundtrip(x, kind, G.GearConfig(kv, 4, 0.0)) - x).norm())
        e_both = float((G.roundtrip(x, kind, G.GearConfig(kv, 4, 0.01)) - x).norm())
        assert e_out < 0.9 * e_plain and e_low < e_plain, (kind, e_plain, e_out, e_low)
        assert e_both < min(e_out, e_low), (kind, e_out, e_low, e_both)
        # rank 0, no outliers: exactly plain KIVI
        assert torch.equal(G.roundtrip(x, kind, G.GearConfig(kv, 0, 0.0)), plain)


def test_outliers_exact_and_low_rank_is_the_svd_of_the_error():
    kv = R.KVQuantConfig(bits=2, group=16)
    cfg = G.GearConfig(kv, rank=3, outliers=0.02)
    k, _ = _outlier_kv(1, 2, 32, 24, seed=5)
    codes, params, ov, oi, la, lb = G.compress(k, "keys", cfg)
    n = math.ceil(0.02 * 16 * 24)
    assert ov.shape == oi.shape == (1, 2, 2, n) and ov.dtype == torch.float16
    assert oi.dtype == torch.int16 and la.shape == (1, 2, 2, 16, 3) and lb.shape == (1, 2, 2, 3, 24)
    out = G.decompress(codes, params, ov, oi, la, lb, "keys", cfg).view(1, 2, 2, 16 * 24)
    flat = k.view(1, 2, 2, 16 * 24)
    got = out.gather(-1, oi.long())
    torch.testing.assert_close(got, flat.gather(-1, oi.long()).half().float(), rtol=0, atol=0)
    # the spikes (|x| ≳ 20 off the channel) are among the stored outliers
    spikes = (k.view(1, 2, 2, 16 * 24) - k.view(1, 2, 2, 16, 24).median(3, keepdim=True).values
              .expand(-1, -1, -1, 16, -1).reshape(1, 2, 2, -1)).abs() > 20
    kept = torch.zeros_like(spikes).scatter(-1, oi.long(), True)
    assert bool(kept[spikes].all())
    # low rank: the rank-3 factors reduce the error left after quantization + outliers by the
    # energy of the top-3 singular values of that error (fp16 factors: small tolerance)
    no_lr = G.decompress(codes, params, ov, oi, la[..., :0], lb[..., :0, :], "keys", cfg)
    err = (k - no_lr).view(1, 2, 2, 16, 24)
    s = torch.linalg.svdvals(err)
    want = (s[..., 3:] ** 2).sum((-1,)).sqrt()
    got_err = (k - out.view(1, 2, 32, 24)).view(1, 2, 2, 16, 24).flatten(-2).norm(dim=-1)
    assert bool((got_err <= want * 1.01 + 1e-3).all()), (got_err, want)


@pytest.mark.parametrize("bits,residual,group", [(4, 20, 8), (2, 0, 16), (2, 33, 16)])
def test_streaming_append_equals_one_shot_compression(bits, residual, group):
    kv = R.KVQuantConfig(bits=bits, group=group, residual=residual)
    cfg = G.GearConfig(kv, rank=2, outliers=0.03)
    k, v = _outlier_kv(2, 2, 150, 24, seed=bits)
    st = R.QuantizedKV.empty(2, 2, 24, 150, kv, torch.float32)
    ex = G.empty_extras(2, 2, 24, st.k_codes.shape[2] // group, cfg)
    pos = 0
    for s in (7, 1, 40, 1, 1, 63, 37):
        G.append(st, ex, k[:, :, pos:pos + s], v[:, :, pos:pos + s], cfg)
        pos += s
    assert int(st.length) == 150
    gk, gv = G.read(st, ex, 150, cfg)
    n = R.n_packed(150, kv)
    torch.testing.assert_close(gk[:, :, :n], G.roundtrip(k[:, :, :n], "keys", cfg), rtol=0, atol=0)
    torch.testing.assert_close(gv[:, :, :n], G.roundtrip(v[:, :, :n], "values", cfg), rtol=0, atol=0)
    assert torch.equal(gk[:, :, n:], k[:, :, n:]) and torch.equal(gv[:, :, n:], v[:, :, n:])
    more = torch.zeros(2, 2, st.capacity - 150 + 1, 24)
    with pytest.raises(ValueError, match="capacity"):
        G.append(st, ex, more, more, cfg)


def test_bytes_and_config_errors():
    kv = R.KVQuantConfig(bits=4, group=64)
    cfg = G.GearConfig(kv, rank=4, outliers=0.01)
    ex = G.empty_extras(1, 1, 64, 512, cfg, "meta")                 # 32768 tokens, D = 64
    n = math.ceil(0.01 * 64 * 64)
    per_group = 2 * (n * 2 + n * 2 + 64 * 4 * 2 + 4 * 64 * 2)      # k and v: vals, idx, a, b
    assert G.extras_bytes(ex) == 512 * per_group
    base = R.state_bytes(32768, 1, 64, kv)
    assert G.state_bytes(32768, 1, 64, cfg) == base + R.n_packed(32768, kv) // 64 * per_group
    ratio = G.memory_ratio(32768, 1, 64, cfg)
    assert ratio == pytest.approx(R.memory_ratio(32768, 1, 64, kv) + 0.125 + 0.02, abs=2e-3)
    assert G.GearConfig(R.KVQuantConfig(group=256), 1, 0.01).index_dtype(256) == torch.int32
    with pytest.raises(ValueError, match="rank"):
        G.GearConfig(kv, rank=-1)
    with pytest.raises(ValueError, match="outliers"):
        G.GearConfig(kv, outliers=1.0)
    with pytest.raises(ValueError, match="kind"):
        G.compress(torch.zeros(1, 1, 64, 64), "queries", cfg)
