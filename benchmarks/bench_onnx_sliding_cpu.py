"""Gemma-3-270M exported to ONNX with its sliding layers trimmed to their window, against the
same export keeping every token in every layer (the layout before 2026-11-25), in one run.

    python benchmarks/bench_onnx_sliding_cpu.py [--length 4096] [--decode 16] [--threads 1]
        [--cache /tmp/longfx-bench-onnx-sliding]

Gemma 3 has 15 sliding layers (window 512) and 3 global ones in its 18. ``export_onnx`` now
keeps a sliding layer's state at its last window − 1 tokens, as transformers'
``DynamicSlidingWindowLayer`` does; the "whole" export is made by the same code with the
windows switched off (``layer_windows`` patched to report none), which is exactly the former
layout: every layer's past grows with the context and the window is only the mask's.

Per export: the time to export, the prompt's prefill in ``--chunk``-token calls (``--length``
tokens of CPython's ``pydoc_data.topics``), then ``--decode`` greedy steps (ms per token, median), the
state's bytes after the prefill (read off the ORT values), and the logits of both exports
against each other (prefill, last position, and the greedy tokens). The two are measured
alternately, ``--repeats`` times, medians. One JSON line is appended to
benchmarks/results/onnx_sliding_cpu.jsonl with hardware, versions and date.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "onnx_sliding_cpu.jsonl"
MODEL = "gemma3-270m"


@contextlib.contextmanager
def whole_state():
    """Export every layer's whole past: the windows reported as none."""
    from longfx.runtime import cache

    real = cache.layer_windows
    cache.layer_windows = lambda config, chunked=True: [None] * len(real(config))
    try:
        yield
    finally:
        cache.layer_windows = real


def export(model, tok, folder: Path, whole: bool) -> float:
    from longfx.runtime.onnx_export import export_onnx

    t0 = time.perf_counter()
    with warnings.catch_warnings(), (whole_state() if whole else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        export_onnx(model, folder, "", tokenizer=tok)
    return time.perf_counter() - t0


def run(ort_model, ids: np.ndarray, decode: int, chunk: int) -> dict:
    """Prefill in ``chunk``-token calls, then ``decode`` greedy steps: times, state bytes,
    logits. (Gemma 3's vocabulary is 262k: logits of a 4096-token call would take 4 GB.)"""
    state = ort_model.empty_state(1)
    t0 = time.perf_counter()
    for i in range(0, ids.shape[1], chunk):
        mask = np.ones((1, min(i + chunk, ids.shape[1])), np.int64)
        pos = np.arange(i, mask.shape[1], dtype=np.int64)[None]
        logits, state = ort_model.step(ids[:, i:i + chunk], mask, pos, state)
    prefill = time.perf_counter() - t0
    nbytes = sum(int(np.prod(v.shape())) * 4 for v in state)   # fp32 state
    last = logits[:, -1].copy()
    tokens, steps = [], []
    for _ in range(decode):
        nxt = last.argmax(-1).astype(np.int64)[:, None]
        tokens.append(int(nxt[0, 0]))
        mask = np.concatenate([mask, np.ones_like(nxt)], 1)
        pos = np.array([[mask.shape[1] - 1]], np.int64)
        t0 = time.perf_counter()
        out, state = ort_model.step(nxt, mask, pos, state)
        steps.append(time.perf_counter() - t0)
        last = out[:, -1]
    return {"prefill_s": prefill, "decode_ms": 1000 * statistics.median(steps),
            "state_bytes": nbytes, "logits": logits[0, -1], "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/longfx-bench-onnx-sliding")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import longfx
    from longfx.eval import data
    from longfx.eval.infer import cpu_name
    from longfx.runtime.ort import ORTModel

    model, tok = longfx.load(MODEL)
    ids = np.asarray(data.corpus_tokens(tok)[:args.length], np.int64)[None]
    if ids.shape[1] < args.length:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens")
    cache = Path(args.cache)
    secs = {}
    for kind in ("trimmed", "whole"):
        secs[kind] = export(model, tok, cache / kind, whole=kind == "whole")
        print(f"export {kind}: {secs[kind]:.0f} s", flush=True)
    sessions = {k: ORTModel.from_dir(cache / k, threads=args.threads)
                for k in ("trimmed", "whole")}
    runs: dict[str, list[dict]] = {"trimmed": [], "whole": []}
    for r in range(args.repeats):
        for kind in ("trimmed", "whole") if r % 2 == 0 else ("whole", "trimmed"):
            runs[kind].append(run(sessions[kind], ids, args.decode, args.chunk))
            print(kind, {k: v for k, v in runs[kind][-1].items()
                         if k not in ("logits", "tokens")}, flush=True)
    a, b = runs["trimmed"][0], runs["whole"][0]
    diff = float(np.abs(a["logits"] - b["logits"]).max() / np.abs(b["logits"]).max())
    med = {k: {m: statistics.median(x[m] for x in runs[k]) for m in
               ("prefill_s", "decode_ms", "state_bytes")} for k in runs}
    import onnxruntime
    import torch
    import transformers
    row = {
        "bench": "onnx_sliding_cpu", "model": MODEL, "length": args.length,
        "chunk": args.chunk, "data": data.CORPUS_NAME,
        "decode_steps": args.decode, "repeats": args.repeats, "threads": args.threads,
        "export_s": {k: round(v, 1) for k, v in secs.items()},
        "trimmed": {k: round(v, 4) for k, v in med["trimmed"].items()},
        "whole": {k: round(v, 4) for k, v in med["whole"].items()},
        "decode_speedup": round(med["whole"]["decode_ms"] / med["trimmed"]["decode_ms"], 3),
        "state_ratio": round(med["trimmed"]["state_bytes"] / med["whole"]["state_bytes"], 4),
        "prefill_ratio": round(med["trimmed"]["prefill_s"] / med["whole"]["prefill_s"], 3),
        "last_logits_rel_diff": diff,
        "greedy_tokens_equal": a["tokens"] == b["tokens"],
        "hardware": cpu_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
