"""MiniCache (runtime/minicache_cache.py) on tiny random HF Llamas, eager: with no pair (start
layer past the last) or a threshold that retains every pair it equals a DynamicCache; merging,
each layer still attends to its own chunk exactly, the pair stores the reference's merge of the
two layers' K/V (one direction set + two norm vectors + a mask), bytes fall; generate() and beam
search run through make_cache."""
import pytest
import torch
from transformers import DynamicCache, DynamicLayer

from longfx.kernels.kv_minicache import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.minicache_cache import MergedLayer, MiniCache, MiniCacheConfig

pytestmark = pytest.mark.filterwarnings("ignore")


_ids, _feed = zoo.token_ids, zoo.feed


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


@pytest.mark.parametrize("start,threshold", [(2, 0.25), (None, 1.0), (0, 0.0)])
def test_nothing_merged_equals_the_dense_cache(llama, start, threshold):
    ids = _ids(40, batch=2)
    chunks = (9, 1, 17, 1, 1, 11)
    want = _feed(llama, ids, DynamicCache(config=llama.config), chunks)
    cache = MiniCache(MiniCacheConfig(start, 0.5, threshold), config=llama.config)
    got = _feed(llama, ids, cache, chunks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == (["MergedLayer"] * 2 if start == 0 else ["DynamicLayer"] * 2)
    if start == 0:
        assert cache.merged_fraction() == 0.0 and cache.nbytes() > cache.dense_nbytes()
    else:
        assert cache.nbytes() == cache.dense_nbytes()
    assert cache.get_seq_length() == 40


def test_merged_pair_stores_the_reference_merge_and_shrinks(llama):
    ids = _ids(30)
    cache = MiniCache(MiniCacheConfig(0, 0.5, 1.0), config=llama.config)      # merge everything
    dense = DynamicCache(config=llama.config)
    got = _feed(llama, ids, cache, (30,))
    want = _feed(llama, ids, dense, (30,))
    # one chunk: every layer attends to its own chunk, exact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pair = cache.layers[0].pair
    assert cache.layers[1].pair is pair and len(cache.pairs()) == 1
    for m, role in ((pair.k, "keys"), (pair.v, "values")):
        ref = R.merge(getattr(dense.layers[0], role), getattr(dense.layers[1], role), 0.5, 1.0)
        for name in R.MergedKV.NAMES:
            torch.testing.assert_close(getattr(m, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
        assert m.dir.shape == (1, 2, 30, 16) and m.norm.shape == (2, 1, 2, 30)
        assert m.extra.shape == (0, 16)
    B, H, T, D = 1, 2, 30, 16
    assert cache.nbytes() == 2 * B * H * T * (D * 4 + 2 * 4 + 1)             # K and V
    assert cache.dense_nbytes() == 2 * 2 * B * H * T * D * 4                  # 2 layers, K + V
    assert cache.merged_fraction() == 1.0
    # the next chunk reads the merged past: logits change
    more = _ids(8, seed=5)
    a = _feed(llama, more, cache, (8,))
    b = _feed(llama, more, dense, (8,))
    assert not torch.allclose(a, b, atol=1e-3)


def test_first_layer_attends_its_own_chunk_and_retention_is_exact(llama):
    """Layer 0's update returns its stored (restored) past + its own chunk; the chunk is merged
    only when layer 1 stores it. Retained tokens restore bit for bit for both layers."""
    cache = MiniCache(MiniCacheConfig(0, 0.5, 0.45), config=llama.config)
    l0, l1 = cache.layers
    g = torch.Generator().manual_seed(0)
    k0, v0, k1, v1 = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(4))
    k1[:, :, :6] = 2 * k0[:, :, :6]                                           # aligned: merged
    out_k, out_v = l0.update(k0, v0)
    assert torch.equal(out_k, k0) and torch.equal(out_v, v0) and l0.pair.pending is not None
    l1.update(k1, v1)
    assert l0.pair.pending is None and l0.get_seq_length() == l1.get_seq_length() == 12
    c0, c1 = (torch.randn(1, 2, 3, 16, generator=g) for _ in range(2))
    past_k0, _ = l0.update(c0, c0)
    past_k1, _ = l1.update(c1, c1)
    keep = l0.pair.k.keep[..., :12]                                           # the first chunk
    assert keep[..., :6].sum() == 0 and keep.any()
    assert torch.equal(past_k0[:, :, :12][keep], k0[keep])
    assert torch.equal(past_k1[:, :, :12][keep], k1[keep])
    torch.testing.assert_close(past_k0[:, :, :6], k0[:, :, :6], rtol=1e-5, atol=1e-5)   # parallel
    torch.testing.assert_close(past_k1[:, :, :6], k1[:, :, :6], rtol=1e-5, atol=1e-5)
    assert torch.equal(past_k0[:, :, 12:], c0) and torch.equal(past_k1[:, :, 12:], c1)


def test_needs_the_config():
    with pytest.raises(ValueError, match="needs the model's config"):
        MiniCache(MiniCacheConfig())


def test_generate_and_beam_search_through_make_cache():
    import longfx.passes.minicache  # noqa: F401 - registers minicache until it is in FAMILIES
    from longfx.recipes import parse

    model = zoo.build("llama", attn_implementation="sdpa")[0]
    recipe = parse("minicache(start_layer=0, threshold=0.55)").recipes[0]
    cache = recipe.make_cache(model)
    ids = _ids(20, batch=2, seed=2)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5,
                         do_sample=False)
    assert out.shape == (2, 25) and cache.get_seq_length() == 24
    assert 0.0 < cache.merged_fraction() < 1.0 and cache.nbytes() < cache.dense_nbytes()
    beams = model.generate(ids[:1], past_key_values=recipe.make_cache(model), max_new_tokens=4,
                           min_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape == (1, 24)
    assert isinstance(cache.layers[0], MergedLayer) and not isinstance(cache.layers[0], DynamicLayer)
