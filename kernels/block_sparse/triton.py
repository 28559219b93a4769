"""Quest's block bounds in one pass over the keys (CUDA; the interpreter runs it with
TRITON_INTERPRET=1). Semantics: ``reference.quest_scores``; this must agree with it.

Quest (Tang et al. 2024, §3.2) ranks the key blocks of a decode step by the upper bound
``Σ_d max(q_d·min_d, q_d·max_d)`` of any ``q · k`` in the block, min and max taken per channel
over the block's keys. The reference computes it in plain torch: an fp32 copy of the whole
key cache, a padded copy, two reductions and two matmuls — at 128k keys, 8 kv heads and
head_dim 128 it took 0.99 ms, 5.5× dense attention over the same cache (0.18 ms; H100, bf16,
CUDA-graph replays, 2026-11-24, benchmarks/results/block_sparse_h100.json), and this kernel
0.092 ms with one warp a program (0.18 ms with 2 warps, 0.62 ms with 4). Each program reads its
tile of keys once, in their own dtype, takes the per-channel min and max of each block in
registers, one block after the other, and scores all the G·S query rows of its kv head against
them (``q·(min+max)/2 + |q|·(max−min)/2``, the reference's form). The only output is the
``[B, Hkv, G·S, n_blocks]`` fp32 score table.

A decode step still reads every key once here (the bounds are recomputed from the cache each
step; Quest itself keeps them as per-page metadata next to the KV cache), so it costs about
half of dense attention's reads before the sparse attention runs.
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
