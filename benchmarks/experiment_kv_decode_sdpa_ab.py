"""Why does bench_kv_quant_decode.py time bf16 SDPA ~15% slower than experiment_kv_decode_breakdown.py?

The two scripts time the same call (one query token, 32 / 8 heads, D 128, bf16, enable_gqa) as
CUDA-graph replays and disagree: 0.218 against 0.189 ms at 128k, B=1 (H100, 2026-11-24). This
script times, in alternating rounds in one process, the packed-state decode (the default
variant) and SDPA under the conditions that differ between the two scripts: ``scale=`` passed or
not, and the dequantized copy of the state (another K + V in bf16) alive or freed while SDPA
runs. Each round times every candidate once (median of ``--iters`` replays); the row keeps every
round, and the medians over rounds.

    python benchmarks/experiment_kv_decode_sdpa_ab.py --out $OUT/sdpa_ab.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from bench_kv_quant_decode import graph_ms, parse_cases, random_state, save


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--cases", default="128k:1,32k:8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()

    from longfx.kernels.kv_quant import reference as R
    from longfx.kernels.kv_quant import triton as T
    dev = torch.device("cuda")
    rows = []
    for length, batch in parse_cases(a.cases):
        config = R.KVQuantConfig(bits=4, group=64, residual=128)
        st = random_state(R, batch, 8, 128, length, config, dev)
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(batch, 32, 1, 128, generator=g, device=dev, dtype=torch.bfloat16)
        k = torch.randn(batch, 8, length, 128, generator=g, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        scale = 128 ** -0.5
        cands = {
            "quant": lambda: T.attention_decode(q, st, scale),
            "sdpa_scale": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                 enable_gqa=True),
            "sdpa_noscale": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        times = {name: [] for name in list(cands) + ["sdpa_scale_copy_alive",
                                                      "quant_copy_alive"]}
        for _ in range(a.rounds):
            for name, fn in cands.items():
                times[name].append(graph_ms(fn, 5, a.iters))
            kd, vd = R.dequantize_state(st)                 # the bench keeps this alive
            times["sdpa_scale_copy_alive"].append(graph_ms(cands["sdpa_scale"], 5, a.iters))
            times["quant_copy_alive"].append(graph_ms(cands["quant"], 5, a.iters))
            del kd, vd
            torch.cuda.empty_cache()
        med = {n: statistics.median(t) for n, t in times.items()}
        row = dict(length=length, batch=batch, bits=4, variant=T.DEFAULT_VARIANT, rounds=times,
                   median_ms=med, speedup_vs_sdpa_scale=med["sdpa_scale"] / med["quant"],
                   speedup_vs_sdpa_noscale=med["sdpa_noscale"] / med["quant"],
                   speedup_copy_alive=med["sdpa_scale_copy_alive"] / med["quant_copy_alive"])
        print(json.dumps(row), flush=True)
        rows.append(row)
        del st, k, v
        torch.cuda.empty_cache()
    if a.out:
        save(a.out, rows)


if __name__ == "__main__":
    main()
