"""Perplexity of a model with a sink + sliding-window mask applied by plain SDPA — an emulation
independent of longfx's rewrite, kernels and chunked cache path — to compare with
``longfx eval --recipe "sink_window(...)"``.

The model's attention is replaced, through transformers' ``AttentionInterface``, by SDPA with
the boolean mask ``j <= i and (j < sink or i - j < window)``; the whole prefix goes through one
forward with ``labels=`` (no cache, no chunks). Same text and tokens as the harness's ``ppl``.

    python benchmarks/emulate_sink_window.py --model smollm2-135m --length 8192 \
        --sink 4 --window 1024 --out row.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out")
    a = p.parse_args(argv)
    import transformers
    from transformers import AttentionInterface

    import longfx
    from longfx.eval import data

    model, tok = longfx.load(a.model)
    ids = data.corpus_tokens(tok)[:a.length][None]

    def sink_window(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        S, T = query.shape[2], key.shape[2]
        g = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)  # [B, H, T, D]
        i = torch.arange(S)[:, None] + (T - S)                                   # [S, 1]
        j = torch.arange(T)[None]                                                # [1, T]
        keep = (j <= i) & ((j < a.sink) | (i - j < a.window))                     # [S, T]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=keep,
                                                               scale=scaling)
        return out.transpose(1, 2).contiguous(), None                            # [B, S, H, D]

    AttentionInterface.register("longfx_emulated_sink_window", sink_window)
    row = {"model": a.model, "length": a.length, "sink": a.sink, "window": a.window,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "date": datetime.date.today().isoformat()}
    for impl in ("sdpa", "longfx_emulated_sink_window"):
        model.config._attn_implementation = impl
        for layer in model.model.layers:
            layer.self_attn.config._attn_implementation = impl
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        row["dense_ppl" if impl == "sdpa" else "emulated_ppl"] = math.exp(loss)
    row["delta"] = row["emulated_ppl"] / row["dense_ppl"] - 1
    print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
