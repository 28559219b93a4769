"""``longfx::block_sparse_attention`` — causal attention whose key blocks are chosen at run time.

What ``block_sparse`` (prefill, MInference) and ``decode_topk`` (decode, Quest) turn a
``longfx::attention`` site into. The op carries both selections' parameters; each call picks
by its shape:

* a *decode step* (S <= ``DECODE_MAX_S`` queries): the Quest table (``decode_*`` arguments)
  when ``decode_topk`` or ``decode_density`` is set, else dense. One table per KV head
  (``decode_select="kv_head"``, LServe-style) or per query head (``"head"``, Quest's own).
  The bounds come from ``kmin``/``kmax`` [B, Hkv, >= n_blocks, D] when the call gets them (the
  bounds a ``QuestCache`` keeps, handed over by the lowering in passes/block_sparse.py), else
  they are recomputed from k;
* otherwise *prefill*: the estimated block table (``block``, ``topk``/``density``, ``sink``,
  ``window``, ``estimate``, ``last_q``) when ``topk`` or ``density`` is set, else dense.

Dense fallback: a selection runs only when the context has at least ``min_len`` keys (resp.
``decode_min_len``) and the table would skip something (the budget is below the causal block
count of the last query block); otherwise the call is the canonical dense attention (causal,
bottom-right, the padding vector) through ``longfx::sparse_attention`` with no window, which
runs dense SDPA. So short prompts, and decode without ``decode_topk``, are unchanged.

Lowering of a table: the Triton block-table kernel on CUDA
(``kernels/sparse_attention/triton.py:block_sparse_attention``), else the gather in gather.py.
The decode bounds: kept bounds with ``kv_head`` selection — one Triton scoring kernel +
``torch.topk`` on CUDA (triton.py ``kv_decode_table``), the table kernel reading each kept
block once per group; recomputed — one pass over the keys in Triton on CUDA (triton.py
``quest_scores``); else the reference.

``longfx::quest_bounds_append(kmin, kmax, keys, start, end, block)`` keeps the bounds: after a
cache wrote keys ``[start, end)`` it recomputes the blocks they touch, in place (Triton on
CUDA, ``reference.update_bounds`` elsewhere). It is how ``runtime/bounds_cache.py`` appends, so
the update is one node of the captured graph and the lowering finds the state there.
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
          "decode_min_len", "decode_select")
OFF = dict(block=64, topk=0, density=0.0, sink=0, window=0, estimate="pooled", last_q=64,
           min_len=0, decode_block=16, decode_topk=0, decode_density=0.0, decode_sink=0,
           decode_window=0, decode_min_len=0, decode_select="kv_head")

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


def update_bounds(keys, kmin, kmax, start: int, end: int, block: int) -> None:
    """Recompute the bounds of the blocks keys ``[start, end)`` touch, in place: Triton on
    CUDA when it takes the tensors, else the reference."""
    if keys.is_cuda:
        impl = _triton_impl("longfx.kernels.block_sparse.triton")
        if impl is not None and impl.supports_update(keys, kmin, kmax, block):
            return impl.update_bounds(keys, kmin, kmax, start, end, block)
    reference.update_bounds(keys, kmin, kmax, start, end, block)


def decode_table(q, k, skv, bs, topk, density, sink, window, select, kmin=None, kmax=None):
    """A decode step's table and whether it is ``table_full`` (every entry listed, any order).

    Kept bounds + ``kv_head`` on CUDA: ``triton.kv_decode_table`` (no sort, no -1). Otherwise
    ``reference.decode_table`` — with the bounds recomputed by the Triton pass over K on CUDA
    when no kept bounds are given."""
    if kmin is not None:
        if select == "kv_head" and q.is_cuda:
            impl = _triton_impl("longfx.kernels.block_sparse.triton")
            if impl is not None and impl.supports_bounds(q, kmin, kmax, bs):
                return impl.kv_decode_table(q, kmin, kmax, skv, bs, topk, density, sink,
                                            window), True
        return reference.decode_table(q, None, bs, topk, density, sink, window, select=select,
                                      bounds=(kmin, kmax), skv=skv), False
    return reference.decode_table(q, k, bs, topk, density, sink, window,
                                  scores=quest_scores(q, k, bs), select=select), False


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


def attend_table(q, k, v, table, bs, scale, softcap, key_keep, table_full: bool = False):
    """Run a table (per query head [B, H, ...] or per KV head [B, Hkv, ...]): the Triton kernel
    on CUDA when it takes the inputs, else the gather (a KV-head table expanded to the heads).
    ``table_full``: no -1 entries, any order (the kernel takes it unsorted)."""
    if q.is_cuda:
        impl = _triton_impl()
        if impl is not None and impl.supports(q, k, v, key_keep, softcap):
            return impl.block_sparse_attention(q, k, v, table, bs, scale, key_keep=key_keep,
                                               softcap=softcap, table_full=table_full)
    return gather.attend(q, k, v, reference.expand_table(table, q.shape[1]), bs, scale,
                         softcap, key_keep)


def forward(q, k, v, key_keep, scale, softcap, *, block, topk, density, sink, window, estimate,
            last_q, min_len, decode_block, decode_topk, decode_density, decode_sink,
            decode_window, decode_min_len, decode_select="kv_head", kmin=None, kmax=None,
            dense_fallback: bool = True) -> torch.Tensor:
    """The op's body (tests call it with ``dense_fallback=False`` to force the table path).
    ``kmin``/``kmax``: the bounds kept with the cache (decode steps read them instead of
    recomputing them from k; their first ceil(Skv / decode_block) blocks are these keys')."""
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
            if kmin is not None and bs != decode_block:
                kmin = kmax = None                  # kept per decode_block: recompute instead
            table, full = decode_table(q, k, skv, bs, decode_topk, decode_density, decode_sink,
                                       decode_window, decode_select, kmin, kmax)
            _count("decode", table, s, skv, bs)
            return attend_table(q, k, v, table, bs, scale, softcap, key_keep, full)
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
                           decode_window: int, decode_min_len: int, decode_select: str,
                           kmin: torch.Tensor | None = None,
                           kmax: torch.Tensor | None = None) -> torch.Tensor:
    check_args(q, k, v, key_keep, block, decode_block, estimate, decode_select, kmin, kmax)
    return forward(q, k, v, key_keep, scale, softcap, block=block, topk=topk, density=density,
                   sink=sink, window=window, estimate=estimate, last_q=last_q, min_len=min_len,
                   decode_block=decode_block, decode_topk=decode_topk,
                   decode_density=decode_density, decode_sink=decode_sink,
                   decode_window=decode_window, decode_min_len=decode_min_len,
                   decode_select=decode_select, kmin=kmin, kmax=kmax)


@block_sparse_attention.register_fake
def _(q, k, v, key_keep, scale, softcap, *params, kmin=None, kmax=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


@torch.library.custom_op("longfx::quest_bounds_append", mutates_args=("kmin", "kmax"))
def quest_bounds_append(kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, start: int,
                        end: int, block: int) -> None:
    """Quest's page metadata on append: keys ``[start, end)`` were written into ``keys``
    [B, Hkv, capacity, D]; recompute the channel min/max ``kmin``/``kmax`` [B, Hkv,
    capacity / block, D] of the blocks they touch (module docstring)."""
    reference.check_block(block)
    if not 0 <= start <= end <= keys.shape[2] or -(-end // block) > kmin.shape[2]:
        raise ValueError(f"quest_bounds_append: keys [{start}, {end}) do not fit keys "
                         f"{tuple(keys.shape)} / bounds {tuple(kmin.shape)} at block {block}")
    update_bounds(keys, kmin, kmax, start, end, block)


@quest_bounds_append.register_fake
def _(kmin, kmax, keys, start, end, block):
    return None


def check_args(q, k, v, key_keep, block, decode_block, estimate, decode_select="kv_head",
               kmin=None, kmax=None) -> None:
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
    if decode_select not in reference.SELECTS:
        raise ValueError(f"decode_select must be one of {reference.SELECTS}, "
                         f"got {decode_select!r}")
    if (kmin is None) != (kmax is None):
        raise ValueError("give both kmin and kmax, or neither")
    if kmin is not None:
        want = (k.shape[0], k.shape[1], -(-k.shape[2] // decode_block), k.shape[3])
        if kmin.dim() != 4 or kmin.shape != kmax.shape or kmin.shape[:2] != want[:2] \
                or kmin.shape[3] != want[3] or kmin.shape[2] < want[2]:
            raise ValueError(f"kmin/kmax must be [B, Hkv, >= ceil(Skv / decode_block), D] = "
                             f"{list(want)}, got {tuple(kmin.shape)} / {tuple(kmax.shape)}")


OP = torch.ops.longfx.block_sparse_attention.default
BOUNDS_APPEND = torch.ops.longfx.quest_bounds_append.default
