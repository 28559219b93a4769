"""Quest's block bounds on the GPU (CUDA; the interpreter runs them with TRITON_INTERPRET=1).
Semantics: ``reference.quest_scores`` / ``update_bounds`` / ``decode_table``; these must agree.

Quest (Tang et al. 2024, arXiv:2406.10774, §3.2) ranks the key blocks of a decode step by the
upper bound ``Σ_d max(q_d·min_d, q_d·max_d)`` of any ``q · k`` in the block, min and max taken
per channel over the block's keys. Three kernels:

* ``quest_scores`` — the bounds recomputed from all of K (the path when the cache keeps none:
  a ``decode_topk`` combined with another KV-cache recipe, or a cache passed in by the caller).
  The reference computes it in plain torch: an fp32 copy of the whole key cache, a padded copy,
  two reductions and two matmuls — at 128k keys, 8 kv heads and head_dim 128 it took 0.99 ms,
  5.5× dense attention over the same cache (0.18 ms; H100, bf16, CUDA-graph replays,
  2026-11-24, benchmarks/results/block_sparse_h100.json), and this kernel 0.092 ms with one
  warp a program (0.18 ms with 2 warps, 0.62 ms with 4). Each program reads its tile of keys
  once, in their own dtype, takes the per-channel min and max of each block in registers, one
  block after the other, and scores all the G·S query rows of its kv head against them
  (``q·(min+max)/2 + |q|·(max−min)/2``, the reference's form). The only output is the
  ``[B, Hkv, G·S, n_blocks]`` fp32 score table. This still reads every key once a step.
* ``update_bounds`` — Quest's page metadata kept with the cache (``runtime/bounds_cache.py``):
  after an append of keys ``[start, end)`` one program per (batch · kv head, touched block)
  recomputes that block's channel min/max from the stored keys (the last partial block and
  the new ones; a decode step touches one block per kv head).
* ``kv_decode_table`` — the decode table from the kept bounds, one selection per KV head
  (LServe, Yang et al. 2025, arXiv:2502.14866: the query heads of a group share the selected
  pages, so the attention reads each kept block once for the group): one kernel scores every
  block against the group's G·S query rows — ``q⁺·max + q⁻·min`` (q⁺ = max(q, 0), q⁻ =
  min(q, 0): the same bound, as two tensor-core dots over operands that are exact in the
  model's dtype) — takes the max over the rows and marks the forced blocks (sinks, window) +inf;
  then ``torch.topk`` of the budget (a host int: no -1 entries, no sort). The bounds read are
  2·D numbers per block of ``block`` keys: 1/8 of K at 16-token blocks.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no Triton here
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AVAILABLE = triton is not None and (torch.cuda.is_available() or INTERPRET)
MAX_ROWS = 128          # G·S query rows one program scores
MAX_HEAD_DIM = 256
MAX_BLOCK = 64          # key block sizes up to this (16 .. 64, powers of two)
NB = 4                  # key blocks one program scores, one after the other


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def supports(q: torch.Tensor, k: torch.Tensor, block: int) -> bool:
    """Whether ``quest_scores`` takes these inputs (else the reference serves)."""
    if not AVAILABLE or q.dim() != 4 or k.dim() != 4:
        return False
    if not (q.is_cuda or INTERPRET) or q.device != k.device:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return False
    B, H, S, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] or D > MAX_HEAD_DIM or D < 1:
        return False
    rows = (H // k.shape[1]) * S
    return rows <= MAX_ROWS and block & (block - 1) == 0 and 16 <= block <= MAX_BLOCK


if triton is not None:
    @triton.jit
    def _quest_kernel(q_ptr, k_ptr, out_ptr, skv, nkb, rows,
                      sqb, sqh, sqr, sqd, skb, skh, skn, skd, sob, soh, sor, son, hkv,
                      DV: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr,
                      RP: tl.constexpr, DP: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // hkv
        h = pid % hkv
        d = tl.arange(0, DP)
        dok = d < DV
        r = tl.arange(0, RP)
        rok = r < rows
        qt = tl.load(q_ptr + b * sqb + h * sqh + r[:, None] * sqr + d[None, :] * sqd,
                     mask=rok[:, None] & dok[None, :], other=0.0).to(tl.float32)  # [RP, DP]
        qa = tl.abs(qt)
        i = tl.arange(0, BS)
        kbase = k_ptr + b * skb + h * skh
        obase = out_ptr + b * sob + h * soh + r * sor
        for j in range(NB):                                              # this program's blocks
            kb = tl.program_id(1) * NB + j
            tok = kb * BS + i
            valid = tok < skv
            kt = tl.load(kbase + tok[:, None] * skn + d[None, :] * skd,
                         mask=valid[:, None] & dok[None, :], other=0.0).to(tl.float32)
            lo = tl.min(tl.where(valid[:, None], kt, float("inf")), axis=0)     # [DP]
            hi = tl.max(tl.where(valid[:, None], kt, -float("inf")), axis=0)
            live = lo <= hi                                              # padding channels too
            lo = tl.where(live, lo, 0.0)
            hi = tl.where(live, hi, 0.0)
            ub = tl.sum(qt * ((lo + hi) * 0.5)[None, :] + qa * ((hi - lo) * 0.5)[None, :], 1)
            tl.store(obase + kb * son, ub, mask=rok & ((r * 0 + kb) < nkb))


def quest_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Quest bounds [B, H, 1, n_blocks] fp32, max over the S queries (as the reference)."""
    if not supports(q, k, block):
        raise ValueError(f"quest_scores: unsupported inputs (q {tuple(q.shape)} {q.dtype}, k "
                         f"{tuple(k.shape)} {k.dtype}, block {block}); use reference.quest_scores")
    B, H, S, D = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = H // hkv
    nkb = -(-skv // block)
    qr = q.reshape(B, hkv, g * S, D)                                      # rows (g, s) per kv head
    out = torch.empty(B, hkv, g * S, nkb, device=q.device, dtype=torch.float32)
    grid = (B * hkv, triton.cdiv(nkb, NB))
    _quest_kernel[grid](qr, k, out, skv, nkb, g * S, *qr.stride(), *k.stride(), *out.stride(),
                        hkv, DV=D, BS=block, NB=NB, RP=_pow2(g * S), DP=max(16, _pow2(D)),
                        num_warps=1)     # H100: 1 warp 0.092 ms, 2: 0.18, 4: 0.62 (128k keys)
    sc = out.reshape(B, H, S, nkb)                                        # [B, H, S, nkb]
    return sc if S == 1 else sc.amax(2, keepdim=True)


# ---------------------------------------------------------------------------------------------
# bounds kept with the cache: the update on append, and the per-KV-head decode table

UPDATE_MAX_BLOCK = 256       # block sizes the update takes (powers of two, 16 .. this)
NBLK = 64                    # key blocks one scoring program takes


def _bounds_inputs_ok(x: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> bool:
    """4-D ``x`` (queries or keys) and bounds of one shape, on one CUDA device (or the
    interpreter), in one float dtype."""
    if not AVAILABLE or x.dim() != 4 or kmin.dim() != 4 or kmin.shape != kmax.shape:
        return False
    if not (x.is_cuda or INTERPRET) or len({x.device, kmin.device, kmax.device}) != 1:
        return False
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and \
        kmin.dtype == x.dtype and kmax.dtype == x.dtype


def supports_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block: int) -> bool:
    """Whether ``kv_decode_table`` takes these inputs (else the reference serves)."""
    if not _bounds_inputs_ok(q, kmin, kmax):
        return False
    B, H, S, D = q.shape
    if kmin.shape[0] != B or kmin.shape[3] != D or H % kmin.shape[1] or not 1 <= D <= MAX_HEAD_DIM:
        return False
    return (H // kmin.shape[1]) * S <= MAX_ROWS and block & (block - 1) == 0 and block >= 16


def supports_update(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                    block: int) -> bool:
    """Whether ``update_bounds`` takes these tensors (else the reference serves)."""
    if not _bounds_inputs_ok(keys, kmin, kmax):
        return False
    if keys.shape[:2] != kmin.shape[:2] or keys.shape[3] != kmin.shape[3]:
        return False
    return keys.shape[3] <= MAX_HEAD_DIM and block & (block - 1) == 0 and \
        16 <= block <= UPDATE_MAX_BLOCK


if triton is not None:
    @triton.jit
    def _bounds_update_kernel(k_ptr, lo_ptr, hi_ptr, b0, end, hkv,
                              skb, skh, skn, skd, slb, slh, sln, sld, shb, shh, shn, shd,
                              DV: tl.constexpr, BS: tl.constexpr, DP: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // hkv
        h = pid % hkv
        blk = (b0 + tl.program_id(1)).to(tl.int64)
        tok = blk * BS + tl.arange(0, BS)
        valid = tok < end
        d = tl.arange(0, DP)
        dok = d < DV
        kt = tl.load(k_ptr + b * skb + h * skh + tok[:, None] * skn + d[None, :] * skd,
                     mask=valid[:, None] & dok[None, :], other=0.0).to(tl.float32)  # [BS, DP]
        lo = tl.min(tl.where(valid[:, None], kt, float("inf")), axis=0)          # [DP]
        hi = tl.max(tl.where(valid[:, None], kt, -float("inf")), axis=0)
        tl.store(lo_ptr + b * slb + h * slh + blk * sln + d * sld,
                 lo.to(lo_ptr.dtype.element_ty), mask=dok)
        tl.store(hi_ptr + b * shb + h * shh + blk * shn + d * shd,
                 hi.to(hi_ptr.dtype.element_ty), mask=dok)

    @triton.jit
    def _kv_scores_kernel(q_ptr, lo_ptr, hi_ptr, out_ptr, nkb, rows, nsb, wb0, hkv,
                          sqb, sqh, sqr, sqd, slb, slh, sln, sld, shb, shh, shn, shd,
                          sob, soh, son,
                          DV: tl.constexpr, NB: tl.constexpr, RP: tl.constexpr,
                          DP: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // hkv
        h = pid % hkv
        r = tl.arange(0, RP)
        rok = r < rows
        d = tl.arange(0, DP)
        dok = d < DV
        qt = tl.load(q_ptr + b * sqb + h * sqh + r[:, None] * sqr + d[None, :] * sqd,
                     mask=rok[:, None] & dok[None, :], other=0.0)                # [RP, DP]
        if DOT_F32:                  # the interpreter: bf16 compares and dots are not exact
            qt = qt.to(tl.float32)
        zero = tl.zeros_like(qt)
        qp = tl.where(qt > zero, qt, zero)                 # q⁺, q⁻: exact in q's dtype
        qn = tl.where(qt < zero, qt, zero)
        kb = tl.program_id(1).to(tl.int64) * NB + tl.arange(0, NB)
        kok = kb < nkb
        m2 = kok[:, None] & dok[None, :]
        lo = tl.load(lo_ptr + b * slb + h * slh + kb[:, None] * sln + d[None, :] * sld,
                     mask=m2, other=0.0)                                          # [NB, DP]
        hi = tl.load(hi_ptr + b * shb + h * shh + kb[:, None] * shn + d[None, :] * shd,
                     mask=m2, other=0.0)
        if DOT_F32:
            lo = lo.to(tl.float32)
            hi = hi.to(tl.float32)
        ub = tl.dot(qp, tl.trans(hi), input_precision=PREC)                       # [RP, NB]
        ub = tl.dot(qn, tl.trans(lo), ub, input_precision=PREC)
        ub = tl.where(rok[:, None], ub, -float("inf"))
        sc = tl.max(ub, 0)                                                        # [NB]
        sc = tl.where(sc == sc, sc, 0.0)                   # the reference's nan_to_num, clamp
        sc = tl.minimum(tl.maximum(sc, -3e38), 3e38)
        forced = (kb < nsb) | (kb >= wb0)
        sc = tl.where(forced, float("inf"), sc)
        tl.store(out_ptr + b * sob + h * soh + kb * son, sc, mask=kok)


def update_bounds(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, start: int,
                  end: int, block: int) -> None:
    """``reference.update_bounds`` in one launch: one program per (batch · kv head, block in
    ``[start // block, ceil(end / block))``)."""
    if not supports_update(keys, kmin, kmax, block):
        raise ValueError(f"update_bounds: unsupported inputs (keys {tuple(keys.shape)} "
                         f"{keys.dtype}, bounds {tuple(kmin.shape)} {kmin.dtype}, block {block})")
    b0, b1 = start // block, -(-end // block)
    if end <= start or b1 <= b0:
        return
    B, hkv, _, D = keys.shape
    _bounds_update_kernel[(B * hkv, b1 - b0)](
        keys, kmin, kmax, b0, end, hkv, *keys.stride(), *kmin.stride(), *kmax.stride(),
        DV=D, BS=block, DP=max(16, _pow2(D)), **({} if INTERPRET else dict(num_warps=1)))


def kv_decode_table(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, skv: int,
                    block: int, topk: int, density: float, sink: int,
                    window: int) -> torch.Tensor:
    """The decode table of ``reference.decode_table(..., select="kv_head", bounds=(kmin,
    kmax))`` as int64 [B, Hkv, 1, n]: exactly the budget's n entries per row, in no order
    (the table kernel's ``table_full`` mode takes it as it is). Ties aside it lists the same
    blocks as the reference."""
    from longfx.kernels.block_sparse import reference

    if not supports_bounds(q, kmin, kmax, block):
        raise ValueError(f"kv_decode_table: unsupported inputs (q {tuple(q.shape)} {q.dtype}, "
                         f"bounds {tuple(kmin.shape)} {kmin.dtype}, block {block})")
    B, H, S, D = q.shape
    hkv = kmin.shape[1]
    g = H // hkv
    nkb = -(-skv // block)
    if kmin.shape[2] < nkb:
        raise ValueError(f"the bounds hold {kmin.shape[2]} blocks, {skv} keys need {nkb}")
    n, wb0, nsb = reference.decode_budget(S, skv, block, sink, window, topk, density)
    qr = q.reshape(B, hkv, g * S, D)                                      # rows (g, s) per kv head
    scores = torch.empty(B, hkv, nkb, device=q.device, dtype=torch.float32)
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16       # the interpreter's bf16 dot is wrong
    prec = "ieee" if q.dtype == torch.float32 or dot_f32 else "tf32"
    _kv_scores_kernel[(B * hkv, triton.cdiv(nkb, NBLK))](
        qr, kmin, kmax, scores, nkb, g * S, nsb, wb0, hkv, *qr.stride(), *kmin.stride(),
        *kmax.stride(), *scores.stride(), DV=D, NB=NBLK, RP=max(16, _pow2(g * S)),
        DP=max(16, _pow2(D)), DOT_F32=dot_f32, PREC=prec,
        **({} if INTERPRET else dict(num_warps=4)))
    idx = torch.topk(scores, n, dim=-1, sorted=False).indices             # [B, Hkv, n]
    return idx[:, :, None]                                                # [B, Hkv, 1, n]
