"""Where the time of one quantized-KV decode step goes: per-kernel GPU time (split-KV packed
kernel, ring kernel, combine) from the CUDA profiler, next to the CUDA-graph time of the whole
step and bf16 SDPA, for given variants/knobs (4-bit, Llama-8B shape as in
bench_kv_quant_decode.py).

    python benchmarks/experiment_kv_decode_breakdown.py --out x.json \
        --configs "joined:32:1:3:0,magic:64:1:3:0:168:0,magic_nc:64:1:3:0"
        # variant:block_n:warps:stages:splits[:maxnreg (0: none)[:fuse_ring (1/0)]]
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
import torch.nn.functional as F

from bench_kv_quant_decode import graph_ms, parse_cases, random_state, save
from cuda_timing import rel


def kernel_times(fn, iters=30):
    """Mean GPU microseconds per call of each kernel ``fn`` launches (torch profiler)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name] += e.device_time / iters
    return dict(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--cases", default="128k:1,32k:8")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--configs", default="joined:32:1:3:0,magic:64:1:3:0")
    a = ap.parse_args()

    from longfx.kernels.kv_quant import reference as R
    from longfx.kernels.kv_quant import triton as T
    rows = []
    for length, batch in parse_cases(a.cases):
        config = R.KVQuantConfig(bits=a.bits, group=64, residual=128)
        st = random_state(R, batch, 8, 128, length, config, torch.device("cuda"))
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        t_sdpa = graph_ms(sdpa, 5, 30)
        read = T.packed_bytes_read(st, length)
        kd, vd = R.dequantize_state(st)
        want = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
        del kd, vd
        outs = {}
        for cfg in a.configs.split(","):
            variant, bn, warps, stages, splits, *rest = cfg.split(":")
            T._CENTER = not variant.endswith("_nc")       # "magic_nc": magic, codes not centred
            variant = variant.removesuffix("_nc")
            maxnreg = int(rest[0]) if rest else 0
            fuse = bool(int(rest[1])) if len(rest) > 1 else True

            def run():
                return T.attention_decode(q, st, None, int(splits) or None, int(warps),
                                          int(stages), variant=variant, block_n=int(bn),
                                          maxnreg=maxnreg or None, fuse_ring=fuse)
            try:
                t = graph_ms(run, 5, 30)
            except Exception as e:  # noqa: BLE001 - record a config that does not compile
                print(json.dumps(dict(length=length, batch=batch, config=cfg,
                                      error=repr(e)[:400])), flush=True)
                continue
            o = run()
            err = rel(o, want)
            outs.setdefault(variant, o)
            kt = kernel_times(run)
            row = dict(length=length, batch=batch, bits=a.bits, config=cfg, graph_ms=t,
                       sdpa_ms=t_sdpa, speedup=t_sdpa / t, gbps=read / t / 1e6,
                       kernels_us=kt, kernels_sum_us=sum(kt.values()),
                       max_rel_err_vs_reference=err)
            print(json.dumps(row), flush=True)
            rows.append(row)
        t_sdpa_after = graph_ms(sdpa, 5, 30)       # again, after the decode configs
        print(json.dumps(dict(length=length, batch=batch, sdpa_ms_before=t_sdpa,
                              sdpa_ms_after=t_sdpa_after)), flush=True)
        rows.append(dict(length=length, batch=batch, sdpa_ms_before=t_sdpa,
                         sdpa_ms_after=t_sdpa_after))
        if "asm" in outs and "magic" in outs:    # the inline PTX against its Triton twin
            d = float((outs["asm"].float() - outs["magic"].float()).abs().max())
            print(json.dumps(dict(length=length, batch=batch, asm_vs_magic_max_abs=d)))
            rows.append(dict(length=length, batch=batch, asm_vs_magic_max_abs=d))
        del k, v, st
        torch.cuda.empty_cache()
    if a.out:
        save(a.out, rows)


if __name__ == "__main__":
    main()
