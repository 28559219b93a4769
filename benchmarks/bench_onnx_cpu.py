"""onnxruntime CPU speed of SmolLM2-135M exported by longfx, beside torch eager and a plain
``torch.onnx.export(model, dynamo=True)`` of the unrewritten model, measured in one run.

    python benchmarks/bench_onnx_cpu.py [--lengths 512,2048] [--decode 32] [--repeats 3]
        [--threads 1,2] [--recipes ",sink_window(sink=4, window=256)"]
        [--cache /tmp/longfx-bench-onnx]

Per prompt length: prefill time (one forward over the prompt with an empty KV state, logits
for every position in every backend, so the work is the same) and decode ms/token (greedy
single-token steps after that prefill, KV state kept by the backend). Backends are measured
round-robin, ``--repeats`` times each, medians recorded: the machines are shared and noisy.
Each thread count is measured separately, the same for torch (``torch.set_num_threads``) and
onnxruntime (``intra_op_num_threads``, spinning off so that its idle threads do not take the
cores from torch in the same process; on a loaded 2-core machine two OpenMP threads can be
much slower than one, which is why both counts are recorded).
Rows are JSON lines appended to benchmarks/results/onnx_cpu.jsonl with hardware, thread
counts, versions and date; a backend that cannot be built gets a row with its error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "results" / "onnx_cpu.jsonl"
MODEL = "smollm2-135m"


def environment() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    from longfx.eval.infer import cpu_name

    return {"hardware": cpu_name(), "device": "cpu", "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------------------------
# backends: each has prefill(ids) -> state and decode(token, state) -> state


class TorchEager:
    name = "torch-eager"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: np.ndarray):
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            out = self.model(torch.from_numpy(ids), past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), cache, ids.shape[1]

    def decode(self, state):
        token, cache, n = state
        with torch.no_grad():
            out = self.model(token, past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[n]]))
        return out.logits[:, -1].argmax(-1, keepdim=True), cache, n + 1


def session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtLongfx:
    def __init__(self, folder: Path, recipe: str, threads: int):
        from longfx.runtime.ort import ORTModel

        self.m = ORTModel.from_dir(folder, session_options=session_options(threads))
        self.name = "ort-longfx"
        self.recipe = recipe

    def prefill(self, ids: np.ndarray):
        mask = np.ones_like(ids)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, st = self.m.step(ids, mask, pos, self.m.empty_state(1))
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64), st, mask

    def decode(self, state):
        token, st, mask = state
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        pos = np.array([[mask.shape[1] - 1]], np.int64)
        logits, st = self.m.step(token, mask, pos, st)
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64), st, mask


class OrtPlain:
    """``torch.onnx.export(model, dynamo=True)`` of the unrewritten HF model, no KV cache in
    or out: prefill is one forward; a decode step has to recompute the whole sequence."""

    name = "ort-plain-export"
    recipe = ""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), session_options(threads),
                                         providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def _run(self, ids):
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones_like(ids)
        return self.sess.run([self.sess.get_outputs()[0].name], feeds)[0]

    def prefill(self, ids):
        logits = self._run(ids)
        return np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], 1)

    def decode(self, ids):
        logits = self._run(ids)
        return np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], 1)


def plain_export(model, path: Path) -> float:
    """The peer baseline: the model as is, dynamic batch and sequence, no cache."""
    t0 = time.perf_counter()
    ids = torch.randint(0, 1000, (1, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    prog = torch.onnx.export(model, (), kwargs={"input_ids": ids,
                                                "attention_mask": torch.ones_like(ids),
                                                "use_cache": False},
                             dynamo=True, dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                          "attention_mask": {0: batch, 1: seq},
                                                          "use_cache": None})
    prog.save(str(path))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------


def measure(backend, ids: np.ndarray, decode: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    state = backend.prefill(ids)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(decode):
        t0 = time.perf_counter()
        state = backend.decode(state)
        steps.append(time.perf_counter() - t0)
    return prefill, 1e3 * statistics.median(steps) if steps else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="thread counts to measure (each backend)")
    ap.add_argument("--recipes", default=",sink_window(sink=4, window=256)",
                    help="comma-separated recipes exported with longfx ('' = dense)")
    ap.add_argument("--plain-decode", type=int, default=4,
                    help="decode steps for the cache-less plain export (each recomputes all)")
    ap.add_argument("--cache", default="/tmp/longfx-bench-onnx",
                    help="export folders are kept here and reused")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    warnings.filterwarnings("ignore")

    import longfx

    env = environment()
    model, tok = longfx.load(MODEL)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in a.lengths.split(",")]
    rows: list[dict] = []
    exports: dict[str, dict] = {}               # folder -> export facts (export_s, check...)

    folders = []
    for recipe in [r.strip() for r in _split_recipes(a.recipes)]:
        folder = cache / ("dense" if not recipe else "".join(c if c.isalnum() else "_"
                                                             for c in recipe))
        if not (folder / "longfx_onnx.json").exists():
            res = longfx.export_onnx(model, folder, recipe, tokenizer=tok)
            exports[str(folder)] = {"export_s": round(res.timings["total_s"], 1),
                                    "export_timings_s": res.meta["export_timings_s"]}
        else:
            meta = json.loads((folder / "longfx_onnx.json").read_text())
            exports[str(folder)] = {"export_s": meta.get("export_timings_s", {}).get("total_s"),
                                    "export_timings_s": meta.get("export_timings_s"),
                                    "export_reused": True}
        meta = json.loads((folder / "longfx_onnx.json").read_text())
        exports[str(folder)]["check_max_rel_logits_error"] = meta.get("check", {}).get(
            "max_rel_logits_error")
        folders.append((folder, recipe))

    plain_path = cache / "plain" / "model.onnx"
    plain_ok = plain_path.exists()
    if not plain_ok:
        try:
            plain_path.parent.mkdir(parents=True, exist_ok=True)
            exports[str(plain_path)] = {"export_s": round(plain_export(model, plain_path), 1)}
            plain_ok = True
        except Exception as e:  # noqa: BLE001 - the peer baseline failing is a result
            rows.append({"bench": "onnx_cpu", "model": MODEL, "backend": "ort-plain-export",
                         "recipe": "", "error": f"{type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:500]}",
                         "traceback_tail": traceback.format_exc().splitlines()[-3:], **env})
            print(json.dumps(rows[-1]), flush=True)

    rng = np.random.default_rng(0)
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        backends = [TorchEager(model)]
        for folder, recipe in folders:
            b = OrtLongfx(folder, recipe, threads)
            b.facts = exports[str(folder)]
            backends.append(b)
        if plain_ok:
            b = OrtPlain(plain_path, threads)
            b.facts = exports.get(str(plain_path), {})
            backends.append(b)
        for length in lengths:
            ids = rng.integers(100, 40000, (1, length), dtype=np.int64)
            times: dict[int, list[tuple[float, float]]] = {id(b): [] for b in backends}
            for r in range(a.repeats + 1):              # round 0 warms up (not recorded)
                for b in backends:
                    n = a.plain_decode if isinstance(b, OrtPlain) else a.decode
                    p, d = measure(b, ids, n)
                    if r:
                        times[id(b)].append((p, d))
                    print(f"threads={threads} L={length} {b.name} {getattr(b, 'recipe', '')!r} "
                          f"round {r}: prefill {p:.3f} s, decode {d:.1f} ms/token", flush=True)
            for b in backends:
                t = times[id(b)]
                row = {"bench": "onnx_cpu", "model": MODEL, "backend": b.name,
                       "recipe": getattr(b, "recipe", ""), "prompt_tokens": length,
                       "threads": threads,
                       "prefill_s": round(statistics.median(x[0] for x in t), 4),
                       "prefill_s_all": [round(x[0], 4) for x in t],
                       "decode_ms_per_token": round(statistics.median(x[1] for x in t), 2),
                       "decode_ms_all": [round(x[1], 2) for x in t],
                       "decode_steps": a.plain_decode if isinstance(b, OrtPlain) else a.decode,
                       "logits": "all positions",
                       **({"note": "no KV cache: each decode step recomputes the whole "
                                   "sequence"} if isinstance(b, OrtPlain) else {}),
                       **getattr(b, "facts", {}), **env,
                       "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows appended to {out}")


def _split_recipes(text: str) -> list[str]:
    """Split on commas outside parentheses ("" is the dense export)."""
    out, depth, cur = [], 0, ""
    for c in text:
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += (c == "(") - (c == ")")
        cur += c
    out.append(cur)
    return out


if __name__ == "__main__":
    main()
