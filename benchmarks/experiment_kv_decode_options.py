"""The "asmt" quantized-KV decode's options side by side in one run (H100): the run-time sink
branch that splits the key / value tile waits (``wait_split``, "old": off and the combine
unsplit, the kernel before 2026-11-24's change), operands that keep the magic offset
(``raw``), the combine kernel's channel split (``combine_tile``), split counts, register caps,
and the exact sinks (n = 4). Llama-8B shape (32 q / 8 kv heads, D=128, bf16, one query),
group 64, residual 128, u8 scales; CUDA-graph times (``graph_ms``), per-kernel times (torch
profiler), max relative error vs the reference (dequantize + fp32 attention, ``with_sinks``
for the sink rows); then the baseline, the fastest option set and bf16 SDPA in alternating
rounds (medians).

    python benchmarks/experiment_kv_decode_options.py --out x.json [--cases 128k:1,32k:8]
        [--configs old,base,raw] [--baseline old]

The first run (results/debug/kv_quant_decode_options1_h100.json) also tried options since
removed (one PTX call a bit plane, the combine launched as a programmatic dependent): the
kv_quant triton docstring has what they measured.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench_kv_quant_decode import graph_ms, parse_cases, random_state, save
from cuda_timing import rel
from experiment_kv_decode_breakdown import kernel_times

BASE = dict(raw=False, wait_split=True, combine_tile=8192, splits=None, maxnreg=None,
            sinks=0)
CONFIGS = {
    "old": dict(wait_split=False, combine_tile=1 << 30),
    "base": {},
    "raw": dict(raw=True),
    "nowait": dict(wait_split=False),
    "s192": dict(splits=192),
    "s256_r168": dict(splits=256, maxnreg=168),
    "sinks4": dict(sinks=4),
    "raw_sinks4": dict(raw=True, sinks=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--cases", default="128k:1,32k:8")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default="old", help="the config timed against the fastest")
    a = ap.parse_args()

    from longfx.kernels.kv_quant import reference as R
    from longfx.kernels.kv_quant import triton as T
    rows = []
    dev = torch.device("cuda")
    for length, batch in parse_cases(a.cases):
        for bits in (int(b) for b in a.bits.split(",")):
            config = R.KVQuantConfig(bits=bits, group=64, residual=128)
            st = random_state(R, batch, 8, 128, length, config, dev)
            g = torch.Generator(device=dev).manual_seed(1)
            q = torch.randn(batch, 32, 1, 128, generator=g, device=dev, dtype=torch.bfloat16)
            sk = torch.randn(batch, 8, 4, 128, generator=g, device=dev, dtype=torch.bfloat16)
            sv = torch.randn(batch, 8, 4, 128, generator=g, device=dev, dtype=torch.bfloat16)
            kd, vd = R.dequantize_state(st)
            want = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(),
                                                  enable_gqa=True)
            kd[:, :, :4], vd[:, :, :4] = sk, sv                       # reference.with_sinks
            want_s = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(),
                                                    enable_gqa=True)
            del kd, vd
            read = T.packed_bytes_read(st, length)
            runs = {}
            for name in a.configs.split(","):
                o = dict(BASE, **CONFIGS[name])

                def run(o=o):
                    T._ASMT.update(raw=o["raw"], wait_split=o["wait_split"])
                    T._COMBINE_TILE = o["combine_tile"]
                    kw = dict(sink_k=sk, sink_v=sv) if o["sinks"] else {}
                    return T.attention_decode(q, st, None, o["splits"], maxnreg=o["maxnreg"],
                                              **kw)
                try:
                    t = graph_ms(run, 10, 50)
                    err = rel(run(), want_s if o["sinks"] else want)
                    kt = kernel_times(run)
                except Exception as e:  # noqa: BLE001 - record an option set that fails
                    row = dict(length=length, batch=batch, bits=bits, config=name,
                               error=repr(e)[:600])
                    print(f"# {length}:{batch} {bits}b {name}: {row['error'][:300]}", flush=True)
                    rows.append(row)
                    continue
                runs[name] = (t, run)
                row = dict(length=length, batch=batch, bits=bits, config=name, options=o,
                           graph_ms=t, gbps=read / t / 1e6, kernels_us=kt,
                           kernels_sum_us=sum(kt.values()), max_rel_err_vs_reference=err)
                print(f"# {length}:{batch} {bits}b {name:18s} {t * 1e3:7.1f} us  err {err:.2e}  "
                      + " ".join(f"{n[:16]} {x:.1f}" for n, x in kt.items()), flush=True)
                rows.append(row)
            k = torch.randn(batch, 8, length, 128, generator=g, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            plain = {n: x for n, x in runs.items() if not CONFIGS[n].get("sinks")}
            best = min((n for n in plain if n != a.baseline), key=lambda n: plain[n][0])
            rounds = [(graph_ms(runs[a.baseline][1], 10, 50), graph_ms(runs[best][1], 10, 50),
                       graph_ms(sdpa, 10, 50)) for _ in range(a.rounds)]
            med = [statistics.median(r[i] for r in rounds) for i in range(3)]
            row = dict(length=length, batch=batch, bits=bits, best=best, rounds_ms=rounds,
                       baseline=a.baseline, baseline_ms=med[0], best_ms=med[1], sdpa_bf16_ms=med[2],
                       baseline_speedup=med[2] / med[0], best_speedup=med[2] / med[1])
            print(f"# {length}:{batch} {bits}b rounds: {a.baseline} {med[0] * 1e3:.1f} us, {best} "
                  f"{med[1] * 1e3:.1f} us, sdpa {med[2] * 1e3:.1f} us: {med[2] / med[0]:.2f}x / "
                  f"{med[2] / med[1]:.2f}x", flush=True)
            rows.append(row)
            k = v = st = None                                   # free them before the next case
            torch.cuda.empty_cache()
    T._ASMT.update(raw=False, wait_split=True)
    T._COMBINE_TILE = 8192
    if a.out:
        save(a.out, rows)


if __name__ == "__main__":
    main()
