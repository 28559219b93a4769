"""ThinKCache (runtime/think_cache.py) on a tiny random HF Llama, eager: keeping every channel it
equals a DynamicCache; pruning, each chunk is pruned once into a compact [B, Hkv, L, Dk] segment
with its own channel set (the reference's choice with the model's own window queries), the
window and decode tokens stay whole, attention reads the pruned channels as zeros, and the key
bytes fall by about the ratio; generate() runs through make_cache."""
import pytest
import torch
from transformers import DynamicCache

from longfx.kernels.kv_evict.reference import rotate_half
from longfx.kernels.kv_think import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.think_cache import ThinKCache

pytestmark = pytest.mark.filterwarnings("ignore")


_ids, _feed = zoo.token_ids, zoo.feed


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


def test_keeping_every_channel_equals_the_dense_cache(llama):
    ids = _ids(40, batch=2)
    chunks = (9, 1, 17, 1, 1, 11)
    want = _feed(llama, ids, DynamicCache(config=llama.config), chunks)
    cache = ThinKCache(R.ThinKConfig(ratio=0.0, window=4), model=llama)
    got = _feed(llama, ids, cache, chunks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 40
    assert cache.layers[0].k_pruned.shape[-1] == 16


def test_each_chunk_is_pruned_once_into_a_compact_segment(llama):
    ids = _ids(66)
    cache = ThinKCache(R.ThinKConfig(ratio=0.5, window=4), model=llama)
    dense = DynamicCache(config=llama.config)
    got = _feed(llama, ids, cache, (20, 20, 24, 1, 1))
    want = _feed(llama, ids, dense, (20, 20, 24, 1, 1))
    torch.testing.assert_close(got[:, :20], want[:, :20], rtol=1e-5, atol=1e-5)  # chunk 1: whole
    assert not torch.allclose(got[:, 20:], want[:, 20:])                         # then pruned
    for layer in cache.layers:
        # chunk 1 prunes 16 (4 wait), chunk 2 prunes 4 + 16 = 20, chunk 3 prunes 4 + 20 = 24;
        # the last window (4) and two decode tokens stay whole
        assert layer.k_pruned.shape == (1, 2, 60, 8) and layer.keys.shape == (1, 2, 6, 16)
        assert layer.segment.tolist() == [0] * 16 + [1] * 20 + [2] * 24
        assert layer.channels.shape == (1, 2, 3, 8) and layer.values.shape == (1, 2, 66, 16)
        assert layer.k_pruned.untyped_storage().nbytes() == layer.k_pruned.numel() * 4
    ch = cache.layers[0].channels[0]                                             # [Hkv, G, Dk]
    assert ch[0, 0].tolist() != ch[1, 0].tolist() or ch[0, 0].tolist() != ch[0, 1].tolist()
    # bytes: keys fall by ~ratio (plus the index tensors), values whole
    dense_k = cache.dense_key_nbytes()
    assert dense_k == sum(layer.keys.numel() * 4 for layer in dense.layers)
    assert 0.5 * dense_k < cache.key_nbytes() < 0.7 * dense_k
    assert cache.dense_nbytes() == 2 * dense_k
    assert cache.nbytes() == cache.key_nbytes() + dense_k


def test_channels_are_the_references_choice_and_attention_reads_zeros(llama):
    ids = _ids(30)
    cache = ThinKCache(R.ThinKConfig(ratio=0.5, window=4), model=llama)
    dense = DynamicCache(config=llama.config)
    _feed(llama, ids, cache, (30,))
    _feed(llama, ids, dense, (30,))
    layer, k = cache.layers[0], dense.layers[0].keys          # layer 0: keys independent of cache
    attn = llama.model.layers[0].self_attn
    with torch.no_grad():
        h = llama.model.layers[0].input_layernorm(llama.model.embed_tokens(ids))
        cos, sin = llama.model.rotary_emb(h, torch.arange(30)[None])
        q = attn.q_proj(h).view(1, 30, -1, 16).transpose(1, 2)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    chosen = R.keep_channels(R.channel_scores(q[:, :, -4:], k[:, :, :26]), 8)
    assert layer.channels[:, :, 0].tolist() == chosen.tolist()
    full = layer.full_keys()                                                     # [1, 2, 30, 16]
    mask = torch.zeros(1, 2, 16, dtype=torch.bool).scatter_(-1, chosen, True)   # kept channels
    torch.testing.assert_close(full[:, :, :26], k[:, :, :26] * mask[:, :, None], rtol=0, atol=0)
    assert torch.equal(full[:, :, 26:], k[:, :, 26:])                            # the window


def test_generate_through_make_cache_batch_two(llama):
    import longfx.passes.think  # noqa: F401 - registers think until it is in FAMILIES
    from longfx.recipes import parse

    cache = parse("think(ratio=0.5, window=4)").recipes[0].make_cache(llama)
    assert isinstance(cache, ThinKCache)
    ids = _ids(24, batch=2, seed=3)
    out = llama.generate(ids, past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                         do_sample=False)
    assert out.shape == (2, 30) and cache.get_seq_length() == 29
    assert cache.layers[0].pruned == 20 and cache.layers[0].keys.shape[2] == 9
