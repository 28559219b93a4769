"""StreamingLLM eviction over a KIVI-quantized state (``streaming_kv(...) + kv_quant(...)``:
EvictCache with a StreamingQuantizedStore, runtime/evict_cache.py).

What must hold: attention reads exactly what ``kv_quant`` alone would read, restricted to
StreamingLLM's set (the sinks, exact, and the newest ``window`` tokens) and re-rotated like
``streaming_kv`` alone; a kept token reads back the same value at every step (nothing is quantized
twice); the held tokens and bytes stop growing with the sequence; with room for every token it
equals ``kv_quant`` alone bit for bit; the recipe compiles, generates and runs beam search."""
import pytest
import torch

import longfx
from longfx.eval import infer
from longfx.kernels.kv_evict import reference as E
from longfx.kernels.kv_quant import reference as Q
from longfx.kernels.kv_quant.gear import GearConfig
from longfx.passes.kv_quant import EvictQuantized, cache_recipe
from longfx.recipes import parse
from longfx.rewrite.testing import zoo
from longfx.runtime.cache import GearKVLayer, QuantizedCache, QuantizedKVLayer
from longfx.runtime.evict_cache import EvictCache, EvictLayer, StreamingQuantizedStore

pytestmark = pytest.mark.filterwarnings("ignore")

KV = Q.KVQuantConfig(bits=4, group=8, residual=8)          # ring of 8: packing starts early
SINK, WINDOW = 3, 21
_ids, _feed = zoo.token_ids, zoo.feed


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


def _layer(gear: bool, sink: int = 0):
    if gear:
        return GearKVLayer(GearConfig(KV, rank=2, outliers=0.02), block=8, sink=sink)
    return QuantizedKVLayer(KV, block=8, sink=sink)


def _store(gear: bool = False, sink: int = SINK, window: int = WINDOW):
    return lambda: StreamingQuantizedStore(_layer(gear), sink, window)


# prefill chunks and decode steps; some chunks straddle the sinks, the window and a group edge
STEPS = (2, 5, 1, 17, 1, 1, 30, 1, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 12, 1)


@pytest.mark.parametrize("gear", [False, True])
def test_reads_kv_quant_alone_restricted_to_the_streaming_set(gear):
    """Layer level, random keys/values: every update returns the reference kv_quant layer's read
    (sinks exact, the same quantization) at StreamingLLM's positions, the past re-rotated to the
    in-cache positions exactly as streaming_kv alone does it; a key keeps its value while kept."""
    torch.manual_seed(0)
    B, H, D = 2, 2, 16
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    layer = EvictLayer(E.StreamingConfig(SINK, WINDOW), inv_freq, _store(gear)())
    ref = _layer(gear, sink=SINK)                              # kv_quant alone, every token
    n, seen_at = 0, {}                                         # position -> first value read
    for s in STEPS:
        k, v = torch.randn(B, H, s, D), torch.randn(B, H, s, D)
        past = layer.kept
        got_k, got_v = layer.update(k, v)
        want_k, want_v = ref.update(k, v)                      # positions 0 .. n + s − 1
        first = max(min(SINK, n), n - WINDOW)
        pos = list(range(min(SINK, n))) + list(range(first, n + s))   # the policy's set
        assert len(pos) == past + s == got_k.shape[2]
        want_k, want_v = want_k[:, :, pos], want_v[:, :, pos]
        assert torch.equal(got_v, want_v)
        if past and n != past:                                 # evicted: re-rotated past
            delta = torch.arange(n - past, n) - torch.tensor(pos[:past])
            want_k = torch.cat((E.rerotate(want_k[:, :, :past], delta, inv_freq),
                                want_k[:, :, past:]), 2)
        assert torch.equal(got_k, want_k)
        n += s
        # what the layer holds now (true-position keys): the same value as when first read
        held_k, _ = layer.store.read()
        kept = list(range(min(SINK, n))) + list(range(max(min(SINK, n), n - WINDOW), n))
        assert held_k.shape[2] == len(kept) == layer.kept
        for i, p in enumerate(kept):
            if p < n - KV.residual or p < SINK:                # packed (or sink): final value
                first_seen = seen_at.setdefault(p, held_k[:, :, i].clone())
                assert torch.equal(held_k[:, :, i], first_seen), p
        # bounded: window + a group + the ring, whatever the sequence length
        assert layer.store.layer.length <= WINDOW + KV.group - 1 + KV.residual
    assert n == layer.seen == sum(STEPS) and layer.kept == SINK + WINDOW
    assert layer.store.layer.offset > 0                        # groups were dropped


def test_with_room_for_every_token_equals_kv_quant_alone_exactly(llama):
    ids = _ids(50, batch=2)
    chunks = (9, 1, 17, 1, 1, 11, 1, 1, 8)
    want_cache = QuantizedCache(KV, config=llama.config, block=8, sink=SINK)
    want = _feed(llama, ids, want_cache, chunks)
    cache = EvictCache(E.StreamingConfig(SINK, 64), model=llama, store=_store(window=64))
    got = _feed(llama, ids, cache, chunks)
    assert torch.equal(got, want)
    assert cache.kept() == 50 and cache.get_seq_length() == 50
    for a, b in zip(cache.layers, want_cache.layers):
        assert torch.equal(a.keys, b.read()[0]) and torch.equal(a.values, b.read()[1])


def test_bytes_stop_growing_and_undercut_both_recipes_alone(llama):
    """Past the window the bytes stop growing (they vary by a storage block, as whole groups
    leave); they are below streaming_kv alone (full precision)
    and, at a long sequence, below kv_quant alone (every token)."""
    ids = _ids(400)
    both = EvictCache(E.StreamingConfig(4, 96), model=llama, store=_store(sink=4, window=96))
    alone = EvictCache(E.StreamingConfig(4, 96), model=llama)
    kvq = QuantizedCache(KV, config=llama.config, block=8, sink=4)
    sizes = []
    for c in (both, alone, kvq):
        _feed(llama, ids[:, :200], c, (100, 100))
    for i in range(200, 400, 50):
        for c in (both, alone, kvq):
            _feed(llama, ids[:, i:i + 50], c, (49, 1))
        sizes.append(both.nbytes())
    assert max(sizes) == sizes[0] and max(sizes) - min(sizes) <= 1024, sizes
    assert both.kept() == alone.kept() == 100 and both.get_seq_length() == 400
    assert both.nbytes() < alone.nbytes() and both.nbytes() < kvq.nbytes() / 2
    assert both.dense_nbytes() == alone.dense_nbytes() == kvq.dense_nbytes()


def test_recipe_composes_compiles_and_generates(llama):
    text = "streaming_kv(sink=2, window=20) + kv_quant(bits=4, group=8, residual=8)"
    kv = cache_recipe(parse(text))
    assert isinstance(kv, EvictQuantized) and str(kv).startswith("streaming_kv(sink=2")
    assert isinstance(cache_recipe(parse("gear(bits=2) + streaming_kv")), EvictQuantized)
    cache = kv.make_cache(llama)
    assert isinstance(cache.layers[0].store, StreamingQuantizedStore)
    fast = longfx.compile(llama, text)
    ids = _ids(70)[0]
    eager = kv.make_cache(llama)
    for (_s, logits, c), (_, ref, _) in zip(infer.chunked_logits(fast, ids, chunk=16),
                                           infer.chunked_logits(llama, ids, chunk=16,
                                                                cache=eager)):
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)   # compiled = eager
    assert c.kept() == 22 and infer.kv_bytes(c) == c.nbytes()
    out = fast.generate(ids[None], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    ref = llama.generate(ids[None], past_key_values=kv.make_cache(llama), max_new_tokens=5,
                         do_sample=False, min_new_tokens=5)
    assert torch.equal(out, ref)
    assert not [w for w in fast.longfx_backend.report.warnings if "graph break" in w]


def test_beam_search_reorders_the_sink_copy_too(llama):
    ids = _ids(40, seed=5)
    cache = EvictCache(E.StreamingConfig(2, 12), model=llama, store=_store(sink=2, window=12))
    out = llama.generate(ids, past_key_values=cache, max_new_tokens=4, num_beams=2,
                         do_sample=False, min_new_tokens=4)
    store = cache.layers[0].store
    assert out.shape == (1, 44) and store.sink_k.shape[0] == 2
    assert store.layer.state.k_ring.shape[0] == 2 and cache.kept() == 14


def test_a_used_layer_is_refused():
    layer = _layer(False)
    layer.update(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    with pytest.raises(ValueError, match="fresh"):
        StreamingQuantizedStore(layer, 2, 8)
