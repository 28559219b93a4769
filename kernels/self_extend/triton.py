"""Triton fused SelfExtend attention for ``longfx::self_extend_attention`` (CUDA; the
interpreter runs it with TRITON_INTERPRET=1). Semantics: reference.py; this must agree with it.

SelfExtend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without
Tuning") scores a key at its true distance inside the neighbour ``window`` and at a grouped
distance beyond it; the paper's code runs two full attentions and merges them. Here it is one
flash-attention pass (the FlashAttention-2 online softmax, Dao 2023), built from the pieces of
the block-sparse kernel (kernels/sparse_attention/triton.py: tile rows, GQA packing, split-KV,
the combine kernel, the fused rotary re-rotation, imported from there):

* One program per (query tile, batch · head group, split). The query tile is loaded once as
  is (neighbour scores) and once re-rotated *per row* to its grouped position: row i sits at
  ``p_i = Skv − S + i`` (bottom-right aligned) and is rotated back by ``p_i − (p_i // g + w −
  w // g)`` positions (the rows of a tile have different p, so different angles).
* Each KV tile [n0, n0 + BLOCK_N) is loaded once. Keys with ``p − j < window`` for every row
  ("near" tiles) get only the neighbour dot ``q·k``; keys with ``p − j >= window`` for every
  row ("far" tiles) only the grouped dot ``q_g·k_g``, with k rotated back by ``j − j // g``
  positions in registers; the few tiles that straddle the window edge compute both and select
  per (i, j). Causal masking only on the tiles that cross the diagonal.
* Prefill (the default ``rotation="precomputed"``): the grouped keys k_g are built once per
  call (``_grouped_keys``: one elementwise pass and one extra copy of k), and far tiles load
  them like k — the kernel then costs about one dense pass over the kept pairs plus the
  straddling tiles' second dot. Rotating k in the kernel instead (below) redoes it for every
  query tile: O(S²·D / BLOCK_M) transcendentals and fp32 temporaries that force small tiles
  (H100, 2026-11-23: 8.4× dense SDPA's time at 16k and 32k).
* Decode, and ``rotation="table"``/``"direct"``: the rotations run in the kernel in fp32 with
  cos/sin computed from ``inv_freq`` (pairs
  (i, i + R/2) for "rotate_half", (2i, 2i + 1) for "interleaved"/"complex"), then cast to the
  dot dtype. For the keys, when g divides BLOCK_N the per-key angle splits as
  ``(n0 − n0 // g) + (t − t // g)`` (t the key's offset in its tile): the second part's
  cos/sin table [BLOCK_N, BD] is computed once per program and each tile adds its own base
  angle (one cos/sin per channel) by the angle-addition formulas; otherwise (g not dividing
  BLOCK_N, or ``rotation="direct"``) cos/sin per key and channel.
* Lengths, group and window are runtime ints (no recompilation per length); GQA reads kv head
  ``h // (H / Hkv)`` through strides; decode (S ≤ DECODE_MAX_S) packs the query heads of a kv
  head as tile rows and splits the KV range over programs (Flash-Decoding), merged by the
  sparse kernel's ``_combine_kernel``. Optional key padding ``key_keep`` and softcap (Gemma 2,
  applied to the merged score, as reference.py does). Head dims up to 256 (any value: padded).

When the context fits in the window (Skv ≤ window) with no padding or softcap, every distance
is the true one and dense ``F.scaled_dot_product_attention`` runs (exact), as in blocked.py.
"""
from __future__ import annotations

import torch

from longfx.kernels.attention import dense
from longfx.kernels.self_extend import reference
from longfx.kernels.sparse_attention import triton as sparse
from longfx.kernels.sparse_attention.triton import (DECODE_MAX_S, INTERPRET, LOG2E, MAX_ROWS,
                                                    _combine, _dot_mode, _keep_arg,
                                                    _largest_divisor_at_most, _num_splits,
                                                    _pow2, _split_buffers, triton)

AVAILABLE = sparse.AVAILABLE
# key rotation for the grouped scores: "precomputed" (prefill default: the grouped keys are
# built once per call by ``_grouped_keys``, the kernel loads them like k), or in the kernel per
# query tile: "table" (angle addition, g | BLOCK_N; the decode default) or "direct" (per key)
MODES = ("precomputed", "table", "direct")

if triton is not None:
    import triton.language as tl

    from longfx.kernels.sparse_attention.triton import (_log2_scores, _online_softmax,
                                                        _rope_freq, _rotate_rows, _split_range,
                                                        _tile_rows, _write_rows)

    @triton.jit
    def _se_tile(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF, n0, pos, Skv, group, window,
                 qk_scale, sm_scale, softcap, sk_s, skg_s, sv_s, cos_t, sin_t,
                 MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 R_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, TABLE: tl.constexpr,
                 PRE_G: tl.constexpr, HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr,
                 PREC: tl.constexpr):
        """One KV tile [n0, n0 + BLOCK_N) of the online softmax.

        MODE 0: near, below the diagonal for every row (no position mask); 1: near, causal;
        2: far for every row (no position mask: far keys are below the diagonal); 3: straddles
        the window edge (both dots, select per (i, j), causal).
        """
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        j = n0 + offs_n                                                    # [N] key index
        jok = j < Skv
        k_rows = Kb + j * sk_s                                             # [N] row pointers
        dmask = jok[:, None] & (offs_d < D)[None, :]
        if MODE != 2 or not PRE_G:
            k = tl.load(k_rows[:, None] + offs_d[None, :], mask=dmask, other=0.0)  # [N, BD]
        if MODE != 2:                                                      # neighbour scores
            near = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC)  # [M, N] fp32
        if MODE >= 2 and PRE_G:      # grouped keys computed once per call (``_grouped_keys``)
            k_g = tl.load(KGb + j[:, None] * skg_s + offs_d[None, :], mask=dmask, other=0.0)
            far = tl.dot(q_g, tl.trans(k_g.to(q.dtype)), input_precision=PREC)  # [M, N] fp32
        elif MODE >= 2:    # grouped scores: k rotated back by j − j // g (to position j // g)
            freq = _rope_freq(INVF, offs_d, R_HALF, INTERLEAVED)           # [BD]
            if TABLE:      # (n0 − n0 // g) + (t − t // g): per-tile base, per-program table
                base = -(n0 - n0 // group).to(tl.float32) * freq           # [BD]
                cb = tl.cos(base)[None, :]
                sb = tl.sin(base)[None, :]
                cos = cos_t * cb - sin_t * sb                              # [N, BD]
                sin = sin_t * cb + cos_t * sb
            else:
                angle = -(j - j // group).to(tl.float32)[:, None] * freq[None, :]  # [N, BD]
                cos = tl.cos(angle)
                sin = tl.sin(angle)
            k_g = _rotate_rows(k, k_rows, jok, cos, sin, offs_d, R_HALF, INTERLEAVED)
            k_g = k_g.to(Kb.dtype.element_ty).to(q.dtype)                 # fp32 -> dot dtype
            far = tl.dot(q_g, tl.trans(k_g), input_precision=PREC)         # [M, N] fp32
        if MODE == 3:
            dist = pos[:, None] - j[None, :]                               # [M, N] p − j
            scores = tl.where(dist < window, near, far)
        elif MODE == 2:
            scores = far
        else:
            scores = near
        s = _log2_scores(scores, qk_scale, sm_scale, softcap, SOFTCAP)
        if MODE == 1 or MODE == 3:
            vis = pos[:, None] >= j[None, :]
            if HAS_KEEP:
                kk = tl.load(KEEPb + j, mask=jok, other=0)
                vis = vis & (kk != 0)[None, :]
            s = tl.where(vis, s, float("-inf"))
        elif HAS_KEEP:
            kk = tl.load(KEEPb + j, mask=jok, other=0)
            s = tl.where((kk != 0)[None, :], s, float("-inf"))
        v = tl.load(Vb + j[:, None] * sv_s + offs_dv[None, :],
                    mask=jok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [N, BDV]
        return _online_softmax(acc, m_i, l_i, s, v.to(q.dtype), PREC)

    @triton.jit
    def _se_range(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF, blk_lo, blk_hi, pos, Skv,
                  group, window, qk_scale, sm_scale, softcap, sk_s, skg_s, sv_s, cos_t, sin_t,
                  MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  R_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, TABLE: tl.constexpr,
                  PRE_G: tl.constexpr, HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr,
                  PREC: tl.constexpr):
        for blk in range(blk_lo, blk_hi):
            acc, m_i, l_i = _se_tile(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF,
                                     blk * BLOCK_N, pos, Skv, group, window, qk_scale,
                                     sm_scale, softcap, sk_s, skg_s, sv_s, cos_t, sin_t, MODE,
                                     BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, R_HALF, INTERLEAVED,
                                     TABLE, PRE_G, HAS_KEEP, SOFTCAP, PREC)
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["S", "Skv", "group", "window", "NSPLIT"])
    def _self_extend_fwd(
            Q, K, KG, V, OUT, KEEP, INVF, ACC, LSE,
            S, Skv, H, G, group, window, qk_scale, sm_scale, softcap,
            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, skg_b, skg_h, skg_s, sv_b, sv_h, sv_s,
            so_b, so_h, so_s, skeep_b, NSPLIT,
            GP: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            D: tl.constexpr, DV: tl.constexpr, R_HALF: tl.constexpr,
            INTERLEAVED: tl.constexpr, TABLE: tl.constexpr, PRE_G: tl.constexpr,
            HAS_KEEP: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
            DOT_F32: tl.constexpr, PREC: tl.constexpr):
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
        KGb = KG + b64 * skg_b + kvh.to(tl.int64) * skg_h
        Vb = V + b64 * sv_b + kvh.to(tl.int64) * sv_h
        KEEPb = KEEP + b64 * skeep_b

        # KV tiles of this query tile (valid rows at positions P0..P1; keys j <= P1):
        # far for every row [0, fb), straddling [fb, nb0), near [nb0, nb1) of which
        # [nb0, ib1) lie below the diagonal of every row
        P0 = Skv - S + i0
        P1 = Skv - S + tl.minimum(i0 + Q_TILE, S) - 1
        fb = tl.maximum(P0 - window + 1, 0) // BLOCK_N
        nb1 = tl.cdiv(P1 + 1, BLOCK_N)
        nb0 = tl.cdiv(tl.maximum(P1 - window + 1, 0), BLOCK_N)
        ib1 = tl.minimum(tl.maximum((P0 + 1) // BLOCK_N, nb0), nb1)
        t0, t1 = _split_range(nb1, split, NSPLIT, SPLIT)      # this program's chunk of tiles

        # q at its grouped position: rotated back by p − (p // g + w − w // g), per row
        freq = _rope_freq(INVF, offs_d, R_HALF, INTERLEAVED)               # [BD]
        dq = (pos - (pos // group + window - window // group)).to(tl.float32)  # [M]
        angle = -dq[:, None] * freq[None, :]                               # [M, BD]
        q_g = _rotate_rows(q, q_row, row_ok, tl.cos(angle), tl.sin(angle), offs_d, R_HALF,
                           INTERLEAVED)
        q_g = q_g.to(Q.dtype.element_ty).to(q.dtype)                       # fp32 -> dot dtype
        if TABLE and not PRE_G:    # cos/sin of the in-tile part t − t // g of the keys' angles
            t = tl.arange(0, BLOCK_N)
            a_t = -(t - t // group).to(tl.float32)[:, None] * freq[None, :]  # [N, BD]
            cos_t = tl.cos(a_t)
            sin_t = tl.sin(a_t)
        else:
            cos_t = 0.0
            sin_t = 0.0

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        acc, m_i, l_i = _se_range(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF, t0,
                                  tl.minimum(t1, fb), pos, Skv, group, window, qk_scale,
                                  sm_scale, softcap, sk_s, skg_s, sv_s, cos_t, sin_t, 2, BLOCK_N,
                                  BLOCK_D, BLOCK_DV, D, DV, R_HALF, INTERLEAVED, TABLE, PRE_G,
                                  HAS_KEEP, SOFTCAP, PREC)
        acc, m_i, l_i = _se_range(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF,
                                  tl.maximum(t0, fb), tl.minimum(t1, nb0), pos, Skv, group,
                                  window, qk_scale, sm_scale, softcap, sk_s, skg_s, sv_s, cos_t,
                                  sin_t, 3, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, R_HALF,
                                  INTERLEAVED, TABLE, PRE_G, HAS_KEEP, SOFTCAP, PREC)
        acc, m_i, l_i = _se_range(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF,
                                  tl.maximum(t0, nb0), tl.minimum(t1, ib1), pos, Skv, group,
                                  window, qk_scale, sm_scale, softcap, sk_s, skg_s, sv_s, cos_t,
                                  sin_t, 0, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, R_HALF,
                                  INTERLEAVED, TABLE, PRE_G, HAS_KEEP, SOFTCAP, PREC)
        acc, m_i, l_i = _se_range(acc, m_i, l_i, q, q_g, Kb, KGb, Vb, KEEPb, INVF,
                                  tl.maximum(t0, ib1), t1, pos, Skv, group, window, qk_scale,
                                  sm_scale, softcap, sk_s, skg_s, sv_s, cos_t, sin_t, 1, BLOCK_N,
                                  BLOCK_D, BLOCK_DV, D, DV, R_HALF, INTERLEAVED, TABLE, PRE_G,
                                  HAS_KEEP, SOFTCAP, PREC)
        o_row = OUT + b64 * so_b + head.to(tl.int64) * so_h + qi.to(tl.int64) * so_s
        _write_rows(acc, m_i, l_i, OUT, ACC, LSE, o_row, row_ok, mb, grp, split, NSPLIT, r,
                    offs_dv, BLOCK_M, BLOCK_DV, DV, SPLIT)


# --------------------------------------------------------------------------------------------
# host side


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor | None,
             inv_freq: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernel takes these inputs (those of the sparse kernel: dtype, head
    dims, device, GQA; and rotary frequencies that fit the head dim)."""
    if not sparse.supports(q, k, v, key_keep):
        return False
    return inv_freq is not None and inv_freq.dim() == 1 and 0 < 2 * inv_freq.numel() <= q.shape[-1]


def _config(dtype: torch.dtype, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill tiles. Two query tiles (as is and
    grouped) and the key rotation's fp32 temporaries live in registers, so the tiles are
    smaller than the sparse kernel's: chosen from ptxas's spill report for sm_90 (compiled
    without a GPU: bf16 D=128 spills 84 bytes at 64 x 32 / 8 warps, 816 at 128 x 32, 1220 at
    128 x 64), not from timings — retune with the benchmark's ``sweep`` part."""
    if dtype == torch.float32:      # a reference dtype: FMA dots, small tiles
        return 16, 16, 4, 2
    if _pow2(d) >= 256:
        return 32, 32, 8, 2
    return 64, 32, 8, 2


def _config_precomputed(dtype: torch.dtype, d: int) -> tuple[int, int, int, int]:
    """Prefill tiles when the grouped keys come precomputed: no fp32 rotation temporaries, so
    the sparse kernel's tile. H100 sweep at 32k, bf16, D=128, g=8, w=4096 (2026-11-24,
    benchmarks/results/tuning/self_extend_sweep_h100.json): 128x64 / 8 warps / 3 stages
    23.1 ms; 128x32 26.8; 64x32 28.8; 64x64 / 4 warps 33.5."""
    if dtype == torch.float32 or _pow2(d) >= 256:
        return _config(dtype, d)
    return 128, 64, 8, 3


def _grouped_keys(k: torch.Tensor, group: int, inv_freq: torch.Tensor,
                  rope_style: str) -> torch.Tensor:
    """k [B, Hkv, Skv, D] rotated back by j − j // g (to its grouped position j // g), in fp32
    then k's dtype — what the kernel's in-tile rotation computes, once per call instead of
    once per (query tile, key tile). One extra copy of k for the call."""
    from longfx.kernels.sparse_attention.reference import rotate_back

    j = torch.arange(k.shape[2], device=k.device)
    return rotate_back(k.float(), j - j // group, inv_freq.to(k.device), rope_style).to(k.dtype)


def _decode_block_n(dtype: torch.dtype, d: int) -> int:
    """KV tile of decode programs (sm_90 spill report: D=128 at 32 keys and D=256 at 16 keys
    spill at most 16 bytes; 64 keys spill ~900)."""
    return 16 if dtype == torch.float32 or _pow2(d) >= 256 else 32


def _launch(q, k, v, key_keep, scale, softcap, group, window, inv_freq, rope_style,
            block_m=None, block_n=None, num_splits=None, num_warps=None, num_stages=None,
            rotation="precomputed"):
    B, H, S, D = q.shape
    Hkv, Skv, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    out = torch.empty(B, H, S, DV, device=q.device, dtype=v.dtype)
    if S == 0 or B * H == 0:
        return out
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("the kernel reads the head dim contiguously (stride(-1) == 1)")
    if rotation not in MODES:
        raise ValueError(f"rotation must be one of {MODES}, got {rotation!r}")

    decode = S <= DECODE_MAX_S
    # decode rotates in the kernel: each key is read once per step anyway
    pre_g = rotation == "precomputed" and not decode
    if rotation == "precomputed":
        rotation = "table"
    cfg_m, cfg_n, warps, stages = (_config_precomputed if pre_g else _config)(q.dtype, max(D, DV))
    if decode:                      # decode: the query heads of one kv head as the tile rows
        q_tile = _pow2(S)
        gp = _largest_divisor_at_most(G, MAX_ROWS // q_tile)
        bm = max(16, _pow2(gp * q_tile))
        bn = block_n or _decode_block_n(q.dtype, max(D, DV))
        warps, stages = 4, 3
    else:
        gp, bm, bn = 1, block_m or cfg_m, block_n or cfg_n
        q_tile = bm
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got {bm}, {bn}")
    block_d, block_dv = max(16, _pow2(D)), max(16, _pow2(DV))
    n_tiles = -(-S // q_tile)
    n_grp = B * (H // gp)
    num_splits = _num_splits(num_splits, n_tiles * n_grp, -(-Skv // bn), q.device)
    split = num_splits > 1

    dummy = q.new_empty(1)
    keep, skeep = _keep_arg(key_keep, dummy)
    invf = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    kg = _grouped_keys(k, group, invf, rope_style) if pre_g else k
    part, lse = _split_buffers(split, n_tiles * n_grp * num_splits * bm, block_dv, dummy)
    dot_f32, prec = _dot_mode(q.dtype)
    extra = {} if INTERPRET else dict(num_warps=num_warps or warps,
                                      num_stages=num_stages or stages)
    _self_extend_fwd[(n_tiles, n_grp, num_splits)](
        q, k, kg, v, out, keep, invf, part, lse,
        S, Skv, H, G, int(group), int(window), float(scale) * LOG2E, float(scale),
        float(softcap), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), kg.stride(0), kg.stride(1), kg.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), skeep, num_splits,
        GP=gp, Q_TILE=q_tile, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
        D=D, DV=DV, R_HALF=invf.numel(), INTERLEAVED=rope_style != "rotate_half",
        TABLE=rotation == "table" and bn % group == 0, PRE_G=pre_g,
        HAS_KEEP=key_keep is not None,
        SOFTCAP=bool(softcap), SPLIT=split, DOT_F32=dot_f32, PREC=prec, **extra)
    if split:
        _combine(part, lse, out, G, n_tiles * n_grp, num_splits, gp, q_tile, bm, block_dv)
    return out


def self_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_keep: torch.Tensor | None, scale: float | None, softcap: float,
                          group: int, window: int, inv_freq: torch.Tensor, rope_style: str,
                          *, block_m: int | None = None, block_n: int | None = None,
                          num_splits: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None, rotation: str = "precomputed",
                          dense_fallback: bool = True) -> torch.Tensor:
    """``reference.self_extend_attention`` on the GPU: q [B, H, S, D], k [B, Hkv, Skv, D],
    v [B, Hkv, Skv, Dv] -> [B, H, S, Dv] in v's dtype. ``block_m``/``block_n``/``num_splits``/
    ``num_warps``/``num_stages``/``rotation`` override the launch configuration (tests, tuning
    sweeps); ``dense_fallback=False`` always runs the kernel."""
    reference.check_args(q, k, v, key_keep, group, window, inv_freq, rope_style)
    if not AVAILABLE:
        raise RuntimeError("the self_extend Triton kernel needs triton and CUDA "
                           "(or TRITON_INTERPRET=1)")
    if not supports(q, k, v, key_keep, inv_freq):
        raise ValueError(f"the Triton self_extend attention does not take q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
                         f" (fp16/bf16/fp32, one dtype, head dim <= {sparse.MAX_HEAD_DIM}, GQA)")
    s, skv = q.shape[2], k.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if dense_fallback and skv <= window and key_keep is None and not softcap and s in (1, skv):
        return dense.sdpa(q, k, v, is_causal=s == skv and s > 1, scale=scale)
    return _launch(q, k, v, key_keep, scale, softcap, group, window, inv_freq, rope_style,
                   block_m=block_m, block_n=block_n, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, rotation=rotation)
