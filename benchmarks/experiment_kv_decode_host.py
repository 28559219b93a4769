"""Where a whole-model decode step's host time goes: one profile of the lowered ``kv_quant``
step, the ``fuse=false`` step and ``longfx.compile(model, "")`` (DynamicCache) on the model of
bench_kv_quant_model_decode.py (Llama-8B-shaped, random weights, bf16).

A B=1 decode step of that model is host-bound (RESULTS.md: its fastest steps are ~7 ms for
the dense model and ~11 ms lowered at 32k, with 8 layers), so the question is how many CPU
microseconds each op costs, not how fast the kernels are. For each model: ``--steps`` steps
under ``torch.profiler`` (CPU and CUDA), then the ops sorted by their own CPU time, the number
of kernel launches a step, the CPU time a step and the GPU kernel time a step.

    python benchmarks/experiment_kv_decode_host.py --out $OUT/kv_decode_host_h100.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from bench_kv_quant_model_decode import build, meta, model_args, prefill

from longfx.eval import infer


def profile(model, cache, tok, steps: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        for _ in range(3):                                            # warm: compiled graphs
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:] \
                .argmax(-1)
    infer.sync(tok.device)
    walls = []
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.no_grad():
                tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:] \
                    .argmax(-1)
            infer.sync(tok.device)
            walls.append((time.perf_counter() - t0) * 1e3)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                          "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    gpu_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_ms_per_step": [round(w, 3) for w in walls],
            "kernel_launches_per_step": launches / steps,
            "gpu_kernel_ms_per_step": round(gpu_us / steps / 1e3, 3),
            "top_self_cpu": [{"op": e.key, "calls_per_step": e.count / steps,
                              "self_cpu_us_per_step": round(e.self_cpu_time_total / steps, 1),
                              "cpu_total_us_per_step": round(e.cpu_time_total / steps, 1)}
                             for e in rows]}


def main(argv=None) -> int:
    import longfx
    from transformers import DynamicCache

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    model_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = build(args)
    ids = torch.randint(3, args.vocab, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    out = {"length": args.length, "batch": args.batch, "layers": args.layers, "meta": meta(args)}
    fused = longfx.compile(model, f"kv_quant(bits={args.bits})")
    cache = fused.longfx_new_cache()
    tok = prefill(fused, ids, cache, args.chunk)
    out["lowered"] = profile(fused, cache, tok, args.steps, args.top)
    plain = longfx.compile(model, f"kv_quant(bits={args.bits}, fuse=false)")
    out["unlowered"] = profile(plain, cache, tok, args.steps, args.top)
    del cache
    canon = longfx.compile(model, "")
    dcache = DynamicCache(config=model.config)
    tok = prefill(canon, ids, dcache, args.chunk)
    out["dense_compiled"] = profile(canon, dcache, tok, args.steps, args.top)
    out["dense_eager"] = profile(model, dcache, tok, args.steps, args.top)
    for name in ("lowered", "unlowered", "dense_compiled", "dense_eager"):
        r = out[name]
        print(name, r["wall_ms_per_step"], "launches", r["kernel_launches_per_step"],
              "gpu ms", r["gpu_kernel_ms_per_step"], flush=True)
        for row in r["top_self_cpu"][:12]:
            print("   ", row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
