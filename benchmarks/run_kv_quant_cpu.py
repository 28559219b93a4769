"""Record SmolLM2-135M perplexity through the quantized KV cache on CPU (issue 6 fidelity).

    python benchmarks/run_kv_quant_cpu.py [--recipes "kv_quant(bits=4)" ...] [--lengths 4096 8192]

Dense and each ``kv_quant`` recipe are read chunk by chunk (chunk 1024) through their cache:
the dense model through a DynamicCache, the recipe through its QuantizedCache (packed state;
prefill chunks attend the stored past dequantized plus the chunk itself in full precision).
Rows are appended to benchmarks/results/smollm2-135m_cpu_kvquant.jsonl as each finishes.
"""
import argparse
from pathlib import Path

import torch

from longfx.eval import evaluate

OUT = Path(__file__).parent / "results" / "smollm2-135m_cpu_kvquant.jsonl"
RECIPES = ["kv_quant(bits=8)", "kv_quant(bits=4)", "kv_quant(bits=2)"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--lengths", nargs="*", type=int, default=[4096, 8192])
    ap.add_argument("--tasks", default="ppl")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    evaluate("smollm2-135m", a.recipes, tasks=a.tasks.split(","), lengths=a.lengths, seed=0,
             trials=1, chunk=1024, out=a.out, progress=False, dense=not a.no_dense)
