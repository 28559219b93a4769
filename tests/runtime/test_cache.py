"""QuantizedCache (runtime/cache.py): the layer's packed state equals the reference state fed
the same appends, reads equal the reference dequantization, the memory ratio read off its own
tensors meets issue 6's budget, and HF models run on it in eager mode."""
import pytest
import torch
from transformers import DynamicCache

from longfx.kernels.kv_quant import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.cache import QuantizedCache, QuantizedKVLayer

pytestmark = pytest.mark.filterwarnings("ignore")


def _kv(B, H, T, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) * torch.linspace(0.2, 4.0, D)   # channel outliers
    return k.to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)


@pytest.mark.parametrize("bits,scales", [(8, "u8"), (4, "u8"), (2, "u8"), (4, "fp16")])
def test_layer_state_and_reads_equal_the_reference(bits, scales):
    config = R.KVQuantConfig(bits=bits, group=8, residual=12, scales=scales)   # ring 16
    layer = QuantizedKVLayer(config, block=8)
    ref = R.QuantizedKV.empty(2, 3, 16, 200, config, torch.float32)
    k, v = _kv(2, 3, 75, 16, seed=bits)
    pos = 0
    for s in (5, 1, 17, 1, 1, 30, 1, 19):                  # prefill chunks and decode steps
        kc, vc = k[:, :, pos:pos + s], v[:, :, pos:pos + s]
        before = R.dequantize_state(ref) if pos else (k[:, :, :0], v[:, :, :0])
        got_k, got_v = layer.update(kc, vc, 0)
        R.append(ref, kc, vc)
        pos += s
        if s == 1:       # decode reads the state after the append
            want_k, want_v = R.dequantize_state(ref)
        else:            # prefill: the stored past dequantized + the chunk in full precision
            want_k, want_v = torch.cat((before[0], kc), 2), torch.cat((before[1], vc), 2)
        assert layer.get_seq_length() == pos and got_k.shape == (2, 3, pos, 16)
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
    n = R.n_packed(pos, config)
    st = layer.state
    assert int(st.length) == pos and st.k_codes.shape[2] >= n
    for name in ("k_codes", "v_codes", "v_params"):
        assert torch.equal(getattr(st, name)[:, :, :n], getattr(ref, name)[:, :, :n]), name
    assert torch.equal(st.k_params[:, :, :n // 8], ref.k_params[:, :, :n // 8])
    assert torch.equal(st.k_ring, ref.k_ring) and torch.equal(st.v_ring, ref.v_ring)
    # quantized keys are off by at most half a step, the ring is exact
    full_k, _ = layer._read(pos)
    err = (full_k[:, :, :n] - k[:, :, :n]).abs()
    step = R.step_size(ref.k_params[:, :, :n // 8].transpose(-1, -2), bits)      # [B,H,n/g,D]
    assert bool((err.view(2, 3, n // 8, 8, 16) <= step[:, :, :, None] / 2 + 1e-5).all())
    assert torch.equal(full_k[:, :, n:], k[:, :, n:pos])


@pytest.mark.parametrize("bits,budget", [(4, 0.27), (2, 0.15)])
def test_memory_from_the_cache_tensors_meets_the_issue_budget(bits, budget):
    """32k tokens, head_dim 128, bf16: bytes of the cache's own tensors over a bf16 K+V cache."""
    cache = QuantizedCache(R.KVQuantConfig(bits=bits))
    k, v = _kv(1, 1, 32768, 128, seed=0, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    plain = 2 * k.numel() * k.element_size()
    assert cache.dense_nbytes() == plain
    ratio = cache.nbytes() / plain
    assert ratio <= budget, ratio
    assert ratio == pytest.approx(R.memory_ratio(32768, 1, 128, R.KVQuantConfig(bits=bits)), rel=0.01)
    assert cache.layers[0].state.k_codes.dtype == torch.uint8
    assert cache.layers[0].state.k_codes.shape[-1] == 128 * bits // 8   # really packed


def test_eager_model_on_the_cache():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        out = {}
        for bits in (8, 2):
            cache = QuantizedCache(R.KVQuantConfig(bits=bits, group=16, residual=16), model.config)
            parts = [model(input_ids=ids[:, s:s + 32], past_key_values=cache, use_cache=True).logits
                     for s in range(0, 96, 32)]
            assert cache.get_seq_length() == 96 and len(cache.layers) == model.config.num_hidden_layers
            out[bits] = float((torch.cat(parts, 1) - dense).abs().max() / dense.abs().max())
            assert cache.nbytes() < cache.dense_nbytes()
    assert out[8] < 2e-3 and out[8] < out[2] < 0.2, out


def test_eager_generate_with_the_cache_equals_dynamic_while_nothing_is_packed():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                        # left padding
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    big_ring = R.KVQuantConfig(bits=2, group=16, residual=32)          # 20 tokens: all in the ring
    with torch.no_grad():
        want = model.generate(**kw, past_key_values=DynamicCache(config=model.config))
        got = model.generate(**kw, past_key_values=QuantizedCache(big_ring, model.config))
    assert torch.equal(got, want)


def test_crop_is_refused_and_beam_reorder_permutes():
    layer = QuantizedKVLayer(R.KVQuantConfig(bits=4, group=8, residual=8))
    k, v = _kv(3, 1, 20, 8, seed=2)
    layer.update(k, v, 0)
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(1)
    before = layer._read(20)[0]
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    # equal up to float rounding: the dequantizing kernels may fuse code·a + b into one FMA for
    # some rows and not others (seen on an AMD EPYC, 2026-11-24: 4.8e-7 apart), while a wrong
    # permutation would be O(1) off
    torch.testing.assert_close(layer._read(20)[0], before[[2, 0, 1]], rtol=1e-6, atol=1e-6)


def test_sink_tokens_are_read_exact_and_counted():
    config = R.KVQuantConfig(bits=2, group=8, residual=8)
    plain, sunk = QuantizedKVLayer(config, block=8), QuantizedKVLayer(config, block=8, sink=4)
    k, v = _kv(2, 3, 70, 16, seed=4)
    pos = 0
    for s in (1, 2, 1, 30, 1, 35):                       # sinks arrive across several appends
        a = plain.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        b = sunk.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        pos += s
        n = min(4, b[0].shape[2])
        assert torch.equal(b[0][:, :, :n], k[:, :, :n]) and torch.equal(b[1][:, :, :n], v[:, :, :n])
        assert torch.equal(a[0][:, :, n:], b[0][:, :, n:]) and torch.equal(a[1][:, :, n:], b[1][:, :, n:])
    assert not torch.equal(plain._read(70)[0][:, :, :4], k[:, :, :4])     # quantized without
    for name in R.QuantizedKV.NAMES:                       # the packed state itself is unchanged
        assert torch.equal(getattr(plain.state, name), getattr(sunk.state, name)), name
    assert sunk.nbytes() == plain.nbytes() + 2 * 2 * 3 * 4 * 16 * 4
    sunk.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(sunk._read(70)[0][:, :, :4], k[[1, 0], :, :4])


def test_gear_layer_corrects_and_counts_its_bytes():
    from longfx.kernels.kv_quant import gear as G
    from longfx.runtime.cache import GearKVLayer

    config = R.KVQuantConfig(bits=2, group=8, residual=8)
    cfg = G.GearConfig(config, rank=2, outliers=0.05)
    plain, gear = QuantizedKVLayer(config, block=8), GearKVLayer(cfg, block=8)
    k, v = _kv(1, 2, 60, 16, seed=5)
    k[0, 1, 17, 5] += 30.0                                 # a spike
    pos = 0
    for s in (20, 1, 1, 38):
        plain.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        gear.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        pos += s
    (pk, pv), (gk, gv) = plain._read(60), gear._read(60)
    assert float((gk - k).norm()) < 0.8 * float((pk - k).norm())
    assert float((gv - v).norm()) < float((pv - v).norm())
    n = R.n_packed(60, config)
    torch.testing.assert_close(gk[:, :, :n], G.roundtrip(k[:, :, :n], "keys", cfg), rtol=0, atol=0)
    groups = gear.state.k_codes.shape[2] // 8
    assert all(t.shape[2] == groups for t in gear.extras.values())
    assert gear.nbytes() == plain.nbytes() + G.extras_bytes(gear.extras) > plain.nbytes()


def test_eager_generate_through_gear_and_sink_caches():
    from longfx.kernels.kv_quant import gear as G
    from longfx.runtime.cache import GearCache

    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(6))
    kw = dict(input_ids=ids, max_new_tokens=24, do_sample=False)
    small = R.KVQuantConfig(bits=2, group=16, residual=16)
    with torch.no_grad():
        dense = model.generate(**kw, past_key_values=DynamicCache(config=model.config))
        caches = {"gear": GearCache(G.GearConfig(small, rank=4, outliers=0.02), model.config),
                  "sink": QuantizedCache(small, model.config, sink=4),
                  "plain": QuantizedCache(small, model.config)}
        outs = {name: model.generate(**kw, past_key_values=c) for name, c in caches.items()}
        full = torch.cat((ids, dense[:, 40:]), 1)          # teacher-forced logits over dense text
        logits = {}
        for name, c in [("dense", DynamicCache(config=model.config))] + [
                (n, type(c)(c.gear if n == "gear" else c.kv, model.config, sink=c.sink))
                for n, c in caches.items()]:
            logits[name] = torch.cat([model(input_ids=full[:, s:s + 16], past_key_values=c,
                                            use_cache=True).logits for s in range(0, 64, 16)], 1)
    for name, out in outs.items():
        assert out.shape == (2, 64) and torch.equal(out[:, :40], ids)
        assert caches[name].get_seq_length() == 63        # the last token is never fed back
    err = {n: float((logits[n] - logits["dense"]).abs().max()) for n in caches}
    assert err["gear"] < err["plain"], err
    assert caches["gear"].nbytes() > caches["plain"].nbytes()
    assert caches["sink"].nbytes() == caches["plain"].nbytes() + 2 * 2 * 4 * 4 * \
        model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) \
        * model.config.num_hidden_layers


@pytest.mark.parametrize("bits,budget", [(4, 0.27), (2, 0.15)])
def test_memory_with_sink_tokens_still_meets_the_issue_budget(bits, budget):
    """The exact sink copy (4 tokens of K + V) is counted and keeps the state within budget."""
    cache = QuantizedCache(R.KVQuantConfig(bits=bits), sink=4)
    k, v = _kv(1, 1, 32768, 128, seed=0, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.sink_k.shape == (1, 1, 4, 128)
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in layer.state.tensors()) \
        + 2 * 4 * 128 * 2
    assert cache.nbytes() / cache.dense_nbytes() <= budget


@pytest.mark.parametrize("rotate,clip", [(True, False), (False, True), (True, True)])
def test_rotated_clipped_layer_reads_like_the_fake_quantizer_for_the_same_bytes(rotate, clip):
    """rotate=True stores k·Q, v·Q and reads them back through Qᵀ; clip=True appends through
    the reference with the range search. Prefill reads equal fake_quantize of the past (the same
    rotation and clipping), the ring and the sinks come back exact (to fp32 rounding), and the
    layer holds exactly the bytes of the plain layer."""
    config = R.KVQuantConfig(bits=2, group=8, residual=8, rotate=rotate, clip=clip)
    plain_cfg = R.KVQuantConfig(bits=2, group=8, residual=8)
    layer = QuantizedKVLayer(config, block=8, sink=2)
    plain = QuantizedKVLayer(plain_cfg, block=8, sink=2)
    k, v = _kv(2, 3, 70, 16, seed=6)
    v[..., 5] *= 20.0                              # a value outlier channel (QuaRot's case)
    pos = 0
    for s in (3, 20, 1, 25, 1, 20):
        got = layer.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        plain.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        past = pos if s > 1 else pos + s
        pos += s
        want = R.fake_quantize(k[:, :, :past], v[:, :, :past], config)
        for g, w, x in zip(got, want, (k, v)):
            w = torch.cat((x[:, :, :min(2, past)], w[:, :, 2:]), 2)          # sinks exact
            torch.testing.assert_close(g[:, :, :past], w, rtol=0, atol=1e-5)
            if s > 1:
                assert torch.equal(g[:, :, past:], x[:, :, past:pos])   # the chunk itself
    n = R.n_packed(pos, config)
    k_read, v_read = layer.read()
    torch.testing.assert_close(k_read[:, :, n:], k[:, :, n:pos], rtol=0, atol=1e-5)   # ring
    assert layer.nbytes() == plain.nbytes()
    if rotate:     # the state holds the rotated ring
        q = R.rotation(16)
        slots = torch.arange(n, pos) % config.ring
        torch.testing.assert_close(layer.state.k_ring[:, :, slots], R.rotate(k[:, :, n:pos], q),
                                   rtol=0, atol=1e-6)
    # values with an outlier channel (quantized per token): a lower error than the plain state
    err = lambda a: float((a[:, :, 2:n] - v[:, :, 2:n]).square().mean())         # noqa: E731
    assert err(v_read) < 0.8 * err(plain.read()[1])


def test_rotated_cache_runs_a_model_and_composes_with_beam_reorder():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 64), generator=torch.Generator().manual_seed(3))
    config = R.KVQuantConfig(bits=4, group=16, residual=16, rotate=True, clip=True)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        cache = QuantizedCache(config, model.config, sink=2)
        got = torch.cat([model(input_ids=ids[:, s:s + 16], past_key_values=cache,
                               use_cache=True).logits for s in range(0, 64, 16)], 1)
    assert float((got - dense).abs().max() / dense.abs().max()) < 0.05
    assert "rotate=True, clip=True" in repr(cache)
    before = cache.layers[0].read()[0]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].read()[0], before[[1, 0]])


@pytest.mark.parametrize("kind", ["kivi", "gear", "sink"])
def test_sliding_layer_keeps_its_window_in_whole_groups_read_back_unchanged(kind):
    """A windowed layer (Gemma's sliding layers) drops the packed groups no later query sees:
    what it returns is exactly the tail of what an unwindowed layer returns for the same
    appends (groups are moved, not re-quantized), and its bytes stop growing."""
    from longfx.kernels.kv_quant import gear as G
    from longfx.runtime.cache import GearKVLayer

    config = R.KVQuantConfig(bits=2, group=8, residual=12)                  # ring 16
    window, sink = 20, (4 if kind == "sink" else 0)

    def make(w):
        if kind == "gear":
            return GearKVLayer(G.GearConfig(config, rank=2, outliers=0.05), block=8, window=w)
        return QuantizedKVLayer(config, block=8, sink=sink, window=w)

    full, win = make(None), make(window)
    assert win.is_sliding and not full.is_sliding and win.get_max_length() == window
    k, v = _kv(2, 3, 270, 16, seed=9)
    pos, sizes = 0, []
    for s in (3, 1, 37, 1, 1, 1, 60, 1, 9, 1, 1, 80, 1, 1, 1, 1, 61):       # chunks and decode
        length, offset = win.get_mask_sizes(s)
        a = full.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        b = win.update(k[:, :, pos:pos + s], v[:, :, pos:pos + s], 0)
        pos += s
        assert b[0].shape[2] == length and offset + length == pos      # the mask's key range
        assert torch.equal(b[0], a[0][:, :, offset:]) and torch.equal(b[1], a[1][:, :, offset:])
        assert win.get_seq_length() == full.get_seq_length() == pos
        # held after the call: the window, plus at most one partial group and the ring
        assert win.length <= window - 1 + config.group - 1 + config.ring
        assert win.offset % config.group == 0 and win.state.length.item() == win.length
        sizes.append(win.nbytes())
    assert win.offset > 200 and win.nbytes() < full.nbytes() / 2
    assert max(sizes[8:]) <= max(sizes[:8])             # bounded: no growth with the sequence
    if kind == "sink":
        assert win.sink_k is None                       # those positions left the window


def test_model_on_a_windowed_cache_equals_the_unwindowed_one():
    """zoo Gemma3 (layer 0 slides over 4 tokens): the cache made from the config windows layer 0
    and the logits and greedy tokens equal those of a cache keeping every token."""
    model, _ = zoo.build("gemma3")
    config = R.KVQuantConfig(bits=2, group=8, residual=8)
    ids = torch.randint(3, 120, (1, 72), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        windowed = QuantizedCache(config, model.config)
        assert [getattr(layer, "window", None) for layer in windowed.layers] == \
            [model.config.sliding_window, None]
        whole = QuantizedCache(config)                  # no config: no windows
        a = torch.cat([model(input_ids=ids[:, s:s + 24], past_key_values=whole,
                             use_cache=True).logits for s in range(0, 72, 24)], 1)
        b = torch.cat([model(input_ids=ids[:, s:s + 24], past_key_values=windowed,
                             use_cache=True).logits for s in range(0, 72, 24)], 1)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert windowed.layers[0].nbytes() < whole.layers[0].nbytes()
        kw = dict(input_ids=ids[:, :40], max_new_tokens=30, do_sample=False)
        want = model.generate(**kw, past_key_values=QuantizedCache(config))
        got = model.generate(**kw, past_key_values=QuantizedCache(config, model.config))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_layer_windows_are_those_of_the_models_own_cache(name):
    from longfx.runtime.cache import layer_windows

    model, _ = zoo.build(name)
    own = DynamicCache(config=model.config).layers
    assert layer_windows(model.config) == [layer.sliding_window if layer.is_sliding else None
                                           for layer in own]
    assert layer_windows(None) == []
