"""GPU benchmark of dynamic block-sparse prefill (``block_sparse``) and Quest decode
(``decode_topk``): ``longfx::block_sparse_attention`` INCLUDING the on-device estimation and
table build, against dense ``F.scaled_dot_product_attention``.

Setting (the project issue's): bf16, B=1, 32 query / 8 kv heads, head dim 128, prefill at
128k (``--quick``: 32k) with density ~10%, decode (S = 1) at 128k keeping 10% of 16-token
blocks. Target: block_sparse at 128k ≥ 6× faster than dense causal SDPA, estimation included.

Parts (each in its own try/except; the JSON is rewritten after each, so a cut run keeps what
it measured):

* ``check``: at 4k, the table kernel's output vs the dense-mask reference of the same table;
* ``prefill``: per block size (64, 128) — estimation + table build alone, the kernel on a
  prebuilt table, the whole op (``op.forward``: both), dense causal SDPA; the measured density;
* ``decode``: Quest table + kernel vs dense SDPA over the whole cache, with its parts (the
  bounds by the reference and by the Triton kernel, the selection, the table kernel) and a
  CUDA-graph replay of both.

Random q/k/v have no structure, so the tables are arbitrary — the timing does not depend on
which blocks are kept, only on how many. Timing: CUDA events, warm-up, median of N.

    python benchmarks/bench_block_sparse.py --out results/block_sparse_h100.json
    python benchmarks/bench_block_sparse.py --quick --out r.json      # 32k, fewer reps
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import traceback

import torch
import torch.nn.functional as F
from cuda_timing import graph_bench, median_ms


def _time(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    return median_ms(fn, warmup, reps)


def _qkv(S, Skv, H, Hkv, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, H, S, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, Skv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, Skv, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def part_check(a, res):
    from longfx.kernels.block_sparse import op, reference as R
    q, k, v = _qkv(4096, 4096, 8, 2, a.head_dim, torch.bfloat16, 1)
    table = R.prefill_table(q, k, 64, density=0.1, sink=64, window=128)
    out = op.attend_table(q, k, v, table, 64, a.head_dim ** -0.5, 0.0, None)
    ref = R.attention_with_table(q.float(), k.float(), v.float(), table, 64)
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    res["check"] = {"rel_err_vs_reference": err, "ok": err < 3e-2}


def part_prefill(a, res):
    from longfx.kernels.block_sparse import op, reference as R
    n = a.length
    q, k, v = _qkv(n, n, a.heads, a.kv_heads, a.head_dim, torch.bfloat16)
    scale = a.head_dim ** -0.5
    rows = res.setdefault("prefill", [])
    dense = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True), a.reps)
    for block in a.blocks:
        row = {"length": n, "block": block, "density_arg": a.density, "dense_sdpa_ms": dense}
        table = None
        try:
            params = dict(op.OFF, block=block, density=a.density, sink=64, window=block * 2,
                          min_len=0)

            def build():
                return R.prefill_table(q, k, block, 0, a.density, 64, block * 2, "pooled",
                                       64, scale)
            table = build()
            kept, causal = R.table_counts(table, n, n, block)
            row["density_measured"] = kept / causal
            row["estimate_ms"] = _time(build, a.reps)
            row["kernel_ms"] = _time(lambda: op.attend_table(q, k, v, table, block, scale, 0.0,
                                                             None), a.reps)
            row["total_ms"] = _time(lambda: op.forward(q, k, v, None, scale, 0.0, **params),
                                    a.reps)
            row["speedup_vs_dense"] = dense / row["total_ms"]
            row["ideal_ms"] = dense * row["density_measured"]
        except Exception as e:  # noqa: BLE001 - one failing block size must not end the run
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del table
        torch.cuda.empty_cache()


def part_decode(a, res):
    from longfx.kernels.block_sparse import op, reference as R
    n = a.length
    q, k, v = _qkv(1, n, a.heads, a.kv_heads, a.head_dim, torch.bfloat16, 2)
    scale = a.head_dim ** -0.5
    params = dict(op.OFF, decode_block=16, decode_density=0.1, decode_sink=16,
                  decode_window=64, decode_min_len=0)
    row = {"length": n, "decode_density_arg": 0.1}
    row["dense_sdpa_ms"] = _time(lambda: F.scaled_dot_product_attention(q, k, v,
                                                                       enable_gqa=True), a.reps)
    row["total_ms"] = _time(lambda: op.forward(q, k, v, None, scale, 0.0, **params), a.reps)
    row["speedup_vs_dense"] = row["dense_sdpa_ms"] / row["total_ms"]
    # the parts: Quest bounds (reference torch vs the one-pass Triton kernel), the selection,
    # the table kernel
    row["bounds_reference_ms"] = _time(lambda: R.quest_scores(q, k, 16), a.reps)
    row["bounds_ms"] = _time(lambda: op.quest_scores(q, k, 16), a.reps)
    sc = op.quest_scores(q, k, 16)
    ref = R.quest_scores(q, k, 16)
    row["bounds_rel_err_vs_reference"] = float((sc - ref).abs().max() / ref.abs().max())
    row["select_ms"] = _time(lambda: R.decode_table(q, k, 16, 0, 0.1, 16, 64, scores=sc),
                             a.reps)
    table = R.decode_table(q, k, 16, 0, 0.1, 16, 64, scores=sc)
    row["same_table_as_reference"] = bool(torch.equal(
        table, R.decode_table(q, k, 16, 0, 0.1, 16, 64, scores=ref)))
    row["kernel_ms"] = _time(lambda: op.attend_table(q, k, v, table, 16, scale, 0.0, None),
                             a.reps)
    kept, causal = R.table_counts(table, 1, n, 16)
    row["density_measured"] = kept / causal
    # CUDA-graph replay of the whole op and of dense SDPA: launch overhead out
    try:
        row["graph_total_ms"] = graph_bench(lambda: op.forward(q, k, v, None, scale, 0.0,
                                                               **params), 2, a.reps)["median_ms"]
        row["graph_dense_sdpa_ms"] = graph_bench(lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True), 2, a.reps)["median_ms"]
        row["graph_speedup_vs_dense"] = row["graph_dense_sdpa_ms"] / row["graph_total_ms"]
    except Exception as e:  # noqa: BLE001 - capture can fail; the eager numbers stand
        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    res["decode"] = row
    print(json.dumps(row), flush=True)


PARTS = {"check": part_check, "prefill": part_prefill, "decode": part_decode}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="block_sparse.json")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="32k, 3 reps")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    if a.quick:
        a.length, a.reps = min(a.length, 32768), 3
    a.blocks = [int(b) for b in a.blocks.split(",")]
    res = {"bench": "block_sparse", "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "python": platform.python_version(),
           "args": {k: v for k, v in vars(a).items()}}
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time (arguments parsed)")
        res["error"] = "no CUDA device"
    else:
        res["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            res["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            res["triton"] = None
        for name in a.parts.split(","):
            try:
                PARTS[name](a, res)
            except Exception as e:  # noqa: BLE001 - keep the other parts
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
