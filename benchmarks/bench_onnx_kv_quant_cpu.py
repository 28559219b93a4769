"""SmolLM2-135M exported with ``kv_quant(...)``: perplexity read through the quantized state in
onnxruntime, against the same recipe's runtime cache in torch and against the dense export;
the state's bytes; decode speed.

    python benchmarks/bench_onnx_kv_quant_cpu.py [--recipe "kv_quant(bits=4)"] [--tokens 4096]
        [--chunk 1024] [--decode 16] [--threads 1] [--cache /tmp/longfx-bench-onnx-kv]

Perplexity is the harness's (``longfx eval --task ppl``: the first ``--tokens`` tokens of
CPython's ``pydoc_data.topics``, read in ``--chunk``-token chunks through the KV state, every
position scored). Three readers of the same tokens: the dense ONNX export, the ``--recipe``
ONNX export (its state quantized inside the graph, carried by onnxruntime between chunks), and
the HF model in torch with the recipe's own ``QuantizedCache`` (what ``longfx.compile`` runs).
The exported state's bytes after the last chunk are summed over its OrtValues, beside the dense
export's. Decode: ``--decode`` greedy steps after the prefill, median ms per step, both exports
on ``--threads`` onnxruntime threads. A JSON line goes to
benchmarks/results/onnx_kv_quant_cpu.jsonl with the hardware, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "results" / "onnx_kv_quant_cpu.jsonl"
MODEL = "smollm2-135m"


def environment() -> dict:
    import onnxruntime
    import transformers

    from longfx.eval.infer import cpu_name

    return {"hardware": cpu_name(), "device": "cpu", "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def export(model, tok, recipe: str, folder: Path):
    """The export in ``folder`` (made once; reused when its JSON names the same recipe)."""
    from longfx.runtime.onnx_export import META_FILE, export_onnx

    meta = folder / META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("recipe") == recipe:
        return None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, folder, recipe, tokenizer=tok)
    return time.perf_counter() - t0


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of ``targets`` under ``logits`` [n, V] (float64)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return lse - x[np.arange(len(targets)), targets]


def ort_read(ort_model, ids: np.ndarray, chunk: int, decode: int):
    """(ppl, state bytes, prefill s, decode ms per step): the chunked pass, then greedy steps."""
    n = ids.size
    state = ort_model.empty_state(1)
    losses, t0 = [], time.perf_counter()
    for s in range(0, n, chunk):
        part = ids[s:s + chunk][None]
        mask = np.ones((1, s + part.shape[1]), np.int64)
        pos = np.arange(s, s + part.shape[1], dtype=np.int64)[None]
        logits, state = ort_model.step(part, mask, pos, state)
        tgt = ids[s + 1:s + 1 + part.shape[1]]
        losses.append(nll(logits[0, :tgt.size], tgt))
    prefill_s = time.perf_counter() - t0
    nbytes = sum(v.numpy().nbytes for v in state)
    token, times = np.array([[int(logits[0, -1].argmax())]]), []
    for i in range(decode):
        mask = np.ones((1, n + i + 1), np.int64)
        t1 = time.perf_counter()
        logits, state = ort_model.step(token, mask, np.array([[n + i]]), state)
        times.append(time.perf_counter() - t1)
        token = np.array([[int(logits[0, -1].argmax())]])
    mean = float(np.concatenate(losses).mean())
    return math.exp(mean), nbytes, prefill_s, 1e3 * statistics.median(times)


def torch_read(model, recipe, ids: torch.Tensor, chunk: int) -> float:
    """Perplexity through the recipe's runtime cache in torch (HF eager model), read as
    ``longfx eval --task ppl`` reads it."""
    from longfx.eval.ppl import nll_stream
    from longfx.passes.kv_quant import cache_recipe
    from longfx.recipes import parse

    cache = cache_recipe(parse(recipe)).make_cache(model)
    with torch.no_grad():
        return math.exp(float(nll_stream(model, ids, chunk, cache=cache).mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="kv_quant(bits=4)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="/tmp/longfx-bench-onnx-kv")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    import onnxruntime as ort

    import longfx
    from longfx.eval import data
    from longfx.runtime.ort import ORTModel

    env = environment()
    torch.set_num_threads(args.threads)
    model, tok = longfx.load(MODEL)
    ids = data.corpus_tokens(tok)[:args.tokens]
    row = {"bench": "onnx_kv_quant_cpu", "model": MODEL, "recipe": args.recipe, "tokens": args.tokens, "chunk": args.chunk,
           "threads": args.threads, "data": data.CORPUS_NAME, **env}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    cache = Path(args.cache)
    for name, recipe in (("dense", ""), ("quantized", args.recipe)):
        t = export(model, tok, recipe, cache / name)
        if t is not None:
            row[f"{name}_export_s"] = round(t, 1)
        m = ORTModel.from_dir(cache / name, session_options=opts)
        ppl, nbytes, prefill_s, decode_ms = ort_read(m, ids.numpy(), args.chunk, args.decode)
        row[name] = {"ppl_onnx": ppl, "state_bytes": nbytes, "prefill_s": round(prefill_s, 2),
                     "decode_ms": round(decode_ms, 2)}
        print(name, row[name], flush=True)
    t0 = time.perf_counter()
    row["quantized"]["ppl_torch_runtime_cache"] = torch_read(model, args.recipe, ids, args.chunk)
    row["torch_runtime_s"] = round(time.perf_counter() - t0, 1)
    q, d = row["quantized"], row["dense"]
    row["state_ratio"] = q["state_bytes"] / d["state_bytes"]
    row["ppl_vs_dense"] = q["ppl_onnx"] / d["ppl_onnx"] - 1
    row["ppl_onnx_vs_torch"] = q["ppl_onnx"] / q["ppl_torch_runtime_cache"] - 1
    print(json.dumps(row, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
