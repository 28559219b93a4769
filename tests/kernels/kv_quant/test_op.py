"""The kv_quant custom ops of kernels/kv_quant/op.py that the decode lowering of a rotated or
clipped cache relies on: ``longfx::kv_rotate``, the ``clip`` argument of
``longfx::kv_quant_append``, and attention over a rotated state with the query rotated in and
the output rotated back (QuaRot's identity, passes/kv_quant_decode.py)."""
import pytest
import torch

from longfx.kernels.attention.reference import attention
from longfx.kernels.kv_quant import op
from longfx.kernels.kv_quant import reference as R
from longfx.testing import max_rel_error


def _rel(a, b):
    return max_rel_error(a.float(), b.float())


def _kv(B, H, T, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g)
    k[..., 3] += 6.0                                        # a key outlier channel (KIVI's case)
    return k.to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_rotate_is_the_reference_rotation(dtype):
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = R.rotation(16)
    assert torch.equal(op.ROTATE(x, q, False), R.rotate(x, q))
    assert torch.equal(op.ROTATE(x, q, True), R.unrotate(x, q))
    assert torch.equal(torch.ops.longfx.kv_rotate(x, q), R.rotate(x, q))     # inverse=False
    assert op.ROTATE(x, q, False).dtype == dtype
    assert not torch.equal(op.ROTATE(x, q, False), op.ROTATE(x, q, True))    # Q is not symmetric
    with pytest.raises(ValueError, match=r"\[D, D\] = \[16, 16\]"):
        op.ROTATE(x, R.rotation(8), False)
    compiled = torch.compile(lambda a, b: op.ROTATE(op.ROTATE(a, b, False), b, True),
                             backend="aot_eager", fullgraph=True)           # the fake traces
    assert torch.equal(compiled(x, q), R.unrotate(R.rotate(x, q), q))


def test_append_op_takes_clip_and_defaults_to_no_clip():
    """``kv_quant_append(..., clip=True)`` packs exactly what the reference's clipped append
    packs; without the argument (every older caller) it packs the unclipped state, and the two
    differ, so the argument reaches the quantizer."""
    k, v = _kv(1, 2, 70, 16, seed=1)
    states = {}
    for clip in (False, True):
        c = R.KVQuantConfig(bits=2, group=16, residual=16, clip=clip)
        ref = R.append(R.QuantizedKV.empty(1, 2, 16, 96, c, torch.float32), k, v)
        st = R.QuantizedKV.empty(1, 2, 16, 96, c, torch.float32)
        if clip:
            op.APPEND(*st.tensors(), k, v, 2, 16, True)
        else:
            op.APPEND(*st.tensors(), k, v, 2, 16)                # the old five-argument call
        for a, b in zip(st.tensors(), ref.tensors()):
            assert torch.equal(a, b)
        states[clip] = st
    assert not torch.equal(states[True].k_params, states[False].k_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's Triton path is CUDA only")
def test_append_op_with_clip_runs_the_triton_search_on_cuda(monkeypatch):
    """On CUDA ``clip=True`` goes to ``triton_clip.append_clip`` (not the reference), and the
    state it packs is the reference's (a near-tie of two ratios could differ in principle,
    tests/kernels/kv_quant/test_triton_clip.py bounds that; none on this data)."""
    from longfx.kernels.kv_quant import triton_clip

    called = []
    real = triton_clip.append_clip
    monkeypatch.setattr(triton_clip, "append_clip",
                        lambda *a: called.append(1) or real(*a))
    k, v = _kv(1, 2, 70, 64, seed=2, dtype=torch.float16)
    c = R.KVQuantConfig(bits=2, group=32, residual=32, clip=True)
    ref = R.append(R.QuantizedKV.empty(1, 2, 64, 96, c, torch.float16), k, v)
    st = R.QuantizedKV.empty(1, 2, 64, 96, c, torch.float16, "cuda")
    op.APPEND(*st.tensors(), k.cuda(), v.cuda(), 2, 32, True)
    assert called
    assert int(st.length) == int(ref.length) == 70
    for name, a, b in zip(R.QuantizedKV.NAMES, st.tensors(), ref.tensors()):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("bits,key_bits", [(4, None), (2, None), (2, 4)])
@pytest.mark.parametrize("S", [1, 2])
def test_rotated_query_attention_over_the_rotated_state_is_attention_over_the_read(
        sinks, bits, key_bits, S):
    """A state holding K·Q, V·Q (as a ``rotate=true`` cache stores it): rotating q and the exact
    sink copy by Q, attending over the packed state, and rotating the output back by Qᵀ gives
    attention over the un-rotated dequantized read with the exact sinks — what the unlowered
    decode step computes. Without the output's Qᵀ, or with the sink copy left unrotated, it
    does not."""
    D, T, scale = 16, 70, 0.25
    c = R.KVQuantConfig(bits=bits, group=16, residual=16, clip=True, key_bits=key_bits)
    k, v = _kv(1, 2, T, D, seed=2)
    rot = R.rotation(D)
    st = R.append(R.QuantizedKV.empty(1, 2, D, 96, c, torch.float32),
                  R.rotate(k, rot), R.rotate(v, rot))                   # the stored basis
    q = torch.randn(1, 4, S, D, generator=torch.Generator().manual_seed(3))     # GQA 4 / 2
    sink_k = k[:, :, :sinks].contiguous() if sinks else None                    # exact, unrotated
    sink_v = v[:, :, :sinks].contiguous() if sinks else None

    kd, vd = R.dequantize_state(st)                                     # the unlowered read
    kd, vd = R.with_sinks(R.unrotate(kd, rot), R.unrotate(vd, rot), sink_k, sink_v)
    mask = torch.ones(S, T, dtype=torch.bool).tril(T - S)               # [S, T] bottom-right
    want = attention(q, kd, vd, mask, scale)

    def lowered(out_back=True, rotate_sinks=True):
        sk, sv = sink_k, sink_v
        if sinks and rotate_sinks:
            sk, sv = op.ROTATE(sink_k, rot, False), op.ROTATE(sink_v, rot, False)
        out = op.ATTENTION(op.ROTATE(q, rot, False), *st.tensors(), scale, bits, 16, sk, sv)
        return op.ROTATE(out, rot, True) if out_back else out

    got = lowered()
    # fp32: the lowering re-associates two [D, D] products per token (q·Q·(K·Q)ᵀ vs q·(K·Q·Qᵀ)ᵀ)
    assert _rel(got, want) < 1e-5, _rel(got, want)
    assert _rel(lowered(out_back=False), want) > 0.1
    if sinks:
        assert _rel(lowered(rotate_sinks=False), want) > 0.1


@pytest.mark.parametrize("S,window", [(1, 9), (1, 0), (3, 9), (2, 1), (1, 500)])
def test_dequantized_attention_applies_the_window_like_the_reference(S, window):
    """The GPU's fallback (``dequantized_attention``: the dequantized copy from the window's
    first key on, SDPA) gives the reference's windowed answer, with and without the exact sink
    copy (sinks outside the window unseen); the op's schema takes ``window`` and traces."""
    k, v = _kv(1, 2, 70, 16, seed=4)
    st = R.append(R.QuantizedKV.empty(1, 2, 16, 96, R.KVQuantConfig(4, 16, 16), torch.float32),
                  k, v)
    q = torch.randn(1, 4, S, 16, generator=torch.Generator().manual_seed(5))
    for sk, sv in ((None, None), (3 * k[:, :, :4], v[:, :, :4] + 2)):
        want = R.attention_decode(q, st, 0.3, sk, sv, window)
        assert _rel(op.dequantized_attention(q, st, 0.3, sk, sv, window), want) < 1e-5
        if 0 < window < 70:
            assert _rel(R.attention_decode(q, st, 0.3, sk, sv), want) > 0.05
    compiled = torch.compile(lambda *a: op.ATTENTION(*a, 0.3, 4, 16, None, None, window),
                             backend="aot_eager", fullgraph=True)            # the fake traces
    assert _rel(compiled(q, *st.tensors()), R.attention_decode(q, st, 0.3, window=window)) < 1e-6
