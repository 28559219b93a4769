"""Decode cost of ``streaming_kv`` against dense, and against the re-rotating read it replaced,
side by side in one process (CPU or GPU).

    . .venv/bin/activate
    python benchmarks/bench_streaming_decode.py --length 4096 --sink 4 --window 2044 \\
        --threads 1 --rounds 40 --out benchmarks/results/streaming_decode_cpu.jsonl

Three caches are prefilled with the same ``--length`` corpus tokens (``longfx.eval.data``'s
corpus, the ``cost`` task's tokens) in ``--chunk`` token chunks through the plain model:

* ``dense``: a ``DynamicCache`` (every token);
* ``streaming``: ``streaming_kv(sink, window)`` as it is now (``EvictCache`` with the default
  ``StreamingTensorStore``: a read rotates the sink keys only; decode writes into one buffer);
* ``streaming_rerotate_all``: the read before 2026-11-24, verbatim (plain tensors, every kept
  key re-rotated to its in-cache position on every read:
  ``longfx.rewrite.testing.rerotate_all``, the class tests/runtime/test_evict_streaming_read.py
  checks against).

Then ``--rounds`` rounds of one greedy decode step on each cache, the order rotating every round
(so a slow spell of the shared machine falls on each method in turn); every cache is fed the
same tokens (the streaming cache's greedy choice), and the two streaming caches' logits are
compared at every step. A row per method: median seconds per step; a summary row: the medians
of the per-round ratios. Rows carry ``"bench": "streaming_decode"`` (make_results.py leaves them
out of RESULTS.md's tables).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from longfx.eval.infer import cpu_name

DATE = "2026-11-24"


def rerotate_all_cache(model, sink: int, window: int):
    """An EvictCache whose layers read the way streaming_kv did until 2026-11-24."""
    from longfx.kernels.kv_evict import reference as R
    from longfx.rewrite.testing.rerotate_all import RerotateAllCache

    return RerotateAllCache(R.StreamingConfig(sink, window), model=model)


def git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=2044)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    import transformers

    import longfx
    from longfx.eval import data, infer
    from longfx.recipes import parse

    model, tok = longfx.load(a.model, progress=False)
    model.eval()
    dev = infer.device_of(model)
    ids = data.corpus_tokens(tok)[:a.length]
    recipe = f"streaming_kv(sink={a.sink}, window={a.window})"
    caches = {"dense": None,
              "streaming": parse(recipe).recipes[0].make_cache(model),
              "streaming_rerotate_all": rerotate_all_cache(model, a.sink, a.window)}
    prefill_s, last = {}, {}
    for name, cache in caches.items():
        t = time.perf_counter()
        for _s, lg, cache in infer.chunked_logits(model, ids, a.chunk, cache=cache,
                                                  keep_last=True):
            last[name] = lg[-1]
        infer.sync(dev)
        prefill_s[name] = time.perf_counter() - t
        caches[name] = cache
        print(f"{name}: prefill {prefill_s[name]:.1f} s", flush=True)
    same_prefill = torch.equal(last["streaming"], last["streaming_rerotate_all"])
    kv_bytes = {n: infer.kv_bytes(c) for n, c in caches.items()}

    names = list(caches)
    steps = {n: [] for n in names}
    ratios = {"streaming/dense": [], "streaming_rerotate_all/dense": [],
              "streaming/streaming_rerotate_all": []}
    max_diff, nxt = 0.0, int(last["streaming"].argmax())
    for r in range(a.rounds):
        order = names[r % 3:] + names[:r % 3]
        x = torch.tensor([[nxt]], device=dev)
        logits = {}
        for n in order:
            t = time.perf_counter()
            with torch.no_grad():
                o = model(input_ids=x, past_key_values=caches[n], use_cache=True)
            infer.sync(dev)
            steps[n].append(time.perf_counter() - t)
            logits[n] = o.logits[0, -1]
        d = (logits["streaming"] - logits["streaming_rerotate_all"]).abs().max().item()
        max_diff = max(max_diff, d)
        for k in ratios:
            num, den = k.split("/")
            ratios[k].append(steps[num][-1] / steps[den][-1])
        nxt = int(logits["streaming"].argmax())
    kv_decode = {n: infer.kv_bytes(c) for n, c in caches.items()}

    env = {"model": a.model, "hardware": cpu_name() if dev.type == "cpu"
           else torch.cuda.get_device_name(dev), "device": dev.type, "threads": a.threads,
           "cpus": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "dtype": str(model.dtype), "attn": model.config._attn_implementation, "date": DATE,
           "length": a.length, "chunk": a.chunk, "rounds": a.rounds, "commit": git_commit()}
    rows = []
    for n in names:
        rows.append({"bench": "streaming_decode", "method": n,
                     "spec": recipe if n != "dense" else "DynamicCache",
                     "prefill_s": prefill_s[n], "decode_s_per_token_median":
                     statistics.median(steps[n]), "decode_steps_s": steps[n],
                     "kv_bytes_after_prefill": kv_bytes[n], "kv_bytes_after_decode": kv_decode[n],
                     **env})
    rows.append({"bench": "streaming_decode", "method": "_ratios",
                 "ratios_median_per_round": {k: statistics.median(v) for k, v in ratios.items()},
                 "ratios_quartiles_per_round": {k: statistics.quantiles(v, n=4)
                                                for k, v in ratios.items()},
                 "streaming_vs_rerotate_all_logits_max_abs_diff": max_diff,
                 "streaming_vs_rerotate_all_prefill_logits_equal": same_prefill,
                 "note": "per round, one step of each method in a rotating order; ratio = that "
                         "round's step times; the median over rounds", **env})
    for row in rows:
        if row["method"] == "_ratios":
            print(json.dumps({k: row[k] for k in ("ratios_median_per_round",
                                                  "streaming_vs_rerotate_all_logits_max_abs_diff",
                                                  "streaming_vs_rerotate_all_prefill_logits_equal")}))
        else:
            print(f"{row['method']:24} decode {1000 * row['decode_s_per_token_median']:.1f} ms/token"
                  f"  prefill {row['prefill_s']:.1f} s  kv {row['kv_bytes_after_decode'] / 1e6:.1f} MB")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
