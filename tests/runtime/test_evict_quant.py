"""SnapKV eviction storing its kept tokens KIVI-quantized (``snapkv(...) + kv_quant(...)``:
EvictCache with a QuantizedStore, runtime/evict_cache.py) on the zoo llama, eager and through
longfx.compile: with nothing evicted it equals kv_quant alone bit for bit; evicting, it keeps the
tokens SnapKV alone keeps (chunk scoring on one chunk: exact keys on both sides) or the ones the
dequantized keys vote for (prompt-end scoring), stores them within a quantization step of what
it read, and holds about kept/seen of kv_quant's bytes; generate() runs on it."""
import pytest
import torch
from transformers import DynamicCache

import longfx
from longfx.eval import infer
from longfx.kernels.kv_evict import reference as E
from longfx.kernels.kv_quant import reference as Q
from longfx.kernels.kv_quant.gear import GearConfig
from longfx.recipes import parse
from longfx.rewrite.testing import zoo
from longfx.runtime.cache import GearCache, GearKVLayer, QuantizedCache, QuantizedKVLayer
from longfx.runtime.evict_cache import EvictCache, QuantizedStore

pytestmark = pytest.mark.filterwarnings("ignore")

KV = Q.KVQuantConfig(bits=4, group=8, residual=8)          # ring of 8: packing starts early
SINK = 2
_ids, _feed = zoo.token_ids, zoo.feed


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


def _quantized(gear: bool = False):
    """(a plain quantized cache for the model, a store factory of the same layers)."""
    if gear:
        g = GearConfig(KV, rank=2, outliers=0.02)
        return (lambda config: GearCache(g, config=config, block=8, sink=SINK),
                lambda: QuantizedStore(GearKVLayer(g, block=8, sink=SINK)))
    return (lambda config: QuantizedCache(KV, config=config, block=8, sink=SINK),
            lambda: QuantizedStore(QuantizedKVLayer(KV, block=8, sink=SINK)))


def _snapkv(budget=None, ratio=None, when="prompt"):
    return E.SnapKVConfig(budget=budget, ratio=ratio, window=4, kernel=3, when=when)


@pytest.mark.parametrize("when", ["prompt", "chunk"])
@pytest.mark.parametrize("gear", [False, True])
def test_no_eviction_equals_kv_quant_alone_exactly(llama, when, gear):
    ids = _ids(50, batch=2)
    chunks = (9, 1, 17, 1, 1, 11, 1, 1, 8)                 # prefill chunks and decode steps
    plain, store = _quantized(gear)
    want_cache = plain(llama.config)
    want = _feed(llama, ids, want_cache, chunks)
    cache = EvictCache(_snapkv(budget=64, when=when), model=llama, store=store)
    got = _feed(llama, ids, cache, chunks)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 50 and cache.kept() == 50
    assert cache.layers[0].store.layer.state.k_codes.shape[2] >= 40     # groups were packed
    assert cache.nbytes() == want_cache.nbytes()
    for a, b in zip(cache.layers, want_cache.layers):
        assert torch.equal(a.keys, b.read()[0]) and torch.equal(a.values, b.read()[1])


def _layer0_positions(kept, full, tol):
    """Per KV head, the position in ``full`` [B, Hkv, T, D] of each kept key [B, Hkv, K, D]
    (the nearest one, which must be within ``tol``): [B, Hkv, K]."""
    d = (kept[:, :, :, None] - full[:, :, None]).abs().amax(-1)          # [B, Hkv, K, T]
    assert bool((d.amin(-1) <= tol).all())
    return d.argmin(-1)


def _within_a_step(layer, kept_k, kept_v, exact_k, exact_v):
    """The quantized layer's keys/values equal ``exact`` within half a quantization step of the
    packed groups and exactly elsewhere (ring, sink copy)."""
    st, c = layer.state, layer.config
    n = Q.n_packed(layer.length, c)
    kstep = Q.step_size(st.k_params[:, :, :n // c.group].transpose(-1, -2), c.bits)  # [B,H,n/g,D]
    kstep = kstep.repeat_interleave(c.group, 2)                                     # [B,H,n,D]
    vstep = Q.step_size(st.v_params[:, :, :n].transpose(-1, -2), c.bits)            # [B,H,n,Jv]
    vstep = vstep.repeat_interleave(c.group, -1)[..., :kept_v.shape[-1]]            # [B,H,n,D]
    s = layer.sink
    assert bool(((kept_k[:, :, s:n] - exact_k[:, :, s:n]).abs() <= kstep[:, :, s:] / 2 + 1e-5).all())
    assert bool(((kept_v[:, :, s:n] - exact_v[:, :, s:n]).abs() <= vstep[:, :, s:] / 2 + 1e-5).all())
    assert torch.equal(kept_k[:, :, :s], exact_k[:, :, :s])                          # sinks exact
    assert torch.equal(kept_k[:, :, n:], exact_k[:, :, n:])                          # ring exact
    assert torch.equal(kept_v[:, :, n:], exact_v[:, :, n:])
    assert not torch.equal(kept_k[:, :, s:n], exact_k[:, :, s:n])                    # quantized


def test_chunk_scoring_keeps_the_tokens_snapkv_alone_keeps(llama):
    """One prefill chunk: both caches score the chunk's exact keys, so every layer keeps the same
    per-head token set; the composed cache stores those tokens quantized, bit for bit what a
    quantized layer holding SnapKV's kept tokens holds."""
    ids = _ids(48)
    _, store = _quantized()
    alone = EvictCache(_snapkv(budget=24, when="chunk"), model=llama)
    both = EvictCache(_snapkv(budget=24, when="chunk"), model=llama, store=store)
    dense = DynamicCache(config=llama.config)
    for c in (alone, both, dense):
        _feed(llama, ids, c, (48,))
    assert alone.kept() == both.kept() == 24 and both.get_seq_length() == 48
    pos_alone = _layer0_positions(alone.layers[0].keys, dense.layers[0].keys, 0)
    step = Q.step_size(both.layers[0].store.layer.state.k_params.transpose(-1, -2), KV.bits)
    pos_both = _layer0_positions(both.layers[0].keys, dense.layers[0].keys, float(step.max()) / 2)
    assert pos_both.tolist() == pos_alone.tolist()                   # same tokens per head
    assert pos_alone[0, 0].tolist() != pos_alone[0, 1].tolist()      # (and they differ by head)
    for a, b in zip(alone.layers, both.layers):
        ref = QuantizedKVLayer(KV, block=8, sink=SINK)
        ref.replace(a.keys, a.values)
        assert torch.equal(b.keys, ref.read()[0]) and torch.equal(b.values, ref.read()[1])
        _within_a_step(b.store.layer, b.keys, b.values, a.keys, a.values)


def test_prompt_end_scoring_reads_the_dequantized_keys(llama):
    """SnapKV at the prompt's end (the default): the prompt is stored quantized like kv_quant
    alone; the first decode step votes over the keys attention reads (dequantized) and keeps the
    voted tokens, re-stored within a quantization step of their kv_quant values."""
    ids, step = _ids(48), _ids(1, seed=1)
    plain, store = _quantized()
    kvq = plain(llama.config)
    both = EvictCache(_snapkv(budget=24), model=llama, store=store)
    _feed(llama, ids, kvq, (20, 28))
    _feed(llama, ids, both, (20, 28))
    k0, v0 = kvq.layers[0].read()                                  # what kv_quant alone holds
    assert torch.equal(both.layers[0].keys, k0) and both.kept() == 48
    # the window queries of the prompt's last chunk (layer 0: no cache dependence)
    attn = llama.model.layers[0].self_attn
    q = zoo.first_layer_queries(llama, ids)                         # [1, H, 48, D]
    idx = E.snapkv_keep(E.snapkv_scores(q[:, :, -4:], k0, attn.scaling, 3), 24, 4)  # [1, 2, 24]
    _feed(llama, step, both, (1,))
    assert both.kept() == 25 and both.get_seq_length() == 49
    layer = both.layers[0].store.layer
    kept_k, kept_v = both.layers[0].keys[:, :, :24], both.layers[0].values[:, :, :24]
    _within_a_step(layer, kept_k, kept_v, E.gather_tokens(k0, idx), E.gather_tokens(v0, idx))


def test_bytes_follow_the_kept_share_of_kv_quant(llama):
    """Half the tokens kept: about half of kv_quant's bytes (its ring and sink copy, a fixed cost
    per layer, are 3 % of them here), fewer than either recipe alone."""
    ids = _ids(1600)
    plain, store = _quantized()
    kvq, alone = plain(llama.config), EvictCache(_snapkv(ratio=0.5), model=llama)
    both = EvictCache(_snapkv(ratio=0.5), model=llama, store=store)
    for c in (kvq, alone, both):
        _feed(llama, ids, c, (400, 400, 400, 400))
        _feed(llama, _ids(1, seed=1), c, (1,))                      # SnapKV compresses here
    seen, kept = both.get_seq_length(), both.kept()
    assert (seen, kept) == (1601, 801) == (alone.get_seq_length(), alone.kept())
    # the same bytes a quantized layer of `kept` tokens holds, per layer
    for layer in both.layers:
        ref = QuantizedKVLayer(KV, block=8, sink=SINK)
        ref.replace(*layer.store.layer.read())
        assert layer.nbytes() == ref.nbytes()
    ratio = both.nbytes() / kvq.nbytes()
    assert abs(ratio - kept / seen) < 0.03, ratio
    assert both.nbytes() < kvq.nbytes() and both.nbytes() < alone.nbytes()
    assert both.dense_nbytes() == kvq.dense_nbytes()              # K + V of every seen token


def test_compiled_recipe_prefills_in_chunks_decodes_and_generates(llama):
    """``longfx.compile(model, "snapkv(...) + kv_quant(...)")``: chunked prefill equals the eager
    composed cache, greedy decoding compresses once, generate() equals eager generate."""
    text = "snapkv(ratio=0.5, window=4, kernel=3) + kv_quant(bits=4, group=8, residual=8)"
    fast = longfx.compile(llama, text)
    ids = _ids(120)[0]
    eager_cache = parse(text).recipes[0].make_cache(llama, store=parse(text).recipes[1])
    for (_s, logits, cache), (_, ref, _) in zip(infer.chunked_logits(fast, ids, chunk=32),
                                               infer.chunked_logits(llama, ids, chunk=32,
                                                                    cache=eager_cache)):
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)   # compiled = eager
    assert isinstance(cache, EvictCache) and not cache.layers[0].store.plain
    assert cache.kept() == 120 and infer.kv_bytes(cache) == cache.nbytes()   # not yet compressed
    toks = infer.greedy(fast, ids, 4, chunk=32)
    assert len(toks) == 4
    out = fast.generate(ids[None], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    gen_cache = parse(text).recipes[0].make_cache(llama, store=parse(text).recipes[1])
    ref = llama.generate(ids[None], past_key_values=gen_cache, max_new_tokens=4,
                         do_sample=False, min_new_tokens=4)
    assert torch.equal(out, ref) and out[0, 120:].tolist() == toks
    assert gen_cache.kept() == 60 + 3 and gen_cache.get_seq_length() == 123
    assert not [w for w in fast.longfx_backend.report.warnings if "graph break" in w]


def test_generate_with_beams_reorders_the_quantized_store(llama):
    ids = _ids(30, batch=1, seed=5)
    _, store = _quantized()
    cache = EvictCache(_snapkv(budget=12), model=llama, store=store)
    out = llama.generate(ids, past_key_values=cache, max_new_tokens=4, num_beams=2,
                         do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 34) and cache.layers[0].store.layer.state.k_ring.shape[0] == 2
    assert cache.kept() == 12 + 3
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.layers[0].crop(1)


@pytest.mark.parametrize("policy", [E.H2OConfig(budget=16, recent=4), E.StreamingConfig(2, 14)])
def test_runtime_h2o_and_streaming_run_on_a_quantized_store(llama, policy):
    """The generic store under H2O (not offered as a recipe: each decode-token eviction
    re-quantizes the kept keys) and StreamingLLM (the recipe uses StreamingQuantizedStore
    instead, which never re-quantizes: test_evict_streaming_quant.py): the cache stays at the budget and reads like plain eviction within the
    quantization error on the first chunk."""
    ids = _ids(40)
    _, store = _quantized()
    both = EvictCache(policy, model=llama, store=store)
    alone = EvictCache(policy, model=llama)
    _feed(llama, ids, both, (24,))
    _feed(llama, ids, alone, (24,))
    _within_a_step(both.layers[0].store.layer, both.layers[0].keys, both.layers[0].values,
                   alone.layers[0].keys, alone.layers[0].values)
    _feed(llama, ids[:, 24:], both, (10, 1, 1, 1, 1, 1, 1))
    assert both.kept() == 16 and both.get_seq_length() == 40
    assert both.layers[1].store.layer.length == 16
