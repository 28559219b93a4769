"""``longfx::block_sparse_attention`` — causal attention whose key blocks are chosen at run time.

What ``block_sparse`` (prefill, MInference) and ``decode_topk`` (decode, Quest) turn a
``longfx::attention`` site into. The op carries both selections' parameters; each call picks
by its shape:

* a *decode step* (S <= ``DECODE_MAX_S`` queries): the Quest table (``decode_*`` arguments)
  when ``decode_topk`` or ``decode_density`` is set, else dense;
* otherwise *prefill*: the estimated block table (``block``, ``topk``/``density``, ``sink``,
  ``window``, ``estimate``, ``last_q``) when ``topk`` or ``density`` is set, else dense.

Dense fallback: a selection runs only when the context has at least ``min_len`` keys (resp.
``decode_min_len``) and the table would skip something (the budget is below the causal block
count of the last query block); otherwise the call is the canonical dense attention (causal,
bottom-right, the padding vector) through ``longfx::sparse_attention`` with no window, which
runs dense SDPA. So short prompts, and decode without ``decode_topk``, are unchanged.

Lowering of a table: the Triton block-table kernel on CUDA
(``kernels/sparse_attention/triton.py:block_sparse_attention``), else the gather in gather.py.
The decode bounds: one pass over the keys in Triton on CUDA (triton.py), else the reference.
Semantics: reference.py (``table_mask``). ``record_density()`` counts the kept and causal block
pairs of the tables built while it is active (costs a device sync per call).
"""
from __future__ import annotations

import contextlib

import torch

from longfx.kernels.block_sparse import gather, reference
from longfx.kernels.sparse_attention.op import OP as SPARSE

DECODE_MAX_S = 16

# argument order after (q, k, v, key_keep, scale, softcap); the rewrite amends them by name
PARAMS = ("block", "topk", "density", "sink", "window", "estimate", "last_q", "min_len",
          "decode_block", "decode_topk", "decode_density", "decode_sink", "decode_window",
          "decode_min_len")
OFF = dict(block=64, topk=0, density=0.0, sink=0, window=0, estimate="pooled", last_q=64,
           min_len=0, decode_block=16, decode_topk=0, decode_density=0.0, decode_sink=0,
           decode_window=0, decode_min_len=0)

_STATS: list[dict] = []


@contextlib.contextmanager
def record_density():
    """Count kept / causal block pairs of every table built inside: yields a dict with
    ``prefill`` and ``decode`` entries ``[kept, causal, calls]`` and ``dense_calls``."""
    stats = {"prefill": [0, 0, 0], "decode": [0, 0, 0], "dense_calls": 0}
    _STATS.append(stats)
    try:
        yield stats
    finally:
        _STATS.remove(stats)


def _count(kind: str, table, s, skv, bs) -> None:
    if _STATS:
        kept, causal = reference.table_counts(table, s, skv, bs)
        for st in _STATS:
            st[kind][0] += kept
            st[kind][1] += causal
            st[kind][2] += 1


def _triton_impl(module: str = "longfx.kernels.sparse_attention.triton"):
    """A Triton module (the table kernel by default, or the Quest bounds) when it imports and
    runs here, else None: no triton, or no CUDA build, and the torch path serves."""
    import importlib

    try:
        impl = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means the fallback
        return None
    return impl if getattr(impl, "AVAILABLE", False) else None


def quest_scores(q, k, bs):
    """Quest bounds [B, H, 1, nkb]: the one-pass Triton kernel on CUDA when it takes the
    inputs, else the reference."""
    if q.is_cuda:
        impl = _triton_impl("longfx.kernels.block_sparse.triton")
        if impl is not None and impl.supports(q, k, bs):
            return impl.quest_scores(q, k, bs)
    return reference.quest_scores(q, k, bs)


def _dense(q, k, v, key_keep, scale, softcap):
    if _STATS:
        for st in _STATS:
            st["dense_calls"] += 1
    return SPARSE(q, k, v, key_keep, scale, softcap, 0, 0, 0, None, "rotate_half")


def _skips_something(s, skv, bs, sink, window, topk, density) -> bool:
    """Whether the last (largest) query block's budget is below its causal block count."""
    nkb = -(-skv // bs)
    if topk > 0:
        want = topk
    else:
        want = -(-int(nkb * density * 1_000_000) // 1_000_000) if density < 1 else nkb
    forced = -(-sink // bs) + (max(window, 1) + min(bs, s) - 2) // bs + 2
    return max(want, 1) < nkb and forced < nkb


def attend_table(q, k, v, table, bs, scale, softcap, key_keep):
    """Run a table: the Triton kernel on CUDA when it takes the inputs, else the gather."""
    if q.is_cuda:
        impl = _triton_impl()
        if impl is not None and impl.supports(q, k, v, key_keep, softcap):
            return impl.block_sparse_attention(q, k, v, table, bs, scale, key_keep=key_keep,
                                               softcap=softcap)
    return gather.attend(q, k, v, table, bs, scale, softcap, key_keep)


def forward(q, k, v, key_keep, scale, softcap, *, block, topk, density, sink, window, estimate,
            last_q, min_len, decode_block, decode_topk, decode_density, decode_sink,
            decode_window, decode_min_len, dense_fallback: bool = True) -> torch.Tensor:
    """The op's body (tests call it with ``dense_fallback=False`` to force the table path)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s, skv = q.shape[2], k.shape[2]
    if s == 0:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)
    if s <= DECODE_MAX_S:
        on = decode_topk > 0 or decode_density > 0
        if on and (not dense_fallback or (skv >= decode_min_len and _skips_something(
                s, skv, decode_block, decode_sink, decode_window, decode_topk, decode_density))):
            bs = max(decode_block, 16)
            while bs < s:
                bs *= 2
            table = reference.decode_table(q, k, bs, decode_topk, decode_density, decode_sink,
                                           decode_window, scores=quest_scores(q, k, bs))
            _count("decode", table, s, skv, bs)
            return attend_table(q, k, v, table, bs, scale, softcap, key_keep)
        return _dense(q, k, v, key_keep, scale, softcap)
    on = topk > 0 or density > 0
    if on and (not dense_fallback or (skv >= min_len and _skips_something(
            s, skv, block, sink, window, topk, density))):
        table = reference.prefill_table(q, k, block, topk, density, sink, window, estimate,
                                        last_q, scale, key_keep)
        _count("prefill", table, s, skv, block)
        return attend_table(q, k, v, table, block, scale, softcap, key_keep)
    return _dense(q, k, v, key_keep, scale, softcap)


@torch.library.custom_op("longfx::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_keep: torch.Tensor | None, scale: float, softcap: float,
                           block: int, topk: int, density: float, sink: int, window: int,
                           estimate: str, last_q: int, min_len: int, decode_block: int,
                           decode_topk: int, decode_density: float, decode_sink: int,
                           decode_window: int, decode_min_len: int) -> torch.Tensor:
    check_args(q, k, v, key_keep, block, decode_block, estimate)
    return forward(q, k, v, key_keep, scale, softcap, block=block, topk=topk, density=density,
                   sink=sink, window=window, estimate=estimate, last_q=last_q, min_len=min_len,
                   decode_block=decode_block, decode_topk=decode_topk,
                   decode_density=decode_density, decode_sink=decode_sink,
                   decode_window=decode_window, decode_min_len=decode_min_len)


@block_sparse_attention.register_fake
def _(q, k, v, key_keep, scale, softcap, *params):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def check_args(q, k, v, key_keep, block, decode_block, estimate) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"block-sparse attention takes [B, H, S, D] tensors, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"{q.shape[2]} queries but only {k.shape[2]} keys (KV-cache convention)")
    if key_keep is not None and key_keep.shape[-1] != k.shape[2]:
        raise ValueError(f"key_keep has {key_keep.shape[-1]} keys, k has {k.shape[2]}")
    reference.check_block(block)
    reference.check_block(decode_block)
    if estimate not in reference.ESTIMATES:
        raise ValueError(f"estimate must be one of {reference.ESTIMATES}, got {estimate!r}")


OP = torch.ops.longfx.block_sparse_attention.default
