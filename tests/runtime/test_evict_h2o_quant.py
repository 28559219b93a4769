"""H2O eviction over a KIVI-quantized state (``h2o(...) + kv_quant(...)`` / ``+ gear(...)``:
EvictCache with an H2OQuantizedStore, runtime/evict_cache.py).

What must hold: a kept token's dequantized key and value never change while it is kept (single
tokens are evicted without re-quantizing anything); what the layer reads is, bit for bit, the
``kv_quant`` layer alone's read restricted to the tokens H2O kept (the reference below holds
every token in a plain quantized layer and gathers the kept positions); the bytes stop growing
at a fixed budget and are below both recipes alone; the recipe compiles, generates and runs beam
search."""
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
from longfx.runtime.evict_cache import EvictCache, H2OQuantizedStore

pytestmark = pytest.mark.filterwarnings("ignore")

SINK = 2
_ids, _feed = zoo.token_ids, zoo.feed

# prefill chunks and decode steps; chunks straddle the sinks, the ring and group edges
STEPS = (2, 5, 1, 17, 1, 1, 30, 1, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 12, 1, 1, 1, 1)


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", attn_implementation="sdpa")[0]


def _kv(bits=4, **kw):
    return Q.KVQuantConfig(bits=bits, group=8, residual=8, **kw)     # ring of 8: packs early


def _layer(kv, gear: bool, sink: int = SINK):
    if gear:
        return GearKVLayer(GearConfig(kv, rank=2, outliers=0.02), block=8, sink=sink)
    return QuantizedKVLayer(kv, block=8, sink=sink)


class ReferenceStore:
    """The definition the store must meet: a ``kv_quant`` layer holding *every* token (nothing
    evicted, nothing freed) and the true positions H2O kept, per head; a read gathers them."""

    plain = False

    def __init__(self, layer):
        self.layer = layer
        self.pos: torch.Tensor | None = None          # [B, Hkv, K] true positions, ascending
        self.step: torch.Tensor | None = None         # positions of what update() returned

    def init(self, k, v):
        self.layer.lazy_initialization(k, v)
        self.pos = torch.zeros(*k.shape[:2], 0, dtype=torch.long)

    @property
    def kept(self):
        return 0 if self.pos is None else self.pos.shape[2]

    def read(self):
        k, v = self.layer.read()
        return E.gather_tokens(k, self.pos), E.gather_tokens(v, self.pos)

    def update(self, k, v):
        n, s = self.layer.length, k.shape[2]
        self.step = torch.cat((self.pos, torch.arange(n, n + s).expand(*k.shape[:2], s)), 2)
        rk, rv = self.layer.update(k, v)           # the past (or all, decode) + the step
        if s == 1:
            self.pos = self.step
            return self.read()
        past_k, past_v = E.gather_tokens(rk[:, :, :n], self.pos), E.gather_tokens(rv[:, :, :n], self.pos)
        self.pos = self.step
        return torch.cat((past_k, rk[:, :, n:]), 2), torch.cat((past_v, rv[:, :, n:]), 2)

    def keep(self, idx, keys, values):
        self.pos = self.step.gather(2, idx.expand(*self.step.shape[:2], idx.shape[-1]))

    def reserve(self, tokens):
        pass

    def nbytes(self):
        return self.layer.nbytes()

    def reorder_cache(self, beam_idx):
        self.layer.reorder_cache(beam_idx)
        self.pos = self.pos.index_select(0, beam_idx)


@pytest.mark.parametrize("gear", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_layer_reads_kv_quant_alone_restricted_and_kept_tokens_never_change(bits, gear):
    """Layer level, random keys/values and random H2O scores (``h2o_keep`` picks per head):
    every update and every read equal the reference kv_quant layer's read at the kept positions,
    bit for bit, and each kept token reads back identically after every later eviction."""
    torch.manual_seed(bits + 10 * gear)
    B, H, D, budget, recent = 2, 3, 16, 20, 3
    kv = _kv(bits)
    store, ref = H2OQuantizedStore(_layer(kv, gear)), ReferenceStore(_layer(kv, gear))
    first: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    n, evictions, packed_evicted = 0, 0, 0
    for s in STEPS * 2:
        k, v = torch.randn(B, H, s, D), torch.randn(B, H, s, D)
        if n == 0:
            store.init(k, v)
            ref.init(k, v)
        got, want = store.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        n += s
        if ref.step.shape[2] > budget:
            idx = E.h2o_keep(torch.rand(B, H, ref.step.shape[2]), budget, recent)   # [B, H, K]
            dropped = ref.pos.shape[2] - budget
            packed_evicted += int((ref.step < Q.n_packed(n, kv)).sum()) - \
                int((ref.step.gather(2, idx) < Q.n_packed(n, kv)).sum())
            store.keep(idx, *got)
            ref.keep(idx, *want)
            evictions += dropped > 0
        assert store.kept == ref.kept and torch.equal(store.positions(), ref.pos)
        hk, hv = store.read()
        wk, wv = ref.read()
        assert torch.equal(hk, wk) and torch.equal(hv, wv)
        for b in range(B):
            for h in range(H):
                for i, p in enumerate(ref.pos[b, h].tolist()):
                    if p < Q.n_packed(n, kv) or p < SINK:             # packed or sink: final
                        was = first.setdefault((b, h, p), (hk[b, h, i].clone(), hv[b, h, i].clone()))
                        assert torch.equal(hk[b, h, i], was[0]) and torch.equal(hv[b, h, i], was[1])
    assert evictions > 20 and packed_evicted > 100          # packed tokens were really evicted
    heads = store.positions()
    assert heads[0, 0].tolist() != heads[0, 1].tolist()     # each head keeps its own set
    # only the kept packed tokens and the groups they use are held
    assert int(store.n_pk.max()) == store.tok["k_codes"].shape[2] <= budget
    assert store.groups["k_params"].shape[2] <= budget


def test_rotate_and_clip_read_kv_quant_alone_restricted():
    """``rotate=true, clip=true`` (the 2-bit setting measured): the same equality."""
    torch.manual_seed(3)
    kv = _kv(2, rotate=True, clip=True)
    store, ref = H2OQuantizedStore(_layer(kv, False)), ReferenceStore(_layer(kv, False))
    for i, s in enumerate(STEPS):
        k, v = torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 16)
        if i == 0:
            store.init(k, v)
            ref.init(k, v)
        got, want = store.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if ref.step.shape[2] > 24:
            idx = E.h2o_keep(torch.rand(1, 2, ref.step.shape[2]), 24, 4)
            store.keep(idx, *got)
            ref.keep(idx, *want)
        assert torch.equal(store.read()[0], ref.read()[0])


def test_keep_refuses_unsorted_indices():
    store = H2OQuantizedStore(_layer(_kv(), False))
    k = torch.randn(1, 1, 12, 16)
    store.init(k, k)
    store.update(k, k)
    with pytest.raises(ValueError, match="ascending"):
        store.keep(torch.tensor([[[3, 1, 5]]]))


@pytest.fixture(scope="module")
def peaky():
    """The zoo Llama with queries scaled by 8: sharper attention, so H2O's kept sets differ
    between heads (on the plain random model every head keeps the oldest tokens)."""
    model = zoo.build("llama", attn_implementation="sdpa")[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("gear", [False, True])
def test_model_equals_the_reference_store(peaky, gear):
    """Zoo Llama, B = 2, chunked prefill and decode: the logits through the store equal those
    through the reference (kv_quant alone restricted to the kept tokens) bit for bit, so H2O
    scores the same keys and keeps the same tokens; every layer holds the same positions."""
    ids = _ids(60, batch=2)
    chunks = (9, 1, 17, 1, 1, 11, 1, 1, 8) + (1,) * 10
    policy = E.H2OConfig(budget=16, recent=3)
    cache = EvictCache(policy, model=peaky, store=lambda: H2OQuantizedStore(_layer(_kv(), gear)))
    ref = EvictCache(policy, model=peaky, store=lambda: ReferenceStore(_layer(_kv(), gear)))
    assert torch.equal(_feed(peaky, ids, cache, chunks), _feed(peaky, ids, ref, chunks))
    assert cache.kept() == 16 and cache.get_seq_length() == 60
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.store.positions(), b.store.pos)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.acc, b.acc)
    sets = {tuple(p) for layer in cache.layers for p in layer.store.positions().flatten(0, 1).tolist()}
    assert len(sets) > 1                                          # heads keep different tokens
    assert all(p[-4] < 40 for p in sets)            # packed heavy hitters kept, others evicted


def test_with_room_for_every_token_equals_kv_quant_alone_exactly(llama):
    ids = _ids(50, batch=2)
    chunks = (9, 1, 17, 1, 1, 11, 1, 1, 8)
    want_cache = QuantizedCache(_kv(), config=llama.config, block=8, sink=SINK)
    want = _feed(llama, ids, want_cache, chunks)
    cache = EvictCache(E.H2OConfig(budget=64), model=llama,
                       store=lambda: H2OQuantizedStore(_layer(_kv(), False)))
    assert torch.equal(_feed(llama, ids, cache, chunks), want)
    for a, b in zip(cache.layers, want_cache.layers):
        assert torch.equal(a.keys, b.read()[0]) and torch.equal(a.values, b.read()[1])


def test_bytes_stop_growing_at_the_budget_and_undercut_both_recipes_alone(llama):
    """A fixed budget: once it is reached the held bytes stop growing (they vary with the
    per-head padding and the groups still in use, not with the sequence); they are below h2o
    alone (full precision) and below kv_quant alone at the same length."""
    ids = _ids(400)
    policy = E.H2OConfig(budget=96)
    both = EvictCache(policy, model=llama, store=lambda: H2OQuantizedStore(_layer(_kv(), False)))
    alone = EvictCache(policy, model=llama)
    kvq = QuantizedCache(_kv(), config=llama.config, block=8, sink=SINK)
    for c in (both, alone, kvq):
        _feed(llama, ids[:, :200], c, (100, 100))
    sizes = []
    for i in range(200, 400, 25):
        for c in (both, alone, kvq):
            _feed(llama, ids[:, i:i + 25], c, (1,) * 25)
        sizes.append(both.nbytes())
        assert both.nbytes() < alone.nbytes() and both.nbytes() < kvq.nbytes()
    assert both.kept() == alone.kept() == 96 and both.get_seq_length() == 400
    # no growth: the last sizes are within the first's range (per-head padding: < a ring of codes)
    assert max(sizes[-3:]) <= max(sizes[:3]) + 2 * 2 * 8 * 9 * 2, sizes
    assert infer.kv_bytes(both) == both.nbytes()
    assert both.dense_nbytes() == alone.dense_nbytes() == kvq.dense_nbytes()


def test_recipe_composes_compiles_and_generates(llama):
    text = "h2o(budget=24, recent=4) + kv_quant(bits=4, group=8, residual=8)"
    kv = cache_recipe(parse(text))
    assert isinstance(kv, EvictQuantized) and str(kv).startswith("h2o(budget=24")
    other = cache_recipe(parse("kv_quant(bits=2) + h2o(ratio=0.5)"))
    assert isinstance(other, EvictQuantized) and str(other).startswith("h2o(ratio=0.5)")
    gear = cache_recipe(parse("gear(bits=2) + h2o(budget=64)"))
    assert isinstance(gear.make_cache(llama).layers[0].store, H2OQuantizedStore)
    assert isinstance(gear.make_cache(llama).layers[0].store.layer, GearKVLayer)
    assert isinstance(kv.make_cache(llama).layers[0].store, H2OQuantizedStore)
    fast = longfx.compile(llama, text)
    ids = _ids(70)[0]
    eager = kv.make_cache(llama)
    for (_s, logits, c), (_, want, _) in zip(infer.chunked_logits(fast, ids, chunk=16),
                                            infer.chunked_logits(llama, ids, chunk=16,
                                                                 cache=eager)):
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)   # compiled = eager
    assert c.kept() == 24 and c.get_seq_length() == 70
    out = fast.generate(ids[None], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    want = llama.generate(ids[None], past_key_values=kv.make_cache(llama), max_new_tokens=6,
                          do_sample=False, min_new_tokens=6)
    assert torch.equal(out, want)
    breaks = [w for w in fast.longfx_backend.report.warnings if "graph break" in w]
    assert breaks and all("runs eagerly" in w for w in breaks)    # only the store's update


def test_beam_search_reorders_the_store(llama):
    ids = _ids(40, seed=5)
    kv = cache_recipe(parse("h2o(budget=16, recent=4) + kv_quant(bits=4, group=8, residual=8)"))
    cache = kv.make_cache(llama)
    out = llama.generate(ids, past_key_values=cache, max_new_tokens=4, num_beams=2,
                         do_sample=False, min_new_tokens=4)
    store = cache.layers[0].store
    assert out.shape == (1, 44) and cache.kept() == 16
    assert store.k_ring.shape[0] == store.tok["k_codes"].shape[0] == store.n_pk.shape[0] == 2
    assert store.positions().shape == (2, 2, 16)


def test_a_used_layer_is_refused():
    layer = _layer(_kv(), False)
    layer.update(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    with pytest.raises(ValueError, match="fresh"):
        H2OQuantizedStore(layer)
