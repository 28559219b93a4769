"""Experiment (2026-11-24): does a sink + window prefill kernel with TMA tensor descriptors and
Triton's warp specialization (``tl.range(..., warp_specialize=True)``) beat
kernels/sparse_attention/triton.py on an H100? Same spec and setting as
bench_sparse_attention.py (bf16, B=1, 32/8 heads, D=128, sink 4, window 4096), S = Skv only,
no padding/cap/softcap/decode: a measuring stick, not a lowering.

Result (H100, torch 2.11, Triton 3.6; results/tuning/sink_window_tma_experiment_h100.json):
best config 64x64 tiles, 4 warps, 3 stages, no warp specialization — 4.36 / 9.62 / 18.83 ms
at 32k / 64k / 128k against the project kernel's 5.08 / 10.26 / 20.36 (14% / 6% / 8% faster);
warp specialization did not help (and failed to compile with 4 warps). The issue's 0.75x
FlexAttention (4.0 / 8.3 / 16.7 ms) is out of reach of both.

    python benchmarks/experiment_tma_sink_window.py        # -> $OUT/exp_sw.json
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _tile(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, n0, offs_m, offs_n, sink, window, qk_scale,
          MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    k = desc_k.load([kv_row0 + n0, 0])
    qk = tl.dot(q, k.T)
    if MASK == 0:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    else:
        j = n0 + offs_n
        d = offs_m[:, None] - j[None, :]
        if MASK == 1:       # sinks
            vis = (d >= 0) & (j < sink)[None, :]
        else:               # window, j >= sink
            vis = (d >= 0) & (d < window) & (j >= sink)[None, :]
        qk = qk * qk_scale + tl.where(vis, 0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk -= m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = desc_v.load([kv_row0 + n0, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _sw_fwd(Q, OUT, desc_k, desc_v, S, H, G, sink, window, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    i0 = mb * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    qrow = (bh.to(tl.int64) * S + offs_m)
    q = tl.load(Q + qrow[:, None] * D + offs_d[None, :])
    kv_row0 = (b * (H // G) + kvh) * S
    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    P0 = i0
    P1 = i0 + BLOCK_M - 1
    nsb = tl.cdiv(tl.minimum(sink, P1 + 1), BLOCK_N)
    wb0 = tl.maximum(tl.maximum(P0 - window + 1, sink), 0) // BLOCK_N
    wb1 = tl.cdiv(P1 + 1, BLOCK_N)
    ib0 = tl.cdiv(tl.maximum(tl.maximum(P1 - window + 1, sink), 0), BLOCK_N)
    ib1 = (P0 + 1) // BLOCK_N
    ib0 = tl.minimum(tl.maximum(ib0, wb0), wb1)
    ib1 = tl.minimum(tl.maximum(ib1, ib0), wb1)
    for blk in range(0, nsb):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, blk * BLOCK_N, offs_m,
                              offs_n, sink, window, qk_scale, 1, BLOCK_N)
    for blk in range(wb0, ib0):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, blk * BLOCK_N, offs_m,
                              offs_n, sink, window, qk_scale, 2, BLOCK_N)
    for blk in tl.range(ib0, ib1, warp_specialize=WS):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, blk * BLOCK_N, offs_m,
                              offs_n, sink, window, qk_scale, 0, BLOCK_N)
    for blk in range(tl.maximum(ib1, wb0), wb1):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, desc_k, desc_v, kv_row0, blk * BLOCK_N, offs_m,
                              offs_n, sink, window, qk_scale, 2, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(OUT + qrow[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty))


def sw_attention(q, k, v, sink, window, bm=128, bn=64, warps=8, stages=3, ws=False):
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    k2 = k.reshape(B * Hkv * S, D)
    v2 = v.reshape(B * Hkv * S, D)
    dk = TensorDescriptor(k2, shape=[B * Hkv * S, D], strides=[D, 1], block_shape=[bn, D])
    dv = TensorDescriptor(v2, shape=[B * Hkv * S, D], strides=[D, 1], block_shape=[bn, D])
    _sw_fwd[(S // bm, B * H)](q, out, dk, dv, S, H, H // Hkv, sink, window,
                              D ** -0.5 * 1.4426950408889634, BLOCK_M=bm, BLOCK_N=bn, D=D, WS=ws,
                              num_warps=warps, num_stages=stages)
    return out


def main():
    from cuda_timing import median_ms
    from longfx.kernels.sparse_attention import triton as T
    OUT = os.environ.get("OUT", ".")
    res = {"rows": []}

    def inputs(n, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                for h in (32, 8, 8)]
    CFGS = [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, False),
            (128, 128, 8, 2, True), (128, 64, 4, 3, True), (128, 128, 4, 3, True),
            (128, 64, 8, 4, False), (64, 64, 4, 3, False)]   # (BM, BN, warps, stages, WS)

    def project(q, k, v, window):
        return T.sparse_attention(q, k, v, None, 128 ** -0.5, 0.0, 4, window, 0, None,
                                  "rotate_half", dense_fallback=False)
    q, k, v = inputs(4096, 1)
    ref = project(q, k, v, 1024)
    for c in CFGS:
        try:
            o = sw_attention(q, k, v, 4, 1024, *c)
            e = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
            res["rows"].append({"check": c, "rel_err": e})
        except Exception as ex:  # noqa: BLE001 - a config that does not compile is a result
            res["rows"].append({"check": c, "error": repr(ex)[:300]})
        print(res["rows"][-1], flush=True)
    for n in (32768, 65536, 131072):
        q, k, v = inputs(n)
        ours = median_ms(lambda: project(q, k, v, 4096), 3, 10)
        row = {"S": n, "ours_ms": ours, "exp": []}
        for c in CFGS:
            try:
                t = median_ms(lambda: sw_attention(q, k, v, 4, 4096, *c), 3, 10)
                row["exp"].append({"cfg": c, "ms": t})
            except Exception as ex:  # noqa: BLE001
                row["exp"].append({"cfg": c, "error": repr(ex)[:200]})
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        json.dump(res, open(f"{OUT}/exp_sw.json", "w"), indent=1)


if __name__ == "__main__":
    main()
