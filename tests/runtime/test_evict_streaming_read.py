"""StreamingLLM's read moves only the sinks (runtime/evict_cache.py: EvictLayer._streaming_update,
StreamingTensorStore; kernels/kv_evict/reference.py: rotate_sinks).

Until 2026-11-24 every read re-rotated every kept key to its in-cache position
(``R.rerotate_to_cache_positions``). The window keys' in-cache positions are their true
positions, so only the sinks move; the layer now rotates ``sink`` keys per read and a decode
step writes into one buffer instead of copying the cache. What must hold: the outputs of the
re-rotate-everything read (kept verbatim as ``rewrite/testing/rerotate_all.py:RerotateAllCache``), on zoo Llama logits over
chunked prefill and decode, batch 2, beam search, compiled; the rotation work per step does not
grow with the window; decode steps read views of the buffer (no copy of the kept tokens)."""
import pytest
import torch

import longfx
from longfx.eval import infer
from longfx.kernels.kv_evict import reference as R
from longfx.recipes import parse
from longfx.rewrite.testing import zoo
from longfx.rewrite.testing.rerotate_all import RerotateAllCache, RerotateAllLayer
from longfx.runtime.evict_cache import (EvictCache, EvictLayer, StreamingTensorStore,
                                        TensorStore)

pytestmark = pytest.mark.filterwarnings("ignore")
_ids, _feed = zoo.token_ids, zoo.feed

# prefill chunks and decode steps; chunks straddle the sinks and the window, some fit the buffer
STEPS = (3, 1, 9, 1, 1, 20, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 14, 1, 1, 2, 1, 1, 1, 1, 30, 1, 1)


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


def _pair(model, sink, window):
    cfg = R.StreamingConfig(sink, window)
    return EvictCache(cfg, model=model), RerotateAllCache(cfg, model=model)


@pytest.mark.parametrize("sink,window", [(2, 12), (4, 7), (0, 10), (1, 40)])
def test_logits_equal_the_rerotate_everything_read(llama, sink, window):
    ids = _ids(sum(STEPS), batch=2, seed=3)
    new, old = _pair(llama, sink, window)
    got = _feed(llama, ids, new, STEPS)
    want = _feed(llama, ids, old, STEPS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert isinstance(new.layers[0].store, StreamingTensorStore)
    for a, b in zip(new.layers, old.layers):      # the same kept keys (true positions), values
        assert a.kept == b.kept == min(sum(STEPS), sink + window)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.pos.tolist() == b.true_pos.tolist()
    assert new.get_mask_sizes(1, 0) == old.get_mask_sizes(1, 0)


def test_bf16_logits_equal_the_reference():
    model = zoo.build("llama", attn_implementation="sdpa")[0].to(torch.bfloat16)
    ids = _ids(sum(STEPS), batch=2, seed=3)
    new, old = _pair(model, 2, 12)
    torch.testing.assert_close(_feed(model, ids, new, STEPS), _feed(model, ids, old, STEPS))
    assert new.layers[0].store.buf_k.dtype == torch.bfloat16


def test_every_read_equals_the_reference_layer_by_layer():
    """Layer level, random keys: each update returns what the re-rotate-everything read returns
    (window keys bit for bit, the moved sinks to rounding), for the buffer store and for a plain
    TensorStore passed explicitly (the generic path)."""
    torch.manual_seed(0)
    B, H, D, sink, window = 2, 3, 16, 3, 11
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    cfg = R.StreamingConfig(sink, window)
    layers = [EvictLayer(cfg, inv_freq), EvictLayer(cfg, inv_freq, TensorStore())]
    ref = RerotateAllLayer(cfg, inv_freq, TensorStore())
    for s in STEPS:
        k, v = torch.randn(B, H, s, D), torch.randn(B, H, s, D)
        past, moved = ref.kept, ref.seen != ref.kept
        want_k, want_v = ref.update(k, v)
        ns = min(sink, past) if moved else 0
        for layer in layers:
            got_k, got_v = layer.update(k, v)
            assert torch.equal(got_v, want_v) and torch.equal(got_k[:, :, ns:], want_k[:, :, ns:])
            torch.testing.assert_close(got_k[:, :, :ns], want_k[:, :, :ns], rtol=1e-6, atol=1e-6)
            assert layer.kept == ref.kept and torch.equal(layer.keys, ref.keys)


def test_generate_batch_and_beam_search_equal_the_reference(llama):
    ids = _ids(30, batch=2, seed=5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
              min_new_tokens=12, pad_token_id=0)
    new, old = _pair(llama, 2, 10)
    assert torch.equal(llama.generate(ids, past_key_values=new, **kw),
                       llama.generate(ids, past_key_values=old, **kw))
    new, old = _pair(llama, 2, 10)
    a = llama.generate(ids[:1], past_key_values=new, num_beams=3, max_new_tokens=8,
                       do_sample=False, min_new_tokens=8)
    b = llama.generate(ids[:1], past_key_values=old, num_beams=3, max_new_tokens=8,
                       do_sample=False, min_new_tokens=8)
    assert torch.equal(a, b) and new.layers[0].store.buf_k.shape[0] == 3


def test_compiled_equals_eager_with_no_graph_break(llama):
    text = "streaming_kv(sink=2, window=20)"
    fast = longfx.compile(llama, text)
    ids = _ids(70)[0]
    eager = RerotateAllCache(R.StreamingConfig(2, 20), model=llama)
    cache = parse(text).recipes[0].make_cache(llama)
    for (_s, logits, c), (_, ref, _) in zip(infer.chunked_logits(fast, ids, 16, cache=cache),
                                           infer.chunked_logits(llama, ids, 16, cache=eager)):
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    x = ids[-1:][None]
    with torch.no_grad():
        for _ in range(6):                              # decode steps, compiled vs reference
            a = fast(input_ids=x, past_key_values=c, use_cache=True).logits
            b = llama(input_ids=x, past_key_values=eager, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            x = a[:, -1:].argmax(-1)
    assert c.kept() == 22 and c.get_seq_length() == 76
    out = fast.generate(ids[None], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    ref = llama.generate(ids[None], past_key_values=RerotateAllCache(R.StreamingConfig(2, 20),
                                                                     model=llama),
                         max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(out, ref)
    assert not [w for w in fast.longfx_backend.report.warnings if "graph break" in w]


def _rotated_per_step(monkeypatch, llama, cache_factory, prompt, steps):
    """Keys passed through R.rerotate at each of ``steps`` decode steps (all layers)."""
    counts = []
    real = R.rerotate

    def counting(keys, delta, inv_freq):
        counts[-1] += keys.shape[0] * keys.shape[1] * keys.shape[2]
        return real(keys, delta, inv_freq)

    monkeypatch.setattr(R, "rerotate", counting)
    cache = cache_factory()
    ids = _ids(prompt + steps, seed=7)
    counts.append(0)
    _feed(llama, ids[:, :prompt], cache, (prompt,))
    for i in range(steps):
        counts.append(0)
        _feed(llama, ids[:, prompt + i:prompt + i + 1], cache, (1,))
    return counts[1:]


@pytest.mark.parametrize("window", [12, 60])
def test_a_decode_step_rotates_the_sinks_only(monkeypatch, llama, window):
    """Per decode step, B · Hkv · sink keys per layer are rotated, whatever the window; the
    reference rotated B · Hkv · (sink + window)."""
    sink, layers, hkv = 3, llama.config.num_hidden_layers, llama.config.num_key_value_heads
    cfg = R.StreamingConfig(sink, window)
    new = _rotated_per_step(monkeypatch, llama, lambda: EvictCache(cfg, model=llama), 90, 5)
    old = _rotated_per_step(monkeypatch, llama, lambda: RerotateAllCache(cfg, model=llama), 90, 5)
    assert new == [layers * hkv * sink] * 5
    assert old == [layers * hkv * (sink + window)] * 5


def test_decode_steps_read_views_of_one_buffer(llama):
    """Steady decoding: what attention reads is a view of the store's buffer (no copy of the
    kept tokens); the buffer is re-laid out once every slack + 1 steps; bytes stay at
    sink + window + 1 + slack tokens (+ the sinks' copy)."""
    sink, window, slack = 2, 13, 4
    cache = EvictCache(R.StreamingConfig(sink, window), model=llama,
                       store=lambda: StreamingTensorStore(sink, window, slack=slack))
    ids = _ids(80, seed=2)
    _feed(llama, ids[:, :40], cache, (40,))
    store = cache.layers[0].store
    reads, buffers = [], []
    real = store.stream

    def spy(*args):
        k, v = real(*args)
        reads.append(k.untyped_storage().data_ptr() == store.buf_k.untyped_storage().data_ptr())
        buffers.append(store.buf_k.untyped_storage().data_ptr())
        return k, v

    store.stream = spy
    _feed(llama, ids[:, 40:], cache, (1,) * 40)
    assert all(reads) and len(reads) == 40
    relayouts = sum(a != b for a, b in zip(buffers, buffers[1:]))
    assert relayouts <= 40 // (slack + 1) + 1
    assert store.cap == sink + window + 1 + slack
    cfg = llama.config
    D = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_key_value_heads * D * 4 * 2                        # K + V, fp32, B = 1
    assert cache.layers[0].nbytes() == (sink + window + 1 + slack + sink) * per_token
