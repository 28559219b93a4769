"""QuestCache (runtime/bounds_cache.py): the per-block key bounds it keeps equal the bounds
recomputed from its keys after any appends, crops and beam reorders; it holds what HF's own
cache holds, and a model reads the same logits through it."""
import pytest
import torch
from transformers import DynamicCache

from longfx.kernels.block_sparse import reference as R
from longfx.rewrite.testing import zoo
from longfx.runtime.bounds_cache import QuestCache, QuestLayer

pytestmark = pytest.mark.filterwarnings("ignore")


def _check_bounds(layer: QuestLayer):
    keys = layer.k_store[:, :, :layer.length]
    lo, hi = R.block_bounds(keys, layer.block)
    n = lo.shape[2]
    assert torch.equal(layer.kmin[:, :, :n], lo) and torch.equal(layer.kmax[:, :, :n], hi)


@pytest.mark.parametrize("block,dtype", [(16, torch.float32), (32, torch.bfloat16)])
def test_bounds_follow_appends_crops_and_reorders(block, dtype):
    g = torch.Generator().manual_seed(block)
    layer = QuestLayer(block, grow=48)                         # grows in whole blocks
    want_k = torch.zeros(3, 2, 0, 24, dtype=dtype)
    for step, n in enumerate([21, 1, 1, 40, 1, 1, 1, 17, 1]):
        k = torch.randn(3, 2, n, 24, generator=g).to(dtype)
        v = torch.randn(3, 2, n, 24, generator=g).to(dtype)
        keys, values = layer.update(k, v)
        want_k = torch.cat((want_k, k), 2)
        assert torch.equal(keys, want_k) and torch.equal(values[:, :, -n:], v)
        _check_bounds(layer)
        if step == 3:                                        # crop into the middle of a block
            layer.crop(-(block // 2 + 3))
            want_k = want_k[:, :, :layer.length]
            _check_bounds(layer)
        if step == 5:                                        # beam reorder
            idx = torch.tensor([2, 0, 0])
            layer.reorder_cache(idx)
            want_k = want_k[idx]
            _check_bounds(layer)
    assert layer.get_seq_length() == want_k.shape[2] == layer.length
    assert layer.grow == -(-48 // block) * block and layer.k_store.shape[2] % layer.grow == 0
    assert layer.kmin.shape[2] * block == layer.k_store.shape[2]
    layer.batch_repeat_interleave(2)
    assert layer.k_store.shape[0] == 6
    _check_bounds(layer)
    layer.reset()
    assert layer.length == 0 and layer.k_store is None


def test_model_reads_the_same_logits_as_through_hf_cache():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (2, 75), generator=torch.Generator().manual_seed(1))
    sizes = [33, 17] + [1] * 25
    cache = QuestCache(16, model.config)
    got = zoo.feed(model, ids, cache, sizes)
    want = zoo.feed(model, ids, DynamicCache(config=model.config), sizes)
    assert torch.equal(got, want)
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        _check_bounds(layer)
    # the bounds cost 2·D values per 16 keys: 1/16 of the K + V bytes held
    layer = cache.layers[0]
    kv = layer.k_store.numel() + layer.v_store.numel()
    assert (layer.kmin.numel() + layer.kmax.numel()) * 16 == kv


def test_eager_generate_and_beam_search_equal_hf_cache():
    model, _ = zoo.build("llama")
    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for beams in (1, 2):
        want = model.generate(**kw, num_beams=beams, past_key_values=DynamicCache(config=model.config))
        got = model.generate(**kw, num_beams=beams, past_key_values=QuestCache(16, model.config))
        assert torch.equal(got, want), beams


def test_sliding_layers_stay_windowed_like_hf_cache():
    """Gemma 3: the local layers are transformers' own windowed layers (decode_topk leaves
    those sites dense, so they need no bounds); the cache keeps no more than DynamicCache."""
    model, _ = zoo.build("gemma3")
    window = model.config.sliding_window
    ids = torch.randint(3, 120, (1, window + 40), generator=torch.Generator().manual_seed(3))
    sizes = [window + 20] + [1] * 20
    cache = QuestCache(16, model.config)
    own = DynamicCache(config=model.config)
    got = zoo.feed(model, ids, cache, sizes)
    want = zoo.feed(model, ids, own, sizes)
    assert torch.equal(got, want)
    kinds = [isinstance(layer, QuestLayer) for layer in cache.layers]
    for layer, hf in zip(cache.layers, own.layers):
        if isinstance(layer, QuestLayer):
            _check_bounds(layer)
        else:                                   # the model's own windowed layer, as built
            assert type(layer) is type(hf) and layer.keys.shape == hf.keys.shape
            assert layer.keys.shape[2] < ids.shape[1]
    assert any(kinds) and not all(kinds)
    held = sum(layer.k_store[:, :, :layer.length].numel() if isinstance(layer, QuestLayer)
               else layer.keys.numel() for layer in cache.layers)
    assert held == sum(layer.keys.numel() for layer in own.layers)
