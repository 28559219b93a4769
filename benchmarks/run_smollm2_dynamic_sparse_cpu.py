"""Passkey fidelity of the dynamic block-sparse recipes on SmolLM2-135M (CPU, one thread).

    python benchmarks/run_smollm2_dynamic_sparse_cpu.py [--trials 1] [--length 8192]
        [--recipes "block_sparse(...)" "decode_topk(...)"] [--dense]

Rows go to benchmarks/results/smollm2-135m_cpu_dynamic_sparse.jsonl as evaluate() writes them,
followed per recipe by one row (``task: "block_density"``) with the kept / causal block pairs
of every table the recipe built during the run (``longfx.kernels.block_sparse.op.record_density``)
— the measured density, prefill and decode apart.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from longfx.eval import evaluate
from longfx.kernels.block_sparse import op

OUT = Path(__file__).parent / "results" / "smollm2-135m_cpu_dynamic_sparse.jsonl"
RECIPES = ["block_sparse(density=0.1, min_len=0)", "decode_topk(blocks=128, min_len=0)"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0.0,0.25,0.5,0.75,1.0")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--dense", action="store_true", help="also run the dense model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    depths = [float(d) for d in a.depths.split(",")]
    for i, recipe in enumerate(a.recipes):
        t0 = time.perf_counter()
        with op.record_density() as st:
            evaluate("smollm2-135m", recipes=[recipe], tasks=["passkey"], lengths=[a.length],
                     depths=depths, trials=a.trials, seed=0, out=a.out, progress=False,
                     dense=a.dense and i == 0)
        row = {"model": "smollm2-135m", "recipe": recipe, "task": "block_density",
               "length": a.length, "trials": a.trials, "depths": depths,
               "elapsed_s": round(time.perf_counter() - t0, 1), "threads": a.threads,
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
        for kind in ("prefill", "decode"):
            kept, causal, calls = st[kind]
            row[kind] = {"kept_blocks": kept, "causal_blocks": causal, "table_calls": calls,
                         "density": kept / causal if causal else None}
        row["dense_calls"] = st["dense_calls"]
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
