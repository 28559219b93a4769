"""The canonical ``longfx::attention`` on a GQA decode step on CUDA: the folded-group path
(kernels/attention/grouped.py, what the op runs now) vs the reference it replaced there
(K/V repeated per query head, kernels/attention/reference.py) vs ``F.scaled_dot_product_attention``
with ``enable_gqa``, side by side in one run, plus the largest relative difference from the
reference. 32 query / 8 KV heads, head_dim 128, bf16, one query token. The op is timed twice:
with an all-true mask (grouped.py) and with no mask (SDPA whole, op.unmasked_sdpa_can_run).

    python benchmarks/bench_grouped_decode.py --out $OUT/grouped_decode_h100.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cuda_timing import bench, gpu_meta, rel, save_json

from longfx.kernels.attention import grouped, op, reference


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="32768:1,131072:1,32768:8")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        skv, b = (int(x) for x in case.split(":"))
        g = torch.Generator(device="cuda").manual_seed(skv + b)
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, 8, skv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, 8, skv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        mask = torch.ones(b, 1, 1, skv, device="cuda", dtype=torch.bool)   # all keys visible
        scale = 128 ** -0.5
        assert op.grouped_can_run(q, k, mask, False)
        ref = reference.attention(q, k, v, mask, scale)
        row = {"kv_length": skv, "batch": b,
               "rel_err_grouped": rel(grouped.attention(q, k, v, mask, scale).float(), ref.float()),
               "rel_err_op": rel(torch.ops.longfx.attention(q, k, v, mask, scale, False, 0.0).float(),
                                 ref.float()),
               "rel_err_op_no_mask": rel(torch.ops.longfx.attention(q, k, v, None, scale, False,
                                                                    0.0).float(), ref.float())}
        del ref
        torch.cuda.empty_cache()
        calls = {
            "op (grouped)": lambda: torch.ops.longfx.attention(q, k, v, mask, scale, False, 0.0),
            "op, no mask (sdpa)": lambda: torch.ops.longfx.attention(q, k, v, None, scale,
                                                                      False, 0.0),
            "reference (repeat)": lambda: reference.attention(q, k, v, mask, scale),
            "sdpa enable_gqa, no mask": lambda: F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=True),
        }
        for name, fn in calls.items():
            row[name] = bench(fn, 3, args.reps)["median_ms"]
        rows.append(row)
        print(row, flush=True)
    save_json(args.out, rows=rows, meta=gpu_meta())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
