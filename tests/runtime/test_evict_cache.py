"""EvictCache (runtime/evict_cache.py) on tiny random HF Llamas, eager: with nothing to evict it
equals a DynamicCache bit for bit; evicting, every layer's K/V is a compact [B, Hkv, budget, D]
and the bytes fall; SnapKV keeps a different token set per KV head, always the window; H2O's
running scores are the accumulated attention of every query; StreamingLLM equals a dense
recomputation over the kept tokens at their re-assigned positions; generate() runs."""
import pytest
import torch
import transformers
from transformers import DynamicCache

from longfx.kernels.kv_evict import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.evict_cache import EvictCache, EvictLayer

pytestmark = pytest.mark.filterwarnings("ignore")

POLICIES = {
    "snapkv": lambda big: R.SnapKVConfig(budget=big, window=4, kernel=3, when="chunk"),
    "h2o": lambda big: R.H2OConfig(budget=big, recent=3),
    "streaming": lambda big: R.StreamingConfig(sink=2, window=big - 2),
}


_ids, _feed = zoo.token_ids, zoo.feed


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


@pytest.mark.parametrize("name", list(POLICIES))
def test_no_eviction_equals_the_dense_cache_exactly(llama, name):
    ids = _ids(40, batch=2)
    chunks = (9, 1, 17, 1, 1, 11)                         # prefill chunks and decode steps
    want = _feed(llama, ids, DynamicCache(config=llama.config), chunks)
    cache = EvictCache(POLICIES[name](40), model=llama)
    got = _feed(llama, ids, cache, chunks)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 40 and cache.kept() == 40


@pytest.mark.parametrize("name", list(POLICIES))
def test_eviction_compacts_every_layer_and_frees_bytes(llama, name):
    ids = _ids(64)
    cache = EvictCache(POLICIES[name](16), model=llama)
    dense = DynamicCache(config=llama.config)
    got = _feed(llama, ids, cache, (20, 20, 24))
    want = _feed(llama, ids, dense, (20, 20, 24))
    assert not torch.allclose(got[:, 20:], want[:, 20:])     # eviction changed something
    cfg = llama.config
    D = cfg.hidden_size // cfg.num_attention_heads
    for layer in cache.layers:
        assert layer.keys.shape == (1, cfg.num_key_value_heads, 16, D)
        assert layer.values.shape == layer.keys.shape and layer.keys.is_contiguous()
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4   # not a view
    assert cache.get_seq_length() == 64 and cache.kept() == 16
    kv = sum(2 * layer.keys.numel() * 4 for layer in cache.layers)
    dense_kv = sum(layer.keys.numel() * 8 for layer in dense.layers)
    assert cache.dense_nbytes() == dense_kv
    assert kv <= cache.nbytes() < dense_kv * 0.3          # 16 of 64 tokens (+ scores / positions)
    # masks follow the compacted cache: kv length = kept + query, offset = seen - kept
    assert cache.get_mask_sizes(5, 0) == (21, 48)


def _layer0_positions(cache, dense):
    """For layer 0 (keys independent of the cache contents) the true position of each kept key,
    per KV head: [B, Hkv, K]."""
    kept, full = cache.layers[0].keys, dense.layers[0].keys          # [B,Hkv,K,D], [B,Hkv,T,D]
    d = (kept[:, :, :, None] - full[:, :, None]).abs().amax(-1)      # [B, Hkv, K, T]
    assert bool((d.amin(-1) == 0).all())
    return d.argmin(-1)


def test_snapkv_keeps_per_head_sets_and_the_window(llama):
    ids = _ids(48)
    cache = EvictCache(R.SnapKVConfig(budget=12, window=4, kernel=3, when="chunk"), model=llama)
    dense = DynamicCache(config=llama.config)
    _feed(llama, ids, cache, (48,))
    _feed(llama, ids, dense, (48,))
    pos = _layer0_positions(cache, dense)                            # [1, 2, 12]
    assert pos[0, :, -4:].tolist() == [[44, 45, 46, 47]] * 2         # the observation window
    assert bool((pos[..., 1:] > pos[..., :-1]).all())                # stored in order
    assert pos[0, 0].tolist() != pos[0, 1].tolist()                  # per-head token sets
    # the kept prefix is the reference's choice with the model's own window queries
    attn = llama.model.layers[0].self_attn
    q = zoo.first_layer_queries(llama, ids)                         # [1, H, 48, D]
    scores = R.snapkv_scores(q[:, :, -4:], dense.layers[0].keys, attn.scaling, 3)
    assert pos.tolist() == R.snapkv_keep(scores, 12, 4).tolist()
    # decode tokens are appended (SnapKV compresses the prompt only)
    _feed(llama, _ids(3, seed=1), cache, (1, 1, 1))
    assert cache.kept() == 15 and cache.get_seq_length() == 51


def test_snapkv_at_prompt_end_compresses_on_the_first_decode_step(llama):
    """``when="prompt"`` (the paper): prefill chunks are stored whole; the first decode step
    compresses with the last chunk's window queries (the prompt's end), announcing the new
    length to the mask first. A one-chunk prompt then holds what ``when="chunk"`` holds, and
    the decode logits agree; a prompt in two chunks keeps every token until decoding."""
    ids, step = _ids(48), _ids(2, seed=1)
    chunk = EvictCache(R.SnapKVConfig(budget=12, window=4, kernel=3, when="chunk"), model=llama)
    prompt = EvictCache(R.SnapKVConfig(budget=12, window=4, kernel=3), model=llama)
    _feed(llama, ids, chunk, (48,))
    _feed(llama, ids, prompt, (48,))
    assert chunk.kept() == 12 and prompt.kept() == 48                # nothing evicted yet
    assert prompt.layers[0].get_mask_sizes(1) == (13, 36)           # this step compresses first
    a = _feed(llama, step, chunk, (1, 1))
    b = _feed(llama, step, prompt, (1, 1))
    assert prompt.kept() == chunk.kept() == 14 and prompt.get_seq_length() == 50
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x, y in zip(prompt.layers, chunk.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    two = EvictCache(R.SnapKVConfig(budget=12, window=4, kernel=3), model=llama)
    _feed(llama, ids, two, (24, 24))
    assert two.kept() == 48
    _feed(llama, step, two, (1,))
    assert two.kept() == 13


def test_snapkv_at_prompt_end_keeps_its_ratio_of_the_tokens_seen_across_turns(llama):
    """A second prompt after decoding: the next decode step compresses to the ratio of all the
    tokens seen so far (69 -> 35), not of the tokens still stored."""
    cache = EvictCache(R.SnapKVConfig(ratio=0.5, window=4, kernel=3), model=llama)
    _feed(llama, _ids(48), cache, (48,))
    _feed(llama, _ids(1, seed=1), cache, (1,))
    assert cache.kept() == 24 + 1
    _feed(llama, _ids(20, seed=2), cache, (20,))
    assert cache.kept() == 45 and cache.get_seq_length() == 69
    _feed(llama, _ids(1, seed=3), cache, (1,))
    assert cache.kept() == 35 + 1


def test_h2o_scores_accumulate_every_query(llama):
    """A layer fed a chunk and decode steps keeps, per kept key, the sum of every query's
    attention to it (reference over all queries at once); after eviction it keeps the gathered
    scores of the kept keys."""

    class Attn(torch.nn.Module):                  # queries = the hidden states, no RoPE
        scaling = 0.5

        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Identity()

    g = torch.Generator().manual_seed(3)
    B, Hkv, H, T, D = 1, 2, 4, 30, 8
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    hidden = q.transpose(1, 2).reshape(B, T, H * D)                  # [B, T, H·D]
    ones, zeros = torch.ones(B, T, D), torch.zeros(B, T, D)
    layer = EvictLayer(R.H2OConfig(budget=100, recent=4))
    a = 0
    for s in (20, 1, 1, 8):
        layer.pending = (Attn(), hidden[:, a:a + s], (ones[:, a:a + s], zeros[:, a:a + s]))
        layer.update(k[:, :, a:a + s], v[:, :, a:a + s])
        a += s
    want = R.h2o_accumulate(q, k, 0.5)
    torch.testing.assert_close(layer.acc, want, rtol=1e-5, atol=1e-5)
    # now with a budget: after the first chunk 10 keys remain (4 recent + 6 heaviest)
    layer = EvictLayer(R.H2OConfig(budget=10, recent=4))
    layer.pending = (Attn(), hidden[:, :20], (ones[:, :20], zeros[:, :20]))
    layer.update(k[:, :, :20], v[:, :, :20])
    first = R.h2o_accumulate(q[:, :, :20], k[:, :, :20], 0.5)
    keep = R.h2o_keep(first, 10, 4)
    assert layer.keys.shape == (1, 2, 10, D)
    assert torch.equal(layer.keys, R.gather_tokens(k[:, :, :20], keep))
    torch.testing.assert_close(layer.acc, first.gather(2, keep))
    # a decode step adds its query's attention over the 10 kept + itself, then evicts one
    layer.pending = (Attn(), hidden[:, 20:21], (ones[:, :1], zeros[:, :1]))
    layer.update(k[:, :, 20:21], v[:, :, 20:21])
    keys = torch.cat((R.gather_tokens(k[:, :, :20], keep), k[:, :, 20:21]), 2)
    acc = torch.cat((first.gather(2, keep), torch.zeros(1, 2, 1)), 2) + \
        R.h2o_accumulate(q[:, :, 20:21], keys, 0.5)
    keep2 = R.h2o_keep(acc, 10, 4)
    torch.testing.assert_close(layer.acc, acc.gather(2, keep2))
    assert torch.equal(layer.keys, R.gather_tokens(keys, keep2))


def test_streaming_equals_recomputation_at_reassigned_positions():
    """One layer (so cached keys/values do not depend on what each token saw): after feeding
    n tokens, the next token's logits equal a dense forward over [sinks, window, token] at the
    in-cache positions 0..L — StreamingLLM's positions — while HF gave the query its true one."""
    cfg = zoo.config("llama", attn_implementation="sdpa")
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sink, window, n = 2, 5, 23
    ids = _ids(n + 1, seed=4)
    cache = EvictCache(R.StreamingConfig(sink, window), model=model)
    logits = _feed(model, ids, cache, (6, 1, 9, 1, 1, 5, 1))[:, -1]   # 24 tokens in 7 calls
    kept = list(range(sink)) + list(range(n - window, n)) + [n]
    with torch.no_grad():
        ref = model(input_ids=ids[:, kept], position_ids=torch.arange(len(kept))[None]).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    # the true-position answer (a plain sliding window without re-rotation) is different
    with torch.no_grad():
        wrong = model(input_ids=ids[:, kept], position_ids=torch.tensor([kept])).logits[:, -1]
    assert not torch.allclose(wrong, ref, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == n + 1 and cache.layers[0].pos.tolist() == \
        list(range(sink)) + list(range(n + 1 - window, n + 1))


@pytest.mark.parametrize("name", list(POLICIES))
def test_generate_runs_through_the_cache(llama, name):
    ids = _ids(30, batch=2, seed=5)
    cache = EvictCache(POLICIES[name](12), model=llama)
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 36) and torch.equal(out[:, :30], ids)
    assert cache.get_seq_length() == 35 and cache.layers[0].keys.shape[0] == 2
    # greedy decode through the cache = the same steps fed by hand
    cache2 = EvictCache(POLICIES[name](12), model=llama)
    x, toks = ids, []
    with torch.no_grad():
        for _ in range(6):
            nxt = llama(input_ids=x, past_key_values=cache2, use_cache=True).logits[:, -1].argmax(-1)
            toks.append(nxt)
            x = nxt[:, None]
    want = torch.stack(toks, 1)
    done = (want == 2).long().cumsum(1) - (want == 2).long() > 0        # after an eos: padding
    assert torch.equal(out[:, 30:], want.masked_fill(done, 0))
    # with a budget over the whole run, generate equals the dense model's
    big = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False, pad_token_id=0,
                         past_key_values=EvictCache(POLICIES[name](64), model=llama))
    dense = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(big, dense)


def test_scoring_without_captured_queries_says_how_to_fix(llama):
    cache = EvictCache(R.SnapKVConfig(budget=8, window=4), config=llama.config)   # no model
    layer = cache.layers[0]
    k = torch.randn(1, 2, 12, 16)
    with pytest.raises(RuntimeError, match="model=model"):
        layer.update(k, k)
    s = EvictCache(R.StreamingConfig(1, 3), config=llama.config).layers[0]
    s.update(k, k)                          # first update: nothing to re-rotate yet
    with pytest.raises(RuntimeError, match="inv_freq"):
        s.update(k[:, :, :2], k[:, :, :2])
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(1)
