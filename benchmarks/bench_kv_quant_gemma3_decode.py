"""Whole-model decode steps of a Gemma-3-shaped model (5 sliding-window : 1 full layers) with
``kv_quant(bits=...)`` through ``longfx.compile``: the lowered decode (the rule
``kv_quant.fused_decode`` of passes/kv_quant_decode.py; a sliding layer's step becomes
``longfx::kv_quant_attention(..., window=W)``, whose Triton kernel skips the packed tiles before
the window) vs the same recipe with ``fuse=false`` (each layer's state dequantized, then
attention) vs the plain model with HF's ``DynamicCache`` (sliding layers keep their window), run
as HF runs it (``dense``: eager) and through ``longfx.compile(model, "")`` (``dense_compiled``).
The models are compiled once and serve every case.

    python benchmarks/bench_kv_quant_gemma3_decode.py --out benchmarks/results/kv_quant_gemma3_decode_h100.json

The shape is Gemma-3-4B's text model (hidden 2560, 8 query / 4 KV heads, head_dim 256, MLP
10240, sliding window 1024, ``layer_types`` five sliding then one full, rope theta 10k local /
1M global, query_pre_attn_scalar 256) with ``--layers`` decoder layers (12 by default: layers
6 and 12 are full), ``--vocab`` tokens and random weights (speed does not depend on them),
bf16, SDPA attention. The rope is the default one on both layer kinds (the released 4B
checkpoint scales its global rope linearly by 8, which does not change a step's cost).

Reused from ``bench_kv_quant_model_decode.py``: ``prefill`` (the random ids in ``--chunk``-token
chunks), ``time_steps`` (warm-up, then ``--rounds`` alternating rounds of ``--steps`` greedy
steps per model, each synchronized; here timed by CUDA events around the call), the step's
peak extra allocation, ``lowering_error`` (the op against attention over the dequantized read,
per layer, on the final state, without a window) and ``meta``. ``graphs_compiled_in_steps``:
the graphs each compiled model captured during the warm-up and timed steps (a capture inside
the timed steps shows as one slow step in ``times_ms``). No CUDA-graph column:
``runtime/decode_graph.py`` (``DecodeGraph``) refuses caches with sliding-window layers; the
refusal is recorded. Added here: the largest relative difference of the lowered step's logits
from the ``fuse=false`` step's on the same state (two copies of the quantized cache, one step
each with the same token), and the held tokens per layer kind.
``--device cpu`` with small sizes runs the same code as a smoke test.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from bench_kv_quant_decode import parse_cases
from bench_kv_quant_model_decode import lowering_error, meta, model_args, prefill, time_steps

from longfx.eval import infer


def build(args):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    n = args.pattern
    types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
             for i in range(args.layers)]
    cfg = Gemma3TextConfig(
        hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, sliding_window=args.window, layer_types=types,
        query_pre_attn_scalar=args.head_dim, vocab_size=args.vocab,
        max_position_embeddings=262144,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def config_record(model) -> dict:
    c = model.config
    return {k: getattr(c, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "rope_parameters",
        "query_pre_attn_scalar", "vocab_size", "max_position_embeddings", "hidden_activation")} | {
        "dtype": str(next(model.parameters()).dtype), "attn_implementation":
        c._attn_implementation, "weights": "random (_from_config)"}


def compile_models(model, recipe: str) -> dict:
    import longfx

    if not (recipe.startswith("kv_quant(") and recipe.endswith(")")):
        raise SystemExit(f"--recipe must be one kv_quant(...) recipe, got {recipe!r}")
    unfused = recipe[:-1] + (", " if recipe[-2] != "(" else "") + "fuse=false)"
    return {"fused": longfx.compile(model, recipe), "unfused": longfx.compile(model, unfused),
            "dense_compiled": longfx.compile(model, "")}


def logits_error(fused, plain, cache, tok: torch.Tensor) -> float:
    """Largest |fused - unfused| / max |unfused| over one step's logits, each model stepping
    its own copy of ``cache`` with the same token."""
    with torch.no_grad():
        a = fused(input_ids=tok, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        b = plain(input_ids=tok, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    a, b = a.float(), b.float()
    return round(float((a - b).abs().max() / b.abs().max()), 5)


def held_tokens(cache) -> dict:
    """Tokens held per layer, as {"sliding": [...], "full": [...]}."""
    out = {"sliding": [], "full": []}
    for layer in cache.layers:
        out["full" if getattr(layer, "window", None) is None else "sliding"].append(layer.length)
    return out


def run_case(args, model, models: dict, length: int, batch: int) -> dict:
    from transformers import DynamicCache

    from longfx.runtime.decode_graph import DecodeGraph, DecodeGraphError

    fused, plain, canon = models["fused"], models["unfused"], models["dense_compiled"]
    g = torch.Generator(device="cpu").manual_seed(length + batch)
    ids = torch.randint(3, args.vocab, (batch, length), generator=g).to(args.device)
    t0 = time.perf_counter()
    qcache = fused.longfx_new_cache()
    tok_q = prefill(fused, ids, qcache, args.chunk)
    dcache = DynamicCache(config=model.config)
    tok_d = prefill(model, ids, dcache, args.chunk)
    ccache = DynamicCache(config=model.config)
    tok_c = prefill(canon, ids, ccache, args.chunk)
    prefill_s = time.perf_counter() - t0
    try:                                   # the CUDA-graph runner: expected to refuse
        DecodeGraph(fused, qcache, headroom=args.steps * args.rounds * 4 + 64)
        graph = "accepted (not timed here)"
    except DecodeGraphError as e:
        graph = f"refused: {e}"
    kinds = {"fused": (fused, qcache), "unfused": (plain, qcache), "dense": (model, dcache),
             "dense_compiled": (canon, ccache)}
    toks = {"fused": tok_q, "unfused": tok_q, "dense": tok_d, "dense_compiled": tok_c}
    graphs = {k: len(m.longfx_backend.report.graphs) for k, m in models.items()}
    t1 = time.perf_counter()
    times, peaks = time_steps(kinds, toks, args, events=True)
    steps_s = time.perf_counter() - t1
    med = {k: statistics.median(v) for k, v in times.items()}
    err_logits = logits_error(fused, plain, qcache, toks["fused"])
    err_attn = lowering_error(qcache, model, args)
    sites = [s for gr in fused.longfx_backend.report.graphs for s in gr.sites
             if s.kind == "attention" and s.facts.get("kv_decode") == "fused"]
    windows = sorted({s.facts.get("kv_decode_window") or 0 for s in sites})
    return {"length": length, "batch": batch, "layers": args.layers, "recipe": args.recipe,
            "lowered_sites": len(sites), "lowered_windows": windows,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "fused_ms": round(med["fused"], 3), "unfused_ms": round(med["unfused"], 3),
            "dense_ms": round(med["dense"], 3),
            "dense_compiled_ms": round(med["dense_compiled"], 3),
            "fused_vs_unfused": round(med["unfused"] / med["fused"], 3),
            "fused_vs_dense": round(med["dense"] / med["fused"], 3),
            "fused_vs_dense_compiled": round(med["dense_compiled"] / med["fused"], 3),
            "fused_graph": graph,
            "kv_bytes_quant": infer.kv_bytes(qcache),
            "kv_bytes_quant_held_as_bf16": qcache.dense_nbytes(),
            "kv_bytes_dense": infer.kv_bytes(dcache),
            "kv_bytes_dense_compiled": infer.kv_bytes(ccache),
            "held_tokens_quant": held_tokens(qcache),
            "step_peak_extra_mb": {k: round(max(v) / 2**20, 1) for k, v in peaks.items()},
            "max_rel_err_logits_fused_vs_unfused": err_logits,
            "max_rel_err_fused_vs_unfused_attention": err_attn,
            "graphs_compiled_in_steps": {k: len(m.longfx_backend.report.graphs) - graphs[k]
                                         for k, m in models.items()},
            "prefill_s": round(prefill_s, 1), "steps_s": round(steps_s, 1),
            "state_tokens": qcache.get_seq_length(),
            "times_ms": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="32k:1,128k:1")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--recipe", default=None, help="a kv_quant(...) recipe (default: "
                   "kv_quant(bits=BITS)); its fuse=false twin is the unlowered model")
    model_args(p)                          # --layers --hidden --head-dim --mlp --vocab --chunk
    p.set_defaults(layers=12, hidden=2560, head_dim=256, mlp=10240)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--pattern", type=int, default=6, help="every PATTERN-th layer is full")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.recipe = args.recipe or f"kv_quant(bits={args.bits})"
    model = build(args)
    t0 = time.perf_counter()
    models = compile_models(model, args.recipe)
    head = {"meta": meta(args), "config": config_record(model),
            "timing": "median ms per decode step, CUDA events around each step's call (host "
                      "clock between synchronizations on CPU); the models take turns, "
                      f"{args.rounds} rounds of {args.steps} steps each after {args.warmup} "
                      "warm-up steps"}
    rows = []
    for length, batch in parse_cases(args.cases):
        try:
            row = run_case(args, model, models, length, batch)
        except Exception as e:  # noqa: BLE001 - a failed case is recorded, the next runs
            row = {"length": length, "batch": batch, "error": f"{type(e).__name__}: {e}"[:2000]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.out:                                   # after each case: a cut run keeps rows
            with open(args.out, "w") as f:
                json.dump(head | {"wall_s": round(time.perf_counter() - t0, 1), "rows": rows},
                          f, indent=1)
                f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
