"""``cost``: prefill time, decode time per token, peak memory and KV-state bytes at length N.

Prefill feeds the first N corpus tokens through the cache in chunks (the same path as the
other tasks); decode then runs ``decode_tokens`` (16) greedy steps, timed per token. Peak
memory is ``torch.cuda.max_memory_allocated`` on GPU; on CPU it is the process's peak resident
set (VmHWM) after resetting it through /proc/self/clear_refs where Linux allows, else the
lifetime peak (``peak_mem_kind`` says which). KV bytes count the cache's tensors after prefill
(``kv_bytes``) and after the first decode step (``kv_bytes_decode``): a cache that compresses
at the end of the prompt (SnapKV, which learns the prompt ended when the first one-token call
comes) holds its compressed state only from then on, and that is the state decode runs on.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from . import data, infer

NAME = "cost"


def units(ctx) -> int:
    return len(ctx.lengths)


def _vm(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak(dev) -> str:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return "cuda_max_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "rss_peak"
    except OSError:
        return "rss_peak_lifetime"


def _peak(dev) -> int | None:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return _vm("VmHWM")


def measure(model, ids: torch.Tensor, chunk: int, decode_tokens: int = 16) -> dict:
    dev = infer.device_of(model)
    kind = _reset_peak(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _vm("VmRSS")
    infer.sync(dev)
    t0 = time.perf_counter()
    logits, cache = infer.prefill(model, ids, chunk)
    infer.sync(dev)
    prefill_s = time.perf_counter() - t0
    kv = infer.kv_bytes(cache)
    kv_decode = None
    steps = []
    nxt = int(logits.argmax())
    for _ in range(decode_tokens):
        t = time.perf_counter()
        with torch.no_grad():
            o = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache, use_cache=True)
        cache = o.past_key_values if getattr(o, "past_key_values", None) is not None else cache
        nxt = int(o.logits[0, -1].argmax())
        infer.sync(dev)
        steps.append(time.perf_counter() - t)
        if kv_decode is None:
            kv_decode = infer.kv_bytes(cache)
    decode = sorted(steps[1:] or steps)   # the first step may pay a recompile; median of the rest
    peak = _peak(dev)
    return {"prefill_s": prefill_s, "prefill_tok_s": ids.numel() / prefill_s,
            "decode_s_per_token": decode[len(decode) // 2], "kv_bytes": kv,
            "kv_bytes_decode": kv_decode,
            "peak_mem_bytes": peak, "peak_over_start_bytes": (peak - base) if peak and base else None,
            "peak_mem_kind": kind}


def run(ctx, model) -> Iterator[dict]:
    toks = data.corpus_tokens(ctx.tok)
    steps = int(ctx.options.get("decode_tokens", 16))
    for n in ctx.lengths:
        m = measure(model, toks[:n], ctx.chunk, steps)
        kind = m.pop("peak_mem_kind")
        ctx.tick()
        yield {"task": NAME, "length": n, "n": 1, "decode_tokens": steps, "chunk": ctx.chunk,
               "peak_mem_kind": kind, "metrics": m}
