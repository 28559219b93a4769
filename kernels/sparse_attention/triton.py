"""Triton block-sparse flash attention for ``longfx::sparse_attention`` (CUDA; the interpreter
runs it with TRITON_INTERPRET=1). Semantics: reference.py; this must agree with it.

One kernel family, ``_sparse_attn_fwd``:

* Forward flash attention with the online softmax of FlashAttention-2 (Dao 2023,
  "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"): one
  program per (query tile, batch · head group, split); running row max ``m``, row sum ``l``
  and an fp32 accumulator, in the exp2 domain; fully masked rows give zeros.
* The mask *spec* is computed in the kernel from positions (bottom-right aligned, query i at
  ``p_i = Skv − S + i``): a tile whose rows sit at positions P0..P1 visits only the KV blocks
  that intersect the sinks ``[0, min(sink, P1 + 1))`` and the window ``[max(sink,
  P0 − window + 1), P1]``. No dense mask, no host-side block table, no Python loop over blocks:
  lengths, sink, window and cap are runtime ints (only block sizes, head dims and flags are
  constexpr), so a new length does not recompile. Blocks entirely inside every row's window
  and below the diagonal run without the position mask.
* GQA without repeats: query head h reads kv head ``h // (H / Hkv)`` through the kv strides.
  For decode (S ≤ ``DECODE_MAX_S``) the G query heads that share a kv head are packed as the
  rows of one tile (G · S rows), so each kv tile is read once for all of them.
* Split-KV (Flash-Decoding, Dao, Haziza, Massa & Sizov 2023): when there are fewer programs
  than the GPU has SMs (decode at 128k: B · Hkv programs), the kept blocks of each tile are
  cut into ``NSPLIT`` contiguous chunks processed by separate programs; each writes its
  normalised partial output and log-sum-exp, and ``_combine_kernel`` merges them.
* LM-Infinite's distance cap (Han et al. 2023), fused: for sink blocks the kernel scores with
  the query rotated back by ``δ_i = max(0, p_i − cap)`` positions, computed in registers once
  per program from ``inv_freq`` (pairs (i, i + R/2) for "rotate_half", (2i, 2i + 1) for
  "interleaved"/"complex"); window blocks use the query as loaded.
* Softcap (Gemma 2): ``tanh(s / c) · c`` on the scores, computed as ``2·sigmoid(2x) − 1``.
* Head dims up to 256, any value (64, 80, 96, 128, 256, ...): the D axis is padded to the next
  power of two with masks; v may have its own head dim Dv.
* An optional block table for dynamic block-sparse recipes (``block_sparse_attention``):
  ``block_index`` int32 [B, H, n_q_blocks, max_kv_blocks], -1 padded, built on the GPU by the
  caller; its blocks are visited instead of (window ≤ 0) or in addition to (window > 0) the
  spec's. The same kernel, flag ``TABLE``. A table may also be per KV head, [B, Hkv, ...]
  (flag ``TAB_KV``; Quest decode with one selection per KV head, LServe-style): then a decode
  tile packs the G query heads of the group as its rows, as without a table, and each listed
  block is read once for all of them. ``table_full``: every row lists ``max_kv_blocks``
  blocks (no -1), in any order (flag ``TAB_FULL``: no sort, no scan; every tile causal-masked).

Dense fallback (``sparse_attention``): when the spec keeps every causal key (no window, or a
window covering the context) with no padding and no softcap, dense
``F.scaled_dot_product_attention`` runs (is_causal for prefill, unmasked for one query); and
when the spec keeps at least ``DENSE_DENSITY`` of the causal pairs at ``Skv <=
DENSE_MAX_KV``, dense SDPA with the spec's boolean mask runs — a recipe must never be slower
than dense SDPA, and at high density on short contexts the cuDNN/flash kernels behind SDPA win
over this kernel's skipped blocks. Both constants are meant to be recalibrated from
``benchmarks/bench_sparse_attention.py``.
"""
from __future__ import annotations

import os

import torch

from longfx.kernels.attention import dense
from longfx.kernels.sparse_attention import reference

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no Triton here
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AVAILABLE = triton is not None and (torch.cuda.is_available() or INTERPRET)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DECODE_MAX_S = 16        # S <= this: decode tiles (G query heads packed as rows), split-KV
MAX_ROWS = 128           # rows of a packed decode tile (G·pow2(S))
DENSE_DENSITY = 0.9      # spec density (kept / causal pairs) at or above which dense SDPA runs...
DENSE_MAX_KV = 16384     # ...when Skv is at most this (short contexts; see the module docstring)
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 128
_NO_WINDOW = 1 << 30     # the window of "no window": p − j < 2^30 always holds
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    # ---- helpers shared with other flash kernels (kernels/self_extend/triton.py) ----------

    @triton.jit
    def _tile_rows(S, Skv, H, G, GP: tl.constexpr, Q_TILE: tl.constexpr,
                   BLOCK_M: tl.constexpr):
        """This program's (query tile mb, batch · head group grp, split) and its rows: row r is
        query head h0 + r // Q_TILE at query index qi = i0 + r % Q_TILE, position
        ``Skv − S + qi``. Returns (mb, grp, split, b (int64), h0, kv head, i0, r, head, qi,
        row_ok, pos)."""
        mb = tl.num_programs(0) - 1 - tl.program_id(0)   # last (busiest causal) tiles first
        grp = tl.program_id(1)                           # b · (H / GP) + head group
        split = tl.program_id(2)
        n_groups = H // GP
        b = grp // n_groups
        h0 = (grp % n_groups) * GP
        i0 = mb * Q_TILE
        r = tl.arange(0, BLOCK_M)
        head = h0 + r // Q_TILE
        qi = i0 + r % Q_TILE
        row_ok = (r // Q_TILE < GP) & (qi < S)
        pos = Skv - S + qi                                                 # [M] positions
        return mb, grp, split, b.to(tl.int64), h0, h0 // G, i0, r, head, qi, row_ok, pos

    @triton.jit
    def _split_range(total, split, NSPLIT, SPLIT: tl.constexpr):
        """[t0, t1): this program's contiguous chunk of the ``total`` kept KV tiles."""
        if SPLIT:
            chunk = tl.cdiv(total, NSPLIT)
            t0 = split * chunk
            t1 = tl.minimum(t0 + chunk, total)
        else:
            t0 = 0
            t1 = total
        return t0, t1

    @triton.jit
    def _rope_freq(INVF, offs_d, R_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """Rotary frequency of each channel [BD]; 0 past the 2·R_HALF rotated channels."""
        if INTERLEAVED:                          # pairs (2i, 2i + 1)
            fidx = offs_d // 2
        else:                                    # rotate_half: pairs (i, i + R/2)
            fidx = offs_d % R_HALF
        return tl.load(INVF + fidx, mask=offs_d < 2 * R_HALF, other=0.0)

    @triton.jit
    def _rotate_rows(x, rows, ok, cos, sin, offs_d, R_HALF: tl.constexpr,
                     INTERLEAVED: tl.constexpr):
        """Rows x [M, BD] (as loaded from the row pointers ``rows`` [M], valid where ``ok``)
        rotated by angles given as cos/sin [M, BD], in fp32: ``x·cos ∓ partner·sin`` with the
        partner channel of the pairing read again from memory. Channels past 2·R_HALF must have
        angle 0 (``_rope_freq`` gives them frequency 0): they come back unchanged."""
        rot = offs_d < 2 * R_HALF
        if INTERLEAVED:
            partner = offs_d ^ 1
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            partner = tl.where(offs_d < R_HALF, offs_d + R_HALF, offs_d - R_HALF)
            sign = tl.where(offs_d < R_HALF, -1.0, 1.0)
        xp = tl.load(rows[:, None] + partner[None, :], mask=ok[:, None] & rot[None, :],
                     other=0.0).to(tl.float32)
        return x.to(tl.float32) * cos + sign[None, :] * xp * sin

    @triton.jit
    def _log2_scores(scores, qk_scale, sm_scale, softcap, SOFTCAP: tl.constexpr):
        """Raw q·k [M, N] -> scaled scores in the log2 domain; softcap (Gemma 2)
        ``tanh(s / c) · c`` computed as ``2·sigmoid(2x) − 1``."""
        if SOFTCAP:
            x = scores * (sm_scale / softcap)
            s = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)
        else:
            s = scores * qk_scale
        return s

    @triton.jit
    def _online_softmax(acc, m_i, l_i, s, v, PREC: tl.constexpr):
        """Fold masked log2 scores s [M, N] and values v [N, BDV] (in the dot dtype) into the
        running accumulator, row max and row sum of FlashAttention-2."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # accumulate in the dot (the MMA's own accumulator; no separate [M, BDV] add)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _write_rows(acc, m_i, l_i, OUT, ACC, LSE, o_row, row_ok, mb, grp, split, NSPLIT, r,
                    offs_dv, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr,
                    SPLIT: tl.constexpr):
        """Normalise and store the rows (empty rows: 0) at the row pointers ``o_row``; split-KV:
        the partial [tile, grp, split, row, BDV] and its log2-sum-exp, for ``_combine_kernel``."""
        full = l_i > 0
        out = acc / tl.where(full, l_i, 1.0)[:, None]
        if SPLIT:
            base = ((mb * tl.num_programs(1) + grp) * NSPLIT + split).to(tl.int64) * BLOCK_M
            tl.store(ACC + (base + r)[:, None] * BLOCK_DV + offs_dv[None, :], out)
            tl.store(LSE + base + r,
                     tl.where(full, m_i + tl.log2(tl.where(full, l_i, 1.0)), float("-inf")))
        else:
            tl.store(o_row[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_dv < DV)[None, :])

    # ---- the sparse kernel ------------------------------------------------------------------

    @triton.jit
    def _attend_tile(acc, m_i, l_i, q, Kb, Vb, KEEPb, n0, pos, Skv, sink, window,
                     qk_scale, sm_scale, softcap, sk_s, sv_s,
                     MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
        """One KV tile [n0, n0 + BLOCK_N) of the online softmax (FlashAttention-2).

        MODE 0: interior (every key visible to every row: no position mask); 1: sinks
        (j < sink, causal); 2: window (j >= sink, causal, p − j < window); 3: table block
        (causal); 4: table block minus the spec (causal, j >= sink, p − j >= window).
        """
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        j = n0 + offs_n                                                    # [N] key index
        jok = j < Skv
        k = tl.load(Kb + j[:, None] * sk_s + offs_d[None, :],
                    mask=jok[:, None] & (offs_d < D)[None, :], other=0.0)  # [N, BD]
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC)  # [M, N] fp32
        s = _log2_scores(scores, qk_scale, sm_scale, softcap, SOFTCAP)
        if MODE == 0:
            if HAS_KEEP:
                kk = tl.load(KEEPb + j, mask=jok, other=0)
                s = tl.where((kk != 0)[None, :], s, float("-inf"))
        else:
            dist = pos[:, None] - j[None, :]                               # [M, N] p − j
            if MODE == 1:
                vis = (dist >= 0) & (j < sink)[None, :]
            elif MODE == 2:
                vis = (dist >= 0) & (dist < window) & (j >= sink)[None, :]
            elif MODE == 3:
                vis = dist >= 0
            else:
                vis = (dist >= 0) & (dist >= window) & (j >= sink)[None, :]
            if HAS_KEEP:
                kk = tl.load(KEEPb + j, mask=jok, other=0)
                vis = vis & (kk != 0)[None, :]
            s = tl.where(vis, s, float("-inf"))
        v = tl.load(Vb + j[:, None] * sv_s + offs_dv[None, :],
                    mask=jok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [N, BDV]
        return _online_softmax(acc, m_i, l_i, s, v.to(q.dtype), PREC)

    @triton.jit
    def _attend_range(acc, m_i, l_i, q, Kb, Vb, KEEPb, blk_lo, blk_hi, pos, Skv, sink, window,
                      qk_scale, sm_scale, softcap, sk_s, sv_s,
                      MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                      HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
        for blk in range(blk_lo, blk_hi):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, Kb, Vb, KEEPb, blk * BLOCK_N, pos,
                                         Skv, sink, window, qk_scale, sm_scale, softcap,
                                         sk_s, sv_s, MODE, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV,
                                         HAS_KEEP, SOFTCAP, PREC)
        return acc, m_i, l_i

    @triton.jit
    def _attend_listed(acc, m_i, l_i, q, Kb, Vb, KEEPb, trow, sub, TB, u_lo, u_hi, pos, Skv,
                       sink, window, qk_scale, sm_scale, softcap, sk_s, sv_s,
                       MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                       HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
        """Kernel tiles u in [u_lo, u_hi) of a table row: tile u is the (u % sub)-th BLOCK_N
        slice of listed block ``trow[u // sub]`` (every entry in range is listed: no branch
        in the loop, so the compiler can pipeline it)."""
        for u in range(u_lo, u_hi):
            kb = tl.load(trow + u // sub)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, Kb, Vb, KEEPb,
                                         kb * TB + (u % sub) * BLOCK_N, pos, Skv, sink, window,
                                         qk_scale, sm_scale, softcap, sk_s, sv_s, MODE, BLOCK_N,
                                         BLOCK_D, BLOCK_DV, D, DV, HAS_KEEP, SOFTCAP, PREC)
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["S", "Skv", "sink", "window", "cap", "n_tab", "TB", "NSPLIT"])
    def _sparse_attn_fwd(
            Q, K, V, OUT, KEEP, TAB, INVF, ACC, LSE,
            S, Skv, H, G, sink, window, cap, qk_scale, sm_scale, softcap,
            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, skeep_b,
            st_b, st_h, st_q, n_tab, TB, NSPLIT,
            GP: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            D: tl.constexpr, DV: tl.constexpr, R_HALF: tl.constexpr,
            INTERLEAVED: tl.constexpr, HAS_CAP: tl.constexpr, HAS_KEEP: tl.constexpr,
            SOFTCAP: tl.constexpr, SPEC: tl.constexpr, TABLE: tl.constexpr,
            TAB_KV: tl.constexpr, TAB_FULL: tl.constexpr,
            SPLIT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
        mb, grp, split, b64, h0, kvh, i0, r, head, qi, row_ok, pos = _tile_rows(
            S, Skv, H, G, GP, Q_TILE, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_row = Q + b64 * sq_b + head.to(tl.int64) * sq_h + qi.to(tl.int64) * sq_s   # [M] ptrs
        q = tl.load(q_row[:, None] + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)  # [M, BD]
        if DOT_F32:
            q = q.to(tl.float32)
        Kb = K + b64 * sk_b + kvh.to(tl.int64) * sk_h
        Vb = V + b64 * sv_b + kvh.to(tl.int64) * sv_h
        KEEPb = KEEP + b64 * skeep_b

        # positions of this tile's valid rows
        P0 = Skv - S + i0
        P1 = Skv - S + tl.minimum(i0 + Q_TILE, S) - 1

        # the spec's blocks: sinks [0, nsb), window [wb0, wb1), interior [ib0, ib1) ⊆ window
        if SPEC:
            sink_end = tl.minimum(sink, P1 + 1)
            nsb = tl.cdiv(sink_end, BLOCK_N)
            wstart = tl.maximum(tl.maximum(P0 - window + 1, sink), 0)
            wb0 = wstart // BLOCK_N
            wb1 = tl.cdiv(P1 + 1, BLOCK_N)
            nwb = tl.maximum(wb1 - wb0, 0)
            ib0 = tl.cdiv(tl.maximum(tl.maximum(P1 - window + 1, sink), 0), BLOCK_N)
            ib1 = (P0 + 1) // BLOCK_N
            ib0 = tl.minimum(tl.maximum(ib0, wb0), wb1)
            ib1 = tl.minimum(tl.maximum(ib1, ib0), wb1)
        else:
            nsb = 0
            wb0 = 0
            nwb = 0
            ib0 = 0
            ib1 = 0
        if TABLE:
            # the row is ascending, -1 padded at the end (``_sorted_table``): its nv listed
            # blocks are a prefix, and so are the nf of them that end at or before the tile's
            # first row (every row sees every key: no position mask for those)
            sub = TB // BLOCK_N                      # kernel tiles per table block
            if TAB_KV:                               # one row per kv head (GP heads share it)
                trow = TAB + b64 * st_b + kvh.to(tl.int64) * st_h + (i0 // TB) * st_q
            else:
                trow = TAB + b64 * st_b + h0.to(tl.int64) * st_h + (i0 // TB) * st_q
            if TAB_FULL:                             # n_tab entries, any order: all causal
                n_items = n_tab * sub
                n_full = 0
            else:
                nv = 0
                nf = 0
                for c0 in range(0, n_tab, 64):
                    e = tl.load(trow + c0 + tl.arange(0, 64),
                                mask=c0 + tl.arange(0, 64) < n_tab, other=-1)
                    nv += tl.sum((e >= 0).to(tl.int32))
                    nf += tl.sum(((e >= 0) & (e * TB + TB - 1 <= P0)).to(tl.int32))
                n_items = nv * sub
                n_full = nf * sub
        else:
            sub = 1
            n_items = 0
            n_full = 0
        t0, t1 = _split_range(nsb + nwb + n_items, split, NSPLIT, SPLIT)  # this chunk

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

        # sinks: with the cap, scored with q rotated back by δ = max(0, p − cap) positions
        if HAS_CAP:
            freq = _rope_freq(INVF, offs_d, R_HALF, INTERLEAVED)           # [BD]
            delta = tl.maximum(pos - cap, 0).to(tl.float32)                # [M]
            angle = -delta[:, None] * freq[None, :]                        # [M, BD]
            q_sink = _rotate_rows(q, q_row, row_ok, tl.cos(angle), tl.sin(angle), offs_d,
                                  R_HALF, INTERLEAVED).to(q.dtype)
        else:
            q_sink = q
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_sink, Kb, Vb, KEEPb, t0,
                                      tl.minimum(t1, nsb), pos, Skv, sink, window, qk_scale,
                                      sm_scale, softcap, sk_s, sv_s, 1, BLOCK_N, BLOCK_D,
                                      BLOCK_DV, D, DV, HAS_KEEP, SOFTCAP, PREC)
        # window blocks [rw0, rw1): masked below the interior, unmasked interior, masked above
        rw0 = wb0 + tl.maximum(t0 - nsb, 0)
        rw1 = wb0 + tl.minimum(t1 - nsb, nwb)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, Kb, Vb, KEEPb, rw0,
                                      tl.minimum(rw1, ib0), pos, Skv, sink, window, qk_scale,
                                      sm_scale, softcap, sk_s, sv_s, 2, BLOCK_N, BLOCK_D,
                                      BLOCK_DV, D, DV, HAS_KEEP, SOFTCAP, PREC)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, Kb, Vb, KEEPb, tl.maximum(rw0, ib0),
                                      tl.minimum(rw1, ib1), pos, Skv, sink, window, qk_scale,
                                      sm_scale, softcap, sk_s, sv_s, 0, BLOCK_N, BLOCK_D,
                                      BLOCK_DV, D, DV, HAS_KEEP, SOFTCAP, PREC)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, Kb, Vb, KEEPb, tl.maximum(rw0, ib1),
                                      rw1, pos, Skv, sink, window, qk_scale, sm_scale, softcap,
                                      sk_s, sv_s, 2, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV,
                                      HAS_KEEP, SOFTCAP, PREC)
        if TABLE:                                    # table blocks (GP > 1 only with TAB_KV)
            ua = tl.maximum(t0 - nsb - nwb, 0)
            ub = tl.minimum(t1 - nsb - nwb, n_items)
            if SPEC:                                 # minus the spec's keys: always masked
                acc, m_i, l_i = _attend_listed(acc, m_i, l_i, q, Kb, Vb, KEEPb, trow, sub, TB,
                                               ua, ub, pos, Skv, sink, window, qk_scale,
                                               sm_scale, softcap, sk_s, sv_s, 4, BLOCK_N,
                                               BLOCK_D, BLOCK_DV, D, DV, HAS_KEEP, SOFTCAP, PREC)
            else:                                    # below the tile: unmasked; then causal
                acc, m_i, l_i = _attend_listed(acc, m_i, l_i, q, Kb, Vb, KEEPb, trow, sub, TB,
                                               ua, tl.minimum(ub, n_full), pos, Skv, sink,
                                               window, qk_scale, sm_scale, softcap, sk_s, sv_s,
                                               0, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, HAS_KEEP,
                                               SOFTCAP, PREC)
                acc, m_i, l_i = _attend_listed(acc, m_i, l_i, q, Kb, Vb, KEEPb, trow, sub, TB,
                                               tl.maximum(ua, n_full), ub, pos, Skv, sink,
                                               window, qk_scale, sm_scale, softcap, sk_s, sv_s,
                                               3, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, HAS_KEEP,
                                               SOFTCAP, PREC)

        o_row = OUT + b64 * so_b + head.to(tl.int64) * so_h + qi.to(tl.int64) * so_s
        _write_rows(acc, m_i, l_i, OUT, ACC, LSE, o_row, row_ok, mb, grp, split, NSPLIT, r,
                    offs_dv, BLOCK_M, BLOCK_DV, DV, SPLIT)

    @triton.jit
    def _combine_kernel(ACC, LSE, OUT, S, H, G, so_b, so_h, so_s, NSPLIT,
                        GP: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr):
        """Merge the NSPLIT partial outputs of one row by their log-sum-exp (Flash-Decoding)."""
        tg = tl.program_id(0)                       # mb · (B · H / GP) + grp
        r = tl.program_id(1)
        n_grp = tl.num_programs(0) // tl.cdiv(S, Q_TILE)
        mb = tg // n_grp
        grp = tg % n_grp
        n_groups = H // GP
        b = grp // n_groups
        head = (grp % n_groups) * GP + r // Q_TILE
        qi = mb * Q_TILE + r % Q_TILE
        ok = (r // Q_TILE < GP) & (qi < S)
        sp = tl.arange(0, BLOCK_S)
        sok = sp < NSPLIT
        dv = tl.arange(0, BLOCK_DV)
        rows = (tg * NSPLIT + sp).to(tl.int64) * BLOCK_M + r                # [BS]
        lse = tl.load(LSE + rows, mask=sok, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))        # empty splits: 0
        part = tl.load(ACC + rows[:, None] * BLOCK_DV + dv[None, :], mask=sok[:, None], other=0.0)
        den = tl.sum(w, 0)
        out = tl.sum(w[:, None] * part, 0) / tl.where(den > 0, den, 1.0)
        ptr = OUT + b.to(tl.int64) * so_b + head.to(tl.int64) * so_h + qi.to(tl.int64) * so_s
        ok_v = (tl.zeros([BLOCK_DV], tl.int32) + ok.to(tl.int32)) != 0          # [BDV] row valid
        tl.store(ptr + dv, out.to(OUT.dtype.element_ty), mask=ok_v & (dv < DV))


# --------------------------------------------------------------------------------------------
# host side


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor | None,
             softcap: float = 0.0, cap: int = 0) -> bool:
    """Whether the Triton kernel takes these inputs (dtype, head dims, device)."""
    if not AVAILABLE or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if not (q.is_cuda or INTERPRET):
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] != k.shape[-1] or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False
    if q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        return False
    if key_keep is not None and tuple(key_keep.shape) != (k.shape[0], k.shape[2]):
        return False
    if k.shape[2] * max(k.stride(2), v.stride(2), 1) >= 2 ** 31:
        return False                    # key offsets inside one (batch, kv head) are int32
    return len({t.device for t in (q, k, v) + (() if key_keep is None else (key_keep,))}) == 1


def _require(q, k, v, key_keep):
    if not AVAILABLE:
        raise RuntimeError("the sparse attention Triton kernel needs triton and CUDA "
                           "(or TRITON_INTERPRET=1)")
    if not supports(q, k, v, key_keep):
        raise ValueError(f"the Triton sparse attention does not take q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
                         f" (fp16/bf16/fp32, one dtype, head dim <= {MAX_HEAD_DIM}, GQA)")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _config(dtype: torch.dtype, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill tiles (H100-minded defaults)."""
    if dtype == torch.float32:      # a reference dtype: FMA dots, small tiles (no spills)
        return 32, 16, 4, 2
    if _pow2(d) >= 256:
        return 64, 64, 8, 2
    return 128, 64, 8, 3


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(x for x in range(1, min(n, max(1, limit)) + 1) if n % x == 0)


def _num_splits(num_splits: int | None, programs: int, kept: int, device) -> int:
    """Split-KV count: ``num_splits`` if given, else enough splits to give every SM two
    programs when the grid alone would leave SMs idle (at least MIN_BLOCKS_PER_SPLIT kept
    tiles per split)."""
    if num_splits is None:
        sms = _sm_count(device)
        num_splits = 1
        if programs < sms:
            num_splits = min(-(-2 * sms // programs), max(1, kept // MIN_BLOCKS_PER_SPLIT),
                             MAX_SPLITS)
    return max(1, int(num_splits))


def _keep_arg(key_keep: torch.Tensor | None, dummy: torch.Tensor):
    """(uint8 key mask [B, Skv] with unit key stride, its batch stride); ``dummy`` if none."""
    if key_keep is None:
        return dummy, 0
    if key_keep.dtype == torch.bool:
        keep = key_keep.view(torch.uint8)                     # same bytes, no copy
    elif key_keep.dtype == torch.uint8:
        keep = key_keep
    else:
        keep = (key_keep != 0).to(torch.uint8)
    if keep.stride(-1) != 1:
        keep = keep.contiguous()
    return keep, keep.stride(0)


def _split_buffers(split: bool, rows: int, block_dv: int, dummy: torch.Tensor):
    """Split-KV partial outputs [rows, BDV] and log2-sum-exps [rows], fp32 (rows = tiles · grp ·
    NSPLIT · BLOCK_M, the layout of ``_write_rows``/``_combine_kernel``)."""
    if not split:
        return dummy, dummy
    return (torch.empty(rows * block_dv, device=dummy.device, dtype=torch.float32),
            torch.empty(rows, device=dummy.device, dtype=torch.float32))


def _dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(dot in fp32, input_precision). The interpreter's bf16 tl.dot returns garbage (triton
    3.9): dot in fp32 there."""
    dot_f32 = INTERPRET and dtype == torch.bfloat16
    return dot_f32, "ieee" if dtype == torch.float32 or dot_f32 else "tf32"


def _combine(part, lse, out, G, programs, num_splits, gp, q_tile, bm, block_dv) -> None:
    """Merge the split-KV partials (``_write_rows`` layout) into out [B, H, S, Dv]."""
    _combine_kernel[(programs, bm)](
        part, lse, out, out.shape[2], out.shape[1], G, out.stride(0), out.stride(1),
        out.stride(2), num_splits, GP=gp, Q_TILE=q_tile, BLOCK_M=bm,
        BLOCK_S=max(2, _pow2(num_splits)), BLOCK_DV=block_dv, DV=out.shape[-1])


def _launch(q, k, v, key_keep, scale, softcap, sink, window, cap, inv_freq, rope_style,
            block_index=None, table_block=0, spec=True, block_m=None, block_n=None,
            num_splits=None, num_warps=None, num_stages=None, table_full=False):
    """Run the kernel. ``window <= 0`` means no window (sink ignored); ``spec=False`` visits
    only the table's blocks; ``table_full``: the table has no -1 entries and may be in any
    order (used as it is)."""
    B, H, S, D = q.shape
    Hkv, Skv, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    out = torch.empty(B, H, S, DV, device=q.device, dtype=v.dtype)
    if S == 0 or B * H == 0:
        return out
    if window <= 0 or window >= _NO_WINDOW:
        sink, window, cap = 0, _NO_WINDOW, 0
    has_cap = bool(cap > 0 and sink > 0 and Skv - 1 > cap)
    table = block_index is not None
    tab_kv = table and block_index.shape[1] == Hkv and Hkv != H     # one row per kv head
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("the kernel reads the head dim contiguously (stride(-1) == 1)")

    cfg_m, cfg_n, warps, stages = _config(q.dtype, max(D, DV))
    decode = S <= DECODE_MAX_S
    if decode:
        q_tile = _pow2(S)
        gp = 1 if table and not tab_kv else _largest_divisor_at_most(G, MAX_ROWS // q_tile)
        bm = max(16, _pow2(gp * q_tile))
        bn = block_n or cfg_n
        warps, stages = 4, 3
    else:
        gp, bm, bn = 1, block_m or cfg_m, block_n or cfg_n
        q_tile = bm
    if table:
        if table_block < 16 or table_block & (table_block - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {table_block}")
        if not decode:
            bm = q_tile = min(bm, table_block)
            if (block_m, block_n, num_warps, num_stages) == (None,) * 4 and cfg_m == 128:
                # H100 sweep (2026-11-24, 128k, density 0.1, benchmarks/results/
                # block_sparse_h100.json): 128-blocks run 128x128 tiles, 8 warps, 2 stages
                # (3 stages crash ptxas in Triton 3.6); 64-wide tiles want 4 warps
                bn, warps, stages = (128, 8, 2) if bm >= 128 else (64, 4, 3)
        bn = min(bn, table_block)
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got {bm}, {bn}")
    block_d, block_dv = max(16, _pow2(D)), max(16, _pow2(DV))
    n_tiles = -(-S // q_tile)
    n_grp = B * (H // gp)

    # split-KV when the grid alone would leave SMs idle
    if table:
        n_tab = block_index.shape[-1]
        kept = n_tab * (table_block // bn) + (
            (-(-min(sink, Skv) // bn) + -(-min(window + q_tile, Skv) // bn) + 1) if spec else 0)
    else:
        n_tab = 0
        kept = -(-min(sink, Skv) // bn) + -(-min(window + q_tile, Skv) // bn) + 1
    num_splits = _num_splits(num_splits, n_tiles * n_grp, kept, q.device)
    split = num_splits > 1

    dummy = q.new_empty(1)
    keep, skeep = _keep_arg(key_keep, dummy)
    invf = dummy
    r_half = 1
    interleaved = False
    if has_cap:
        invf = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
        r_half = invf.numel()
        if not 0 < 2 * r_half <= D:
            raise ValueError(f"inv_freq has {r_half} frequencies: 2·{r_half} rotated channels "
                             f"do not fit head dim {D}")
        interleaved = rope_style != "rotate_half"
    tab, st = dummy, (0, 0, 0)
    if table:
        nqb = -(-S // table_block)
        if tuple(block_index.shape[:3]) not in ((B, H, nqb), (B, Hkv, nqb)):
            raise ValueError(f"block_index must be [B, H or Hkv, ceil(S / block_size), "
                             f"max_kv_blocks] = [{B}, {H} or {Hkv}, {nqb}, n], got "
                             f"{tuple(block_index.shape)}")
        if table_full:
            if block_index.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"block_index must be int32 or int64, got {block_index.dtype}")
            tab = block_index if block_index.stride(-1) == 1 else block_index.contiguous()
        else:
            tab = _sorted_table(block_index)
        st = (tab.stride(0), tab.stride(1), tab.stride(2))
    part, lse = _split_buffers(split, n_tiles * n_grp * num_splits * bm, block_dv, dummy)
    dot_f32, prec = _dot_mode(q.dtype)
    extra = {} if INTERPRET else dict(num_warps=num_warps or warps,
                                      num_stages=num_stages or stages)
    _sparse_attn_fwd[(n_tiles, n_grp, num_splits)](
        q, k, v, out, keep, tab, invf, part, lse,
        S, Skv, H, G, int(sink), int(window), int(cap), float(scale) * LOG2E, float(scale),
        float(softcap), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        out.stride(2), skeep, *st, n_tab, int(table_block), num_splits,
        GP=gp, Q_TILE=q_tile, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
        D=D, DV=DV, R_HALF=r_half, INTERLEAVED=interleaved, HAS_CAP=has_cap,
        HAS_KEEP=key_keep is not None, SOFTCAP=bool(softcap), SPEC=bool(spec), TABLE=table,
        TAB_KV=tab_kv, TAB_FULL=bool(table and table_full), SPLIT=split, DOT_F32=dot_f32,
        PREC=prec, **extra)
    if split:
        _combine(part, lse, out, G, n_tiles * n_grp, num_splits, gp, q_tile, bm, block_dv)
    return out


def _sorted_table(block_index: torch.Tensor) -> torch.Tensor:
    """The table as the kernel reads it: int32, each row ascending with its -1s at the end
    (three small device ops, no sync; the kernel then finds a row's listed blocks and those
    below the query tile as prefixes, see ``_attend_listed``). Tables that keep_to_table
    builds are already in this order."""
    tab = block_index.to(torch.int32)
    big = torch.iinfo(torch.int32).max
    tab = torch.sort(torch.where(tab < 0, big, tab), dim=-1).values
    return torch.where(tab == big, -1, tab).contiguous()


def prefer_dense(s: int, skv: int, sink: int, window: int, key_keep, softcap: float,
                 cap: int) -> bool:
    """Whether dense SDPA with the spec's mask should run instead of the kernel: density >=
    DENSE_DENSITY at Skv <= DENSE_MAX_KV (no softcap, no active cap: SDPA cannot do those)."""
    if softcap or skv > DENSE_MAX_KV or window <= 0 or s == 0:
        return False
    if cap > 0 and sink > 0 and skv - 1 > cap:
        return False
    return reference.density(s, skv, sink, window) >= DENSE_DENSITY


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_keep: torch.Tensor | None, scale: float | None, softcap: float,
                     sink: int, window: int, cap: int, inv_freq: torch.Tensor | None,
                     rope_style: str, *, block_m: int | None = None, block_n: int | None = None,
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, dense_fallback: bool = True) -> torch.Tensor:
    """``reference.sparse_attention`` on the GPU: q [B, H, S, D], k [B, Hkv, Skv, D],
    v [B, Hkv, Skv, Dv] -> [B, H, S, Dv] in v's dtype. ``block_m``/``block_n``/``num_splits``/
    ``num_warps``/``num_stages`` override the launch configuration (tests, tuning sweeps);
    ``dense_fallback=False`` always runs the kernel."""
    _require(q, k, v, key_keep)
    reference.check_args(q, k, v, key_keep, sink, window, cap, inv_freq, rope_style)
    s, skv, d = q.shape[2], k.shape[2], q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    covers = window <= 0 or window >= skv
    if dense_fallback and covers and key_keep is None and not softcap:
        if s == skv:
            return dense.sdpa(q, k, v, is_causal=True, scale=scale)
        if s == 1:
            return dense.sdpa(q, k, v, scale=scale)
    if dense_fallback and not covers and prefer_dense(s, skv, sink, window, key_keep, softcap,
                                                      cap):
        qp, kp = reference.positions(s, skv, q.device)
        keep = reference.visible(qp, kp, sink, window)[None, None]          # [1, 1, S, Skv]
        if key_keep is not None:
            keep = keep & key_keep.bool()[:, None, None, :]                 # [B, 1, S, Skv]
        out = dense.sdpa(q, k, v, attn_mask=keep, scale=scale)
        return out.nan_to_num(0.0)
    if covers:
        sink, window, cap = 0, 0, 0
    return _launch(q, k, v, key_keep, scale, softcap, sink, window, cap, inv_freq, rope_style,
                   block_m=block_m, block_n=block_n, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_index: torch.Tensor, block_size: int,
                           scale: float | None = None, *, key_keep: torch.Tensor | None = None,
                           softcap: float = 0.0, sink: int = 0, window: int = 0, cap: int = 0,
                           inv_freq: torch.Tensor | None = None, rope_style: str = "rotate_half",
                           block_m: int | None = None, block_n: int | None = None,
                           num_splits: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None,
                           table_full: bool = False) -> torch.Tensor:
    """Causal attention over the KV blocks a table lists (dynamic block-sparse recipes).

    ``block_index`` int32 [B, H, ceil(S / block_size), max_kv_blocks]: for query block
    ``qb`` (query *indices* ``[qb·bs, (qb+1)·bs)``, bottom-right aligned positions as
    everywhere), the kv block ids ``kb`` (keys ``[kb·bs, (kb+1)·bs)``) to visit, -1 padded, each
    id at most once per row, any order. Build it on the GPU. ``block_size`` is a power of two
    >= 16. A table of [B, Hkv, ...] rows is per KV head (query head h reads row h // (H/Hkv));
    at decode the group's query heads then share one program and each block is read once.
    ``table_full=True``: no -1 entries (the rows are used unsorted). Visible keys::

        j <= p_i  and  key_keep[b, j]  and  (block(j) in table[b, h, i // bs]
                                             or (window > 0 and spec(i, j)))

    i.e. with ``window <= 0`` the table replaces the spec; with ``window > 0`` its blocks are
    added to the sink + window spec (sinks still capped with ``cap``). Returns [B, H, S, Dv].
    """
    _require(q, k, v, key_keep)
    if block_index.dim() != 4:
        raise ValueError(f"block_index must be 4-d [B, H, n_q_blocks, max_kv_blocks], got "
                         f"{tuple(block_index.shape)}")
    if window > 0:
        reference.check_args(q, k, v, key_keep, sink, window, cap, inv_freq, rope_style)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    spec = window > 0
    return _launch(q, k, v, key_keep, scale, softcap, sink if spec else 0,
                   window if spec else 0, cap if spec else 0, inv_freq, rope_style,
                   block_index=block_index, table_block=block_size, spec=spec,
                   block_m=block_m, block_n=block_n, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, table_full=table_full)
