"""Record SmolLM2-135M perplexity through the quantized KV cache on CPU (issue 6 fidelity).

    python benchmarks/run_kv_quant_cpu.py [--recipes "kv_quant(bits=4)" ...] [--lengths 4096 8192]

Dense and each ``kv_quant`` recipe are read chunk by chunk (chunk 1024) through their cache:
the dense model through a DynamicCache, the recipe through its QuantizedCache (packed state;
prefill chunks attend the stored past dequantized plus the chunk itself in full precision).
Rows are appended to benchmarks/results/smollm2-135m_cpu_kvquant.jsonl as each finishes.

``--eager``: run the plain (uncompiled) model with the recipe's own cache passed in (label
"<recipe> [QuantizedCache, eager model]"): the same cache and the same logits as the compiled
path (tests/passes/test_kv_quant.py checks compiled == eager), without its ~84 s per 1024-token
chunk on this CPU.
"""
import argparse
import copy
from pathlib import Path

import torch

from longfx import recipes as recipes_mod
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
    ap.add_argument("--eager", action="store_true",
                    help="plain model + the recipe's cache instead of longfx.compile")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    todo = a.recipes
    if a.eager:
        todo = []
        for text in a.recipes:
            (recipe,) = recipes_mod.parse(text).recipes

            def plain_with_cache(model, recipe=recipe):
                m = copy.copy(model)                   # shares the weights; only the cache differs
                m.longfx_new_cache = lambda: recipe.make_cache(model)
                return m
            cache = type(recipe.make_cache()).__name__
            todo.append((f"{recipe} [{cache}, eager model]", plain_with_cache))
    evaluate("smollm2-135m", todo, tasks=a.tasks.split(","), lengths=a.lengths, seed=0,
             trials=1, chunk=1024, out=a.out, progress=False, dense=not a.no_dense)
