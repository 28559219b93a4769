"""``longfx::kv_quant_*`` — the custom ops a ``kv_quant(...)`` recipe turns KV sites into.

The state is seven explicit tensors of fixed dtype and static shape (layout: reference.py),
passed positionally in ``QuantizedKV.NAMES`` order, so a graph can take it as inputs and a
runtime (HF ``Cache``, ONNX runner) can own it:

    k_codes uint8, k_params fp16|uint8, v_codes uint8, v_params fp16|uint8,
    k_ring, v_ring (model dtype), length int64 [1]

* ``kv_quant_append(*state, k, v, bits, group, clip=False)`` mutates the state in place
  (quantize-on-append: whole groups leaving the full-precision ring are packed; the length
  advances by k's S). ``clip=True``: each packed group's range is searched
  (``reference.search_params``; on CUDA by ``triton_clip.append_clip``, which gives the
  reference's codes and params). Under torch.compile / export it is functionalized like any
  in-place cache update.
* ``kv_quant_attention(q, *state, scale, bits, group, sink_k=None, sink_v=None, window=0)`` —
  the last S positions of the state attend to all of it (bottom-right causal, GQA), reading
  the packed codes; with the exact sink copy a ``QuantizedKVLayer`` keeps (``sink_k``,
  ``sink_v`` [B, Hkv, n, D]) positions < n read that copy instead; ``window`` > 0 (a
  sliding-window layer, whose trimmed cache holds more than its window) each query sees only
  the ``window`` most recent held keys up to its own position (``reference.decode_mask``).
  ``kv_quant(...)``'s lowering rule (passes/kv_quant_decode.py) puts it in a decode step in
  place of read → attention.
* ``kv_rotate(x, rot, inverse=False)`` — ``x [..., D] @ rot`` (``@ rotᵀ`` when ``inverse``),
  in fp32, in x's dtype (``reference.rotate_as``): the rotation of a ``rotate=true`` cache
  (QuaRot, Ashkboos et al. 2024). One node in a graph, so the lowering rule can see that a
  read is un-rotated and move the rotation to the query and the output instead.
* ``kv_quant_attention_emulated(q, k, v, scale, bits, group, residual, scales, gear_rank,
  gear_outliers)`` — fp tensors in, the output token-by-token decoding over a quantized state
  would give (quantize -> dequantize, optional GEAR): for perplexity at model level.

* ``gear_append(*state, *gear_extras, k, v, bits, group, rank, outliers)`` — the append of
  a ``gear(...)`` state (gear.py): the same 7 tensors plus GEAR's 8 stored-correction tensors
  (``gear.EXTRA_NAMES`` order), mutated in place; ``gear_read(...)`` its dequantized read.

The ring size and scale format are read off the tensors (``k_ring.shape[2]``,
``k_params.dtype``). Lowering: the Triton kernels (triton.py) on CUDA when they support the
shapes (the append unless LONGFX_KV_QUANT_TRITON_APPEND=0, see TRITON_APPEND below), else
the reference; the Triton path reads ``length`` on the device (no host sync, CUDA
graph friendly) and therefore does not check the capacity: the caller must.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from longfx.kernels.kv_quant import reference

STATE_ARGS = reference.QuantizedKV.NAMES


def _triton_impl():
    try:
        from longfx.kernels.kv_quant import triton as impl
    except Exception:  # noqa: BLE001 - no triton, or no CUDA build: the reference serves
        return None
    return impl if getattr(impl, "AVAILABLE", False) else None


# The Triton quantize-on-append is on by default on CUDA (LONGFX_KV_QUANT_TRITON_APPEND=0 turns
# it off). It was opt-in after SmolLM2's 4-bit perplexity through the kv_quant recipe on an
# H100 came out 638 at 4k; the cause was not this kernel but the canonical passes dropping the
# append op from the graph on torch 2.11 (rewrite/manager.py ``mutates``). Checked on an H100
# after that fix (2026-11-24, benchmarks/results/debug/kv_quant_triton_append_h100.jsonl):
# SmolLM2 kv_quant(bits=4) perplexity 11.4812 / 10.4012 at 4k / 8k with this append, the
# reference append's 11.4812 / 10.4012 (smollm2-135m_h100.jsonl).
TRITON_APPEND = os.environ.get("LONGFX_KV_QUANT_TRITON_APPEND", "1") != "0"


def _impl_for(x: torch.Tensor):
    return _triton_impl() if x.is_cuda else None


@torch.library.custom_op("longfx::kv_quant_append", mutates_args=STATE_ARGS)
def kv_quant_append(k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor,
                    v_params: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                    length: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int,
                    group: int, clip: bool = False) -> None:
    tensors = (k_codes, k_params, v_codes, v_params, k_ring, v_ring, length)
    state = reference.QuantizedKV.from_tensors(tensors, bits, group)
    if clip:                            # the per-group range search (reference.search_params)
        state.config = dataclasses.replace(state.config, clip=True)
    impl = _impl_for(k) if TRITON_APPEND else None
    if impl is not None and clip:
        from longfx.kernels.kv_quant import triton_clip

        if triton_clip.supports_append_clip(state, k, v):
            triton_clip.append_clip(state, k, v)
            return
    elif impl is not None and impl.supports_append(state, k, v):
        impl.append(state, k, v)
        return
    reference.append(state, k, v)


@kv_quant_append.register_fake
def _(k_codes, k_params, v_codes, v_params, k_ring, v_ring, length, k, v, bits, group,
      clip=False):
    return None


@torch.library.custom_op("longfx::kv_quant_attention", mutates_args=())
def kv_quant_attention(q: torch.Tensor, k_codes: torch.Tensor, k_params: torch.Tensor,
                       v_codes: torch.Tensor, v_params: torch.Tensor, k_ring: torch.Tensor,
                       v_ring: torch.Tensor, length: torch.Tensor, scale: float, bits: int,
                       group: int, sink_k: torch.Tensor | None = None,
                       sink_v: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    tensors = (k_codes, k_params, v_codes, v_params, k_ring, v_ring, length)
    state = reference.QuantizedKV.from_tensors(tensors, bits, group)
    impl = _impl_for(q)
    if impl is not None and impl.supports_attention(q, state, sinks=sink_k is not None,
                                                    window=window):
        return impl.attention_decode(q, state, scale, sink_k=sink_k, sink_v=sink_v,
                                     window=window)
    if q.is_cuda:
        return dequantized_attention(q, state, scale, sink_k, sink_v, window)
    return reference.attention_decode(q, state, scale, sink_k, sink_v, window)


@kv_quant_attention.register_fake
def _(q, k_codes, k_params, v_codes, v_params, k_ring, v_ring, length, scale, bits, group,
      sink_k=None, sink_v=None, window=0):
    return q.new_empty((*q.shape[:-1], k_ring.shape[-1]))


def dequantized_attention(q: torch.Tensor, state: reference.QuantizedKV, scale: float,
                          sink_k: torch.Tensor | None = None,
                          sink_v: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """``reference.attention_decode`` through a dequantized copy and SDPA (``dense.sdpa``:
    memory linear in the length): the GPU's path for what the Triton decode does not take
    (8-bit codes with sinks, head dims it refuses, a window over one-width 8-bit codes). It
    reads the length on the host. ``window`` > 0: keys before the first any query sees are
    not passed to SDPA at all (one query: the last ``window`` held keys, no mask)."""
    from longfx.kernels.attention import dense

    L = int(state.length)
    reference.check_query(q, state.k_ring.shape[1], state.head_dim, L)
    reference.check_sinks(sink_k, sink_v, state)
    k, v = reference.with_sinks(*reference.dequantize_state(state), sink_k, sink_v)
    S = q.shape[2]
    lo = max(0, L - S - window + 1) if window else 0        # first key any query sees
    k, v = k[:, :, lo:], v[:, :, lo:]                       # [B, Hkv, L - lo, D]
    # one query sees every key from lo on; more: bottom-right causal (and the window)
    mask = None if S == 1 else reference.decode_mask(S, L, window, q.device)[:, lo:]
    return dense.sdpa(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)


@torch.library.custom_op("longfx::kv_quant_attention_emulated", mutates_args=())
def kv_quant_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                bits: int, group: int, residual: int, scales: str,
                                gear_rank: int, gear_outliers: float) -> torch.Tensor:
    config = reference.KVQuantConfig(bits, group, residual, scales)
    gear = reference.Gear(gear_rank, gear_outliers) if gear_rank or gear_outliers else None
    return reference.attention_emulated(q, k, v, config, scale, gear)


@kv_quant_attention_emulated.register_fake
def _(q, k, v, scale, bits, group, residual, scales, gear_rank, gear_outliers):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("longfx::kv_quant_read", mutates_args=())
def kv_quant_read(k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor,
                  v_params: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                  length: int, bits: int, group: int, residual: int,
                  scales: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` tokens of the state, dequantized: keys and values [B, Hkv, length,
    D] in the ring's dtype (packed groups, then the ring's tokens in order).

    One opaque op, so that Dynamo does not trace the bit unpacking: traced, a second ``bits``
    in one process made it treat the width as a symbolic int, and the unpacking failed
    (``lshift(1, s1)``)."""
    config = reference.KVQuantConfig(bits, group, residual, scales)
    n = reference.n_packed(length, config)
    k = reference.dequantize_keys(k_codes[:, :, :n], k_params[:, :, :n // group], config)
    v = reference.dequantize_values(v_codes[:, :, :n], v_params[:, :, :n], config)
    slots = torch.arange(n, length, device=k.device) % config.ring          # ring slot of each
    return (torch.cat((k.to(k_ring.dtype), k_ring[:, :, slots]), 2),
            torch.cat((v.to(v_ring.dtype), v_ring[:, :, slots]), 2))


@kv_quant_read.register_fake
def _(k_codes, k_params, v_codes, v_params, k_ring, v_ring, length, bits, group, residual,
      scales):
    B, H, _, D = k_ring.shape
    return k_ring.new_empty((B, H, length, D)), v_ring.new_empty((B, H, length, D))


@torch.library.custom_op("longfx::kv_rotate", mutates_args=())
def kv_rotate(x: torch.Tensor, rot: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x [..., D] @ rot`` (``@ rotᵀ`` when ``inverse``), computed in fp32, returned in x's
    dtype: ``reference.rotate_as``, the rotation a ``rotate=true`` cache stores its keys and
    values in (QuaRot, Ashkboos et al. 2024). An op rather than plain torch so that a decode
    step's un-rotation of the read is one recognisable node (passes/kv_quant_decode.py)."""
    return reference.rotate_as(x, rot, inverse).contiguous()


@kv_rotate.register_fake
def _(x, rot, inverse=False):
    return x.new_empty(x.shape)


APPEND = torch.ops.longfx.kv_quant_append.default
READ = torch.ops.longfx.kv_quant_read.default
ROTATE = torch.ops.longfx.kv_rotate.default
ATTENTION = torch.ops.longfx.kv_quant_attention.default
EMULATED = torch.ops.longfx.kv_quant_attention_emulated.default


# ---------------------------------------------------------------- GEAR (gear.py)

GEAR_ARGS = STATE_ARGS + ("k_out_val", "k_out_idx", "k_lr_a", "k_lr_b",
                          "v_out_val", "v_out_idx", "v_lr_a", "v_lr_b")


@torch.library.custom_op("longfx::gear_append", mutates_args=GEAR_ARGS)
def gear_append(k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor,
                v_params: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                length: torch.Tensor, k_out_val: torch.Tensor, k_out_idx: torch.Tensor,
                k_lr_a: torch.Tensor, k_lr_b: torch.Tensor, v_out_val: torch.Tensor,
                v_out_idx: torch.Tensor, v_lr_a: torch.Tensor, v_lr_b: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, bits: int, group: int, rank: int,
                outliers: float) -> None:
    """``gear.append`` on the state's 7 tensors + GEAR's 8 correction tensors, in place (the
    reference on every device)."""
    from longfx.kernels.kv_quant import gear

    state = reference.QuantizedKV.from_tensors(
        (k_codes, k_params, v_codes, v_params, k_ring, v_ring, length), bits, group)
    extras = dict(zip(gear.EXTRA_NAMES, (k_out_val, k_out_idx, k_lr_a, k_lr_b,
                                         v_out_val, v_out_idx, v_lr_a, v_lr_b)))
    gear.append(state, extras, k, v, gear.GearConfig(state.config, rank, outliers))


@gear_append.register_fake
def _(k_codes, k_params, v_codes, v_params, k_ring, v_ring, length, k_out_val, k_out_idx,
      k_lr_a, k_lr_b, v_out_val, v_out_idx, v_lr_a, v_lr_b, k, v, bits, group, rank, outliers):
    return None


@torch.library.custom_op("longfx::gear_read", mutates_args=())
def gear_read(k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor,
              v_params: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
              k_out_val: torch.Tensor, k_out_idx: torch.Tensor, k_lr_a: torch.Tensor,
              k_lr_b: torch.Tensor, v_out_val: torch.Tensor, v_out_idx: torch.Tensor,
              v_lr_a: torch.Tensor, v_lr_b: torch.Tensor, length: int, bits: int, group: int,
              residual: int, scales: str, rank: int,
              outliers: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gear.read``: the first ``length`` tokens, packed groups decompressed (quantized + low
    rank + outliers), in the ring's dtype; one opaque op for the reason ``kv_quant_read`` is."""
    from longfx.kernels.kv_quant import gear

    config = gear.GearConfig(reference.KVQuantConfig(bits, group, residual, scales), rank,
                             outliers)
    state = reference.QuantizedKV(k_codes, k_params, v_codes, v_params, k_ring, v_ring,
                                  torch.zeros(1, dtype=torch.int64), config.kv)
    extras = dict(zip(gear.EXTRA_NAMES, (k_out_val, k_out_idx, k_lr_a, k_lr_b,
                                         v_out_val, v_out_idx, v_lr_a, v_lr_b)))
    return gear.read(state, extras, length, config)


@gear_read.register_fake
def _(k_codes, k_params, v_codes, v_params, k_ring, v_ring, k_out_val, k_out_idx, k_lr_a,
      k_lr_b, v_out_val, v_out_idx, v_lr_a, v_lr_b, length, bits, group, residual, scales, rank,
      outliers):
    B, H, _, D = k_ring.shape
    return k_ring.new_empty((B, H, length, D)), v_ring.new_empty((B, H, length, D))


GEAR_APPEND = torch.ops.longfx.gear_append.default
GEAR_READ = torch.ops.longfx.gear_read.default
