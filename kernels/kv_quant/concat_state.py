"""The quantized KV state in *concat layout*: the functional form a graph carries from step to
step (the ONNX export, runtime/onnx_export.py).

The runtime's state (``reference.QuantizedKV``) is written in place: packed storage with spare
capacity and a ring of R full-precision slots indexed by ``position % R``. A graph input that
comes back as a graph output cannot be written in place, and a runner should not need to know
the capacity, so the export path carries the same packed tensors with no spare capacity and the
ring unrolled in position order (the "tail"):

    k_codes  uint8        [B, Hkv, Pp, D·kbits/8]     packed key codes
    k_params fp16 | uint8 [B, Hkv, Pp/group, 2, D]   per (key group, channel): (scale, zero)
    v_codes  uint8        [B, Hkv, Pp, D·bits/8]      packed value codes
    v_params fp16 | uint8 [B, Hkv, Pp, 2, Jv]        per (token, channel group): (scale, zero)
    k_tail   model dtype  [B, Hkv, T, D]             the last T tokens, full precision, in order
    v_tail   model dtype  [B, Hkv, T, D]
    sink_k   model dtype  [B, Hkv, sink, D]          (sink > 0) positions < sink, exact; zeros
    sink_v   model dtype  [B, Hkv, sink, D]          beyond the tokens held

For P tokens held, Pp = ``n_packed(P)`` and T = P − Pp ≤ R: the split of the ring state, so the
codes and params are byte for byte those a ``QuantizedKVLayer`` holds after the same appends,
and the tail is its ring read in position order (tests/kernels/kv_quant/test_concat_state.py).
Rotation (``rotate=True``) is the cache's: codes and tail hold ``x·Q``, the sink copy does not.

:func:`step` appends S new tokens and returns what attention reads, as ``QuantizedKVLayer.update``
does: after a one-token decode step the state after the append, dequantized (a group packed by
this step is read quantized); after a chunk of S > 1 tokens the stored past, dequantized,
followed by the chunk in full precision (KIVI's prefill). A graph traced at one S serves both,
so the choice is a ``where`` on a tensor computed from S, not a Python branch.

Every size is a function of the input sizes (n_new = group · max(0, ⌈(T + S − R) / group⌉)), so
``torch.export`` traces one program for every P and S, with no data-dependent shape.
"""
from __future__ import annotations

import torch

from longfx.kernels.kv_quant import reference as ref
from longfx.kernels.kv_quant.reference import KVQuantConfig

NAMES = ("k_codes", "k_params", "v_codes", "v_params", "k_tail", "v_tail")
SINK_NAMES = ("sink_k", "sink_v")


def names(sink: int) -> tuple[str, ...]:
    """The state's tensor names, in the order :func:`step` takes and returns them."""
    return NAMES + (SINK_NAMES if sink else ())


def empty(batch: int, kv_heads: int, head_dim: int, config: KVQuantConfig, sink: int,
          dtype: torch.dtype, device=None) -> tuple[torch.Tensor, ...]:
    """The state before the first token (Pp = T = 0; the sink copy all zeros)."""
    config.check_head_dim(head_dim)
    B, H, D = batch, kv_heads, head_dim
    pd = config.params_dtype
    out = (torch.zeros(B, H, 0, D * config.kbits // 8, dtype=torch.uint8, device=device),
           torch.zeros(B, H, 0, 2, D, dtype=pd, device=device),
           torch.zeros(B, H, 0, D * config.bits // 8, dtype=torch.uint8, device=device),
           torch.zeros(B, H, 0, 2, config.value_groups(D), dtype=pd, device=device),
           torch.zeros(B, H, 0, D, dtype=dtype, device=device),
           torch.zeros(B, H, 0, D, dtype=dtype, device=device))
    if sink:
        out += (torch.zeros(B, H, sink, D, dtype=dtype, device=device),
                torch.zeros(B, H, sink, D, dtype=dtype, device=device))
    return out


def length(state: tuple[torch.Tensor, ...]):
    """Tokens held: packed + tail (an int, or a SymInt under export)."""
    return state[0].shape[2] + state[4].shape[2]


def packed_now(tail: int, new: int, config: KVQuantConfig):
    """Tokens that leave the tail for packed storage when ``new`` tokens join a tail of ``tail``:
    whole groups, so that at most R stay (``reference.n_packed`` on the tail alone, since the
    packed count is always a multiple of the group)."""
    g, r = config.group, config.ring
    return torch.sym_max(0, (tail + new - r + g - 1) // g) * g


def _sinks(x: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, L, D] with positions < min(n, L) taken from the exact copy sink [B, Hkv, n, D]
    (``reference.with_sinks``). No size may depend on min(n, L), so the rows are written at
    arange(n) clamped to L − 1: for L < n the extra writes all land on row L − 1 with its own
    value. One scatter along dim 2 (ONNX ScatterElements): in onnxruntime 0.1 ms at L = 4097,
    against 0.76 ms for the full-length gather and where it replaced, and 0.5 ms for an
    index_copy, whose ScatterND wants dim 2 transposed to the front (docs/design-notes.md)."""
    B, H, L, D = x.shape
    n = sink.shape[2]
    rows = torch.arange(n, device=x.device).clamp(max=L - 1)               # [n]
    at = rows[None, None, :, None].expand(B, H, n, D)                       # [B, Hkv, n, D]
    return x.scatter(2, at, sink.gather(2, at).to(x.dtype))


def _new_sinks(sink: torch.Tensor, x: torch.Tensor, past) -> torch.Tensor:
    """The sink copy after x [B, Hkv, S, D] arrives at positions past .. past + S − 1."""
    n, S = sink.shape[2], x.shape[2]
    j = torch.arange(n, device=x.device)                                   # [n]
    rel = j - past                                                          # position in x
    take = (rel >= 0) & (rel < S)
    from_x = x.index_select(2, rel.clamp(0, S - 1))                        # [B, Hkv, n, D]
    return torch.where(take[:, None], from_x, sink)


def step(state: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor,
         config: KVQuantConfig, sink: int = 0, rot: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Append k, v [B, Hkv, S, D] (model dtype) to ``state`` (:func:`names` order).

    Returns (keys, values) [B, Hkv, P + S, D] for attention — see the module docstring for
    what a decode step and a chunk read — and the new state. ``rot``: the [D, D] rotation of a
    ``rotate=True`` config (``reference.rotation``)."""
    if config.rotate and rot is None:
        raise ValueError("a rotate=True state needs its rotation (reference.rotation(D))")
    kc, kp, vc, vp, kt, vt = state[:6]
    sk, sv = state[6:8] if sink else (None, None)
    dt, S, T = kt.dtype, k.shape[2], kt.shape[2]
    Pp = kc.shape[2]

    def to_store(x):                                   # what the state holds: x·Q if rotated
        return ref.rotate_as(x, rot) if config.rotate else x

    def to_model(x):                                   # back to the model's basis
        return ref.rotate_as(x, rot, inverse=True) if config.rotate else x

    full_k = torch.cat((kt, to_store(k)), 2)                                # [B, Hkv, T + S, D]
    full_v = torch.cat((vt, to_store(v)), 2)
    n_new = packed_now(T, S, config)
    nkc, nkp = ref.quantize_keys(full_k[:, :, :n_new], config)            # [.., n_new, ..]
    nvc, nvp = ref.quantize_values(full_v[:, :, :n_new], config)
    new_state = (torch.cat((kc, nkc), 2), torch.cat((kp, nkp), 2),
                 torch.cat((vc, nvc), 2), torch.cat((vp, nvp), 2),
                 full_k[:, :, n_new:], full_v[:, :, n_new:])

    # the read: packed past, then the T + S tokens after it as a chunk or as a decode step reads
    old_k = ref.dequantize_keys(kc, kp, config).to(dt)                      # [B, Hkv, Pp, D]
    old_v = ref.dequantize_values(vc, vp, config).to(dt)
    step_k = torch.cat((ref.dequantize_keys(nkc, nkp, config).to(dt), full_k[:, :, n_new:]), 2)
    step_v = torch.cat((ref.dequantize_values(nvc, nvp, config).to(dt), full_v[:, :, n_new:]), 2)
    decode = k.new_ones(S, dtype=torch.int32).sum() == 1                    # a tensor, not a branch
    rest_k = torch.where(decode, to_model(step_k), torch.cat((to_model(kt), k), 2))
    rest_v = torch.where(decode, to_model(step_v), torch.cat((to_model(vt), v), 2))
    read_k = torch.cat((to_model(old_k), rest_k), 2)                         # [B, Hkv, P + S, D]
    read_v = torch.cat((to_model(old_v), rest_v), 2)
    if sink:
        past = Pp + T
        new_state += (_new_sinks(sk, k, past), _new_sinks(sv, v, past))
        read_k, read_v = _sinks(read_k, new_state[6]), _sinks(read_v, new_state[7])
    return read_k, read_v, new_state


def from_layer(layer) -> tuple[torch.Tensor, ...]:
    """A ``runtime.cache.QuantizedKVLayer``'s state in concat layout (for comparisons): packed
    tensors cut to the tokens held, the ring in position order, the sink copy as it is."""
    st, c, L = layer.state, layer.config, layer.length
    n = ref.n_packed(L, c)
    slots = torch.arange(n, L, device=st.k_ring.device) % c.ring
    out = (st.k_codes[:, :, :n], st.k_params[:, :, :n // c.group], st.v_codes[:, :, :n],
           st.v_params[:, :, :n], st.k_ring[:, :, slots], st.v_ring[:, :, slots])
    if layer.sink:
        out += (layer.sink_k, layer.sink_v)
    return out


__all__ = ["NAMES", "SINK_NAMES", "names", "empty", "length", "packed_now", "step", "from_layer"]
