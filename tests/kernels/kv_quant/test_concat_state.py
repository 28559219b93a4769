"""The concat-layout state (the export path's functional form) holds and reads exactly what the
runtime's ``QuantizedKVLayer`` holds and reads after the same appends."""
import pytest
import torch

from longfx.kernels.kv_quant import concat_state as C
from longfx.kernels.kv_quant import reference as R
from longfx.runtime.cache import QuantizedKVLayer

CONFIGS = [
    (R.KVQuantConfig(4, 4, 8), 0),
    (R.KVQuantConfig(4, 4, 8), 3),
    (R.KVQuantConfig(2, 8, 5, "fp16"), 2),                 # ring 8: residual rounded up
    (R.KVQuantConfig(8, 4, 4), 1),
    (R.KVQuantConfig(2, 4, 8, rotate=True, clip=True), 3),
    (R.KVQuantConfig(2, 4, 8, key_bits=4), 3),
    (R.KVQuantConfig(4, 32, 8), 4),                         # a value group wider than D: padded
]
CHUNKS = [7, 1, 1, 5, 1, 1, 1, 12, 1, 3, 1, 1, 1, 1, 9, 1]   # prefill chunks and decode steps


def _ids(c):
    return f"{c[0]}-sink{c[1]}"


@pytest.mark.parametrize("config,sink", CONFIGS, ids=[_ids(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_equals_the_runtime_layer(config, sink, dtype):
    B, H, D = 2, 3, 16
    gen = torch.Generator().manual_seed(0)
    layer = QuantizedKVLayer(config, block=8, sink=sink)
    state = C.empty(B, H, D, config, sink, dtype)
    rot = R.rotation(D) if config.rotate else None
    seen = 0
    for s in CHUNKS:
        k = torch.randn(B, H, s, D, generator=gen).to(dtype)
        k[..., 5] += 4.0                                     # a key outlier channel
        v = torch.randn(B, H, s, D, generator=gen).to(dtype)
        want_k, want_v = layer.update(k, v)
        got_k, got_v, state = C.step(state, k, v, config, sink, rot)
        seen += s
        assert got_k.shape == (B, H, seen, D) and got_k.dtype == dtype
        assert C.length(state) == seen == layer.length
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-6 if config.rotate else 0)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-6 if config.rotate else 0)
        for name, a, b in zip(C.names(sink), state, C.from_layer(layer)):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert state[0].shape[2] > 0                           # groups were packed on the way


def test_decode_reads_the_group_it_packs_quantized():
    """A one-token step that packs a group reads it quantized; a chunk reads its past tail
    exactly (the two cases the where chooses between)."""
    config = R.KVQuantConfig(4, 4, 4)
    B, H, D = 1, 1, 8
    gen = torch.Generator().manual_seed(1)
    state = C.empty(B, H, D, config, 0, torch.float32)
    k = torch.randn(B, H, 4, D, generator=gen)
    _, _, state = C.step(state, k, k, config)               # 4 tokens in the tail, none packed
    x = torch.randn(B, H, 1, D, generator=gen)
    rk, _, after = C.step(state, x, x, config)              # the 5th packs the first group
    assert after[0].shape[2] == 4 and not torch.equal(rk[:, :, :4], k)
    rk2, _, _ = C.step(state, torch.cat((x, x), 2), torch.cat((x, x), 2), config)
    assert torch.equal(rk2[:, :, :4], k)


def test_rotate_needs_its_rotation():
    config = R.KVQuantConfig(4, 4, 4, rotate=True)
    state = C.empty(1, 1, 8, config, 0, torch.float32)
    with pytest.raises(ValueError, match="rotation"):
        C.step(state, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), config)
