"""Choose SnapKV's pooling kernel on tuning prompts (classic passkey at 4k, SmolLM2-135M).

SnapKV in ``when="prompt"`` mode changes nothing until the prompt ends: the prefill is dense,
then each layer's cache is compacted once with the prompt's last ``window`` queries voting, and
the answer is decoded from the compacted cache. So one dense prefill per prompt serves every
variant: this script prefills with plain transformers (eager, SDPA), records each layer's last
``window`` post-RoPE queries through a registered attention function, then for each variant
copies the cache, keeps the tokens :func:`longfx.kernels.kv_evict.reference.snapkv_scores` /
``snapkv_keep`` choose, and decodes greedily at the original positions. It is an emulation of
the longfx cache (runtime/evict_cache.py) sharing its scoring code; the chosen default is then
measured through the harness (``longfx eval ... --recipe "snapkv(ratio=0.5)"``) on held-out
seeds.

    python benchmarks/tune_snapkv_kernel.py --seeds 0,1 --out benchmarks/results/tuning/snapkv_kernel_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

VARIANTS = [{"kernel": 7}, {"kernel": 11}, {"kernel": 15}, {"kernel": 21},
            {"kernel": 7, "pool": "max"}, {"kernel": 11, "pool": "max"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from longfx import models
    from longfx.eval import data, infer
    from longfx.eval import passkey as P
    from longfx.kernels.kv_evict import reference as R

    torch.set_grad_enabled(False)
    window_q: dict[int, torch.Tensor] = {}

    def recording(module, query, key, value, attention_mask, **kw):
        window_q[module.layer_idx] = query[:, :, -args.window:].clone()   # [B, H, w, D]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("longfx_record_window", recording)
    AttentionMaskInterface.register("longfx_record_window", sdpa_mask)
    model, tok = models.load("smollm2-135m", attn_implementation="longfx_record_window")
    cfg = model.config
    scaling = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) ** -0.5

    def answer(cache, first: int, T: int, variant: dict, qs: dict) -> str:
        budget = math.ceil((1 - args.ratio) * T)
        for i, layer in enumerate(cache.layers):
            sc = R.snapkv_scores(qs[i], layer.keys, scaling, variant["kernel"],
                                 variant.get("pool", "avg"))                # [B, Hkv, T − w]
            idx = R.snapkv_keep(sc, budget, args.window)                    # [B, Hkv, K]
            layer.keys = R.gather_tokens(layer.keys, idx)
            layer.values = R.gather_tokens(layer.values, idx)
        out, nxt = [first], first
        for step in range(P.MAX_NEW - 1):
            k = cache.get_seq_length()
            o = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[T + step]]), cache_position=torch.tensor([k]))
            nxt = int(o.logits[0, -1].argmax())
            out.append(nxt)
        return data.decode(tok, out)

    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    result = {"model": "smollm2-135m", "task": "passkey (classic)", "length": args.length,
              "ratio": args.ratio, "window": args.window, "trials_per_depth": args.trials,
              "environment": infer.environment(torch.device("cpu")), "seeds": {}}
    t0 = time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        prompts = [pr for d in depths for pr in P.prompts(tok, args.length, d, seed, args.trials,
                                                           depths=depths)]
        hits = {json.dumps(v): [] for v in VARIANTS}
        for pr in prompts:
            window_q.clear()
            cache = DynamicCache(config=cfg)
            x = torch.tensor(pr.ids)[None]
            for s in range(0, x.shape[1], infer.DEFAULT_CHUNK):
                o = model(input_ids=x[:, s:s + infer.DEFAULT_CHUNK], past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
            first, qs = int(o.logits[0, -1].argmax()), dict(window_q)
            for v in VARIANTS:
                text = answer(copy.deepcopy(cache), first, x.shape[1], v, qs)
                hits[json.dumps(v)].append({"at": round(pr.depth, 4), "key": pr.answers[0],
                                            "ok": data.first_number(text) == pr.answers[0],
                                            "answer": text.strip()[:16]})
        result["seeds"][seed] = {k: {"acc": sum(h["ok"] for h in v) / len(v), "n": len(v),
                                     "misses": [h for h in v if not h["ok"]]}
                                 for k, v in hits.items()}
        for k, v in result["seeds"][seed].items():
            print(f"seed {seed} {k}: {v['acc']:.0%} of {v['n']} ({time.time() - t0:.0f}s)",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
