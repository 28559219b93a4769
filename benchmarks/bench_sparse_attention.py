"""GPU benchmark of the Triton kernel of ``longfx::sparse_attention`` (kernels/sparse_attention).

Setting (the project issue's): bf16, B=1, 32 query / 8 kv heads, head dim 128, sink 4 +
window 4096, prefill at S = 4k, 32k, 64k, 128k and decode (S = 1) at 128k. Compared with

* dense ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (what the model ran);
* ``torch.nn.attention.flex_attention`` compiled, with the same mask as a ``mask_mod`` (the
  ``create_block_mask`` time is reported apart: first build, compile included, and a cached
  rebuild);
* the ideal: density × the dense SDPA time (density = kept / causal query–key pairs);
* decode: SDPA over only the kept tokens (sinks + window gathered beforehand, the gather not
  timed), and dense SDPA over the whole cache.

"ours" is the public entry (``triton.sparse_attention``: dense SDPA when the window covers the
context or the density rule says so); "kernel" is the Triton kernel forced
(``dense_fallback=False``). A correctness check against SDPA with the dense mask and against
flex runs at 4k before any timing. Timing: CUDA events around each call, after warm-up, median
of N. Optional parts: ``sweep`` (launch configurations at 32k and decode splits at 128k, to
retune ``_config``/``_num_splits``) and ``crossover`` (kernel vs dense-with-mask vs causal SDPA
at short contexts and high densities, to recalibrate DENSE_DENSITY / DENSE_MAX_KV).

    python benchmarks/bench_sparse_attention.py                 # -> $OUT/sparse_attention.json
    python benchmarks/bench_sparse_attention.py --parts check,prefill,decode --out r.json
    python benchmarks/bench_sparse_attention.py --quick         # 4k and 32k only, fewer reps

The JSON is rewritten after each part, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _import_longfx():
    """The kernel modules, installed or straight from this checkout (no ``pip install``: the
    folders are mapped into ``longfx`` the way setup.py maps them, without longfx/__init__)."""
    try:
        from longfx.kernels.sparse_attention import reference, triton as impl
        return reference, impl
    except ImportError:
        pass
    from cuda_timing import map_checkout

    map_checkout(ROOT)
    from longfx.kernels.sparse_attention import reference, triton as impl
    return reference, impl


R, T = _import_longfx()

B, H, HKV, D = 1, 32, 8, 128
SINK, WINDOW = 4, 4096
DTYPE = torch.bfloat16


# --- timing ----------------------------------------------------------------------------------

from cuda_timing import bench, graph_bench, rel  # noqa: E402 - a sibling script module


def wall(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, out


def reps_for(s: int, quick: bool) -> tuple[int, int]:
    if quick:
        return 2, 5
    return (3, 10) if s >= 65536 else (5, 20)


# --- inputs and baselines --------------------------------------------------------------------

def inputs(s: int, skv: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, s, D, device="cuda", dtype=DTYPE, generator=g)
    k = torch.randn(B, HKV, skv, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(B, HKV, skv, D, device="cuda", dtype=DTYPE, generator=g)
    return q, k, v


def ours(q, k, v, **kw):
    return T.sparse_attention(q, k, v, None, D ** -0.5, 0.0, SINK, WINDOW, 0, None,
                              "rotate_half", **kw)


def kernel(q, k, v, **kw):
    return ours(q, k, v, dense_fallback=False, **kw)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_masked(q, k, v, sink=SINK, window=WINDOW):
    qp, kp = R.positions(q.shape[2], k.shape[2], q.device)
    keep = R.visible(qp, kp, sink, window)[None, None]                     # [1, 1, S, Skv]
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    except RuntimeError:                  # a backend without GQA + mask: repeat the kv heads
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), attn_mask=keep)


def mask_mod_for(s: int, skv: int, sink: int = SINK, window: int = WINDOW):
    off = skv - s

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + off
        return (kv_idx <= p) & ((kv_idx < sink) | (p - kv_idx < window))
    return mask_mod


_FLEX = None


def flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def block_mask(s: int, skv: int) -> tuple[object, dict]:
    """The flex BlockMask and its build times: first (compile included) and cached."""
    from torch.nn.attention.flex_attention import create_block_mask
    mm = mask_mod_for(s, skv)
    first, bm = wall(lambda: create_block_mask(mm, None, None, s, skv, device="cuda",
                                               _compile=True))
    cached, bm = wall(lambda: create_block_mask(mm, None, None, s, skv, device="cuda",
                                                _compile=True))
    return bm, {"first_build_ms": first, "cached_build_ms": cached}


def run_flex(q, k, v, bm):
    return flex()(q, k, v, block_mask=bm, enable_gqa=True)


# --- parts -----------------------------------------------------------------------------------

def part_check(res: dict, args) -> None:
    """Correctness at 4k (prefill, kernel forced) and decode at 16k before any timing."""
    out = {}
    s = 4096
    q, k, v = inputs(s, s, 1)
    for window in (WINDOW // 4, WINDOW):       # 1024: truly sparse at 4k; 4096: covers all
        ref = sdpa_masked(q, k, v, SINK, window)
        got = T.sparse_attention(q, k, v, None, D ** -0.5, 0.0, SINK, window, 0, None,
                                 "rotate_half", dense_fallback=False)
        row = {"rel_err_vs_sdpa_mask": rel(got, ref)}
        try:
            from torch.nn.attention.flex_attention import create_block_mask
            bm = create_block_mask(mask_mod_for(s, s, SINK, window), None, None, s, s,
                                   device="cuda", _compile=True)
            row["rel_err_vs_flex"] = rel(got, run_flex(q, k, v, bm))
            row["flex_vs_sdpa_mask"] = rel(run_flex(q, k, v, bm), ref)
        except Exception as e:  # noqa: BLE001 - flex is a comparison, not the subject
            row["flex_error"] = repr(e)[:300]
        out[f"prefill_4k_window{window}"] = row
    skv = 16384
    q, k, v = inputs(1, skv, 2)
    ref = sdpa_masked(q, k, v)
    for splits in (None, 1, 7):
        got = kernel(q, k, v, num_splits=splits)
        out[f"decode_16k_splits{splits}"] = {"rel_err_vs_sdpa_mask": rel(got, ref)}
    # cap + softcap + padding at 4k vs the dense-mask reference (fp32 math on the GPU)
    q, k, v = inputs(512, 4096, 3)
    keep = torch.ones(B, 4096, dtype=torch.bool, device="cuda")
    keep[:, :100] = False
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    got = T.sparse_attention(q, k, v, keep, D ** -0.5, 30.0, SINK, 1024, 2048, inv,
                             "rotate_half", dense_fallback=False)
    ref = R.sparse_attention(q, k, v, keep, D ** -0.5, 30.0, SINK, 1024, 2048, inv, "rotate_half")
    out["chunked_512_over_4k_cap_softcap_pad"] = {"rel_err_vs_reference": rel(got, ref)}
    worst = max(v for row in out.values() for key, v in row.items()
                if key.startswith("rel_err"))
    out["ok"] = worst <= 2e-2
    res["check"] = out
    print("check:", json.dumps(out, indent=1))
    if not out["ok"] and not args.keep_going:
        raise SystemExit(f"correctness check failed (worst relative error {worst:.3g})")


def part_prefill(res: dict, args) -> None:
    rows = []
    for s in args.lengths:
        warm, reps = reps_for(s, args.quick)
        q, k, v = inputs(s, s)
        dens = R.density(s, s, SINK, WINDOW)
        row = {"S": s, "Skv": s, "density": dens}
        row["sdpa_causal"] = bench(lambda: sdpa_causal(q, k, v), warm, reps)
        row["ideal_ms"] = dens * row["sdpa_causal"]["median_ms"]
        row["ours"] = bench(lambda: ours(q, k, v), warm, reps)
        row["kernel"] = bench(lambda: kernel(q, k, v), warm, reps)
        try:
            bm, build = block_mask(s, s)
            row["flex_block_mask"] = build
            first, _ = wall(lambda: run_flex(q, k, v, bm))
            row["flex_first_call_ms"] = first                  # torch.compile included
            row["flex"] = bench(lambda: run_flex(q, k, v, bm), warm, reps)
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = repr(e)[:300]
        for name in ("kernel", "flex"):
            if name in row:
                row[f"{name}_speedup_vs_sdpa"] = (row["sdpa_causal"]["median_ms"]
                                                  / row[name]["median_ms"])
                row[f"{name}_vs_ideal"] = row[name]["median_ms"] / row["ideal_ms"]
        rows.append(row)
        print(f"prefill S={s}: density {dens:.3f}  sdpa {row['sdpa_causal']['median_ms']:.3f} ms"
              f"  ideal {row['ideal_ms']:.3f}  ours {row['ours']['median_ms']:.3f}"
              f"  kernel {row['kernel']['median_ms']:.3f}"
              f"  flex {row.get('flex', {}).get('median_ms', float('nan')):.3f}")
        del q, k, v
        torch.cuda.empty_cache()
        res["prefill"] = rows
        save(res, args)


def part_decode(res: dict, args) -> None:
    skv = args.decode_len
    warm, reps = (10, 50) if not args.quick else (3, 10)
    q, k, v = inputs(1, skv)
    kk = torch.cat((k[:, :, :SINK], k[:, :, skv - WINDOW:]), 2).contiguous()   # [B, Hkv, 4100, D]
    vk = torch.cat((v[:, :, :SINK], v[:, :, skv - WINDOW:]), 2).contiguous()
    row = {"S": 1, "Skv": skv, "kept": SINK + WINDOW}
    row["sdpa_kept_only"] = bench(
        lambda: F.scaled_dot_product_attention(q, kk, vk, enable_gqa=True), warm, reps)
    row["sdpa_full_cache"] = bench(
        lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), warm, reps)
    row["ours"] = bench(lambda: ours(q, k, v), warm, reps)
    row["ours_vs_sdpa_kept"] = row["ours"]["median_ms"] / row["sdpa_kept_only"]["median_ms"]
    # the same calls replayed as CUDA graphs: GPU time (eager times above include Python's
    # launch overhead, larger than the GPU work of one decode step)
    try:
        row["graph"] = {
            "sdpa_kept_only": graph_bench(
                lambda: F.scaled_dot_product_attention(q, kk, vk, enable_gqa=True), warm, reps),
            "sdpa_full_cache": graph_bench(
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), warm, reps),
            "ours": graph_bench(lambda: ours(q, k, v), warm, reps)}
        g = row["graph"]
        g["ours_vs_sdpa_kept"] = g["ours"]["median_ms"] / g["sdpa_kept_only"]["median_ms"]
    except Exception as e:  # noqa: BLE001 - report, keep the eager rows
        row["graph_error"] = repr(e)[:300]
    try:
        bm, build = block_mask(1, skv)
        row["flex_block_mask"] = build
        row["flex"] = bench(lambda: run_flex(q, k, v, bm), warm, reps)
    except Exception as e:  # noqa: BLE001
        row["flex_error"] = repr(e)[:300]
    row["correct_rel_err"] = rel(ours(q, k, v), F.scaled_dot_product_attention(
        q, kk, vk, enable_gqa=True))
    # bytes of K and V the kept keys occupy, over the time: effective bandwidth
    kv_bytes = 2 * B * HKV * (SINK + WINDOW) * D * k.element_size()
    row["ours_effective_GBps"] = kv_bytes / row["ours"]["median_ms"] / 1e6
    res["decode"] = row
    print("decode:", json.dumps(row, indent=1))
    save(res, args)


SWEEP_CONFIGS = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
    (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3), (128, 64, 4, 3),
    (128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 2), (128, 32, 4, 4),
]


def part_sweep(res: dict, args) -> None:
    s = 32768 if not args.quick else 8192
    q, k, v = inputs(s, s)
    warm, reps = reps_for(s, True)
    rows = []
    for bm, bn, w, st in SWEEP_CONFIGS:
        try:
            t = bench(lambda: kernel(q, k, v, block_m=bm, block_n=bn, num_warps=w,
                                     num_stages=st), warm, reps)
            rows.append({"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st, **t})
        except Exception as e:  # noqa: BLE001 - out of shared memory / registers
            rows.append({"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st,
                         "error": repr(e)[:200]})
        print("sweep prefill", rows[-1])
    res["sweep_prefill"] = {"S": s, "rows": rows}
    del q, k, v
    q, k, v = inputs(1, args.decode_len)
    drows = []
    for bn in (32, 64, 128):
        for splits in (None, 1, 4, 8, 16, 32, 64):
            for st in (2, 3, 4):
                try:
                    t = bench(lambda: kernel(q, k, v, block_n=bn, num_splits=splits,
                                             num_stages=st), 5, 20)
                    drows.append({"block_n": bn, "num_splits": splits, "num_stages": st, **t})
                except Exception as e:  # noqa: BLE001
                    drows.append({"block_n": bn, "num_splits": splits, "num_stages": st,
                                  "error": repr(e)[:200]})
    best = min((r for r in drows if "median_ms" in r), key=lambda r: r["median_ms"], default=None)
    res["sweep_decode"] = {"Skv": args.decode_len, "rows": drows, "best": best}
    print("sweep decode best:", best)
    save(res, args)


def part_crossover(res: dict, args) -> None:
    """Kernel vs dense SDPA with the spec's mask (the fallback) vs causal SDPA at short
    contexts and high densities: where must DENSE_DENSITY / DENSE_MAX_KV sit?"""
    rows = []
    for s in (1024, 2048, 4096, 8192, 16384):
        q, k, v = inputs(s, s)
        causal = bench(lambda: sdpa_causal(q, k, v), 3, 10)["median_ms"]
        for target in (0.5, 0.75, 0.85, 0.9, 0.95):
            window = _window_for_density(s, target)
            dens = R.density(s, s, SINK, window)
            kern = bench(lambda: T.sparse_attention(
                q, k, v, None, D ** -0.5, 0.0, SINK, window, 0, None, "rotate_half",
                dense_fallback=False), 3, 10)["median_ms"]
            try:
                masked = bench(lambda: sdpa_masked(q, k, v, SINK, window), 3, 10)["median_ms"]
            except torch.cuda.OutOfMemoryError:
                masked = math.nan
            rows.append({"S": s, "window": window, "density": dens, "kernel_ms": kern,
                         "sdpa_masked_ms": masked, "sdpa_causal_ms": causal,
                         "kernel_slower_than_causal": kern > causal})
            print("crossover", rows[-1])
        del q, k, v
        torch.cuda.empty_cache()
    res["crossover"] = {"rows": rows, "DENSE_DENSITY": T.DENSE_DENSITY,
                        "DENSE_MAX_KV": T.DENSE_MAX_KV}
    save(res, args)


def _window_for_density(s: int, target: float) -> int:
    lo, hi = 1, s
    while lo < hi:                                  # smallest window with density >= target
        mid = (lo + hi) // 2
        if R.density(s, s, SINK, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


# --- driver ----------------------------------------------------------------------------------

def environment() -> dict:
    import triton
    return {"gpu": torch.cuda.get_device_name(0), "sms":
            torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "setting": {"B": B, "H": H, "Hkv": HKV, "D": D, "sink": SINK, "window": WINDOW,
                        "dtype": str(DTYPE)}}


def save(res: dict, args) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


PARTS = {"check": part_check, "prefill": part_prefill, "decode": part_decode,
         "sweep": part_sweep, "crossover": part_crossover}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                 "sparse_attention.json"))
    p.add_argument("--parts", default="check,prefill,decode,sweep,crossover",
                   help=f"comma-separated, from {sorted(PARTS)}")
    p.add_argument("--lengths", default="4096,32768,65536,131072",
                   help="prefill lengths (S = Skv)")
    p.add_argument("--decode-len", type=int, default=131072)
    p.add_argument("--quick", action="store_true", help="4k and 32k prefill, fewer repetitions")
    p.add_argument("--keep-going", action="store_true", help="time even if the check fails")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        args.lengths = [x for x in args.lengths if x <= 32768]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() or not T.AVAILABLE:
        raise SystemExit("needs a CUDA GPU and triton")
    torch.manual_seed(0)
    res = {"environment": environment(), "args": {k: v for k, v in vars(args).items()},
           "dense_rule": {"DENSE_DENSITY": T.DENSE_DENSITY, "DENSE_MAX_KV": T.DENSE_MAX_KV}}
    print(json.dumps(res["environment"]))
    for name in args.parts:
        t = time.perf_counter()
        PARTS[name](res, args)
        res.setdefault("part_seconds", {})[name] = time.perf_counter() - t
        save(res, args)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
