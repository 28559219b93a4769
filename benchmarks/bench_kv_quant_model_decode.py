"""Whole-model decode steps with ``kv_quant(bits=...)`` through ``longfx.compile``: the lowered
decode (``longfx::kv_quant_attention`` over the packed state, passes/kv_quant_decode.py) vs the
same recipe with ``fuse=false`` (each layer's state dequantized into a transient copy, then
attention) vs the plain model with HF's ``DynamicCache``, run as HF runs it (``dense``: eager
Python) and through ``longfx.compile(model, "")`` (``dense_compiled``: the same Dynamo capture
and canonical ops as the quantized models, no recipe). ``fused_graph``: the lowered step
replayed as a CUDA graph by ``runtime/decode_graph.py`` (``DecodeGraph``; its counters and the
reason it last ran a step normally are in the row). (HF's own
CUDA-graph decode, ``StaticCache`` + ``torch.compile(mode="reduce-overhead")``, was tried
beside it on the H100 on 2026-11-24 and hit Dynamo's recompile limit under ``fullgraph``; it is
not timed here.)

    python benchmarks/bench_kv_quant_model_decode.py --out benchmarks/results/kv_quant_model_decode_h100.json

The model is Llama-3-8B-shaped (hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 14336,
rope theta 500000) with ``--layers`` decoder layers, ``--vocab`` tokens and random weights
(speed does not depend on them), bf16, SDPA attention. Each case (``--cases``, length:batch)
prefills random ids in ``--chunk``-token chunks once into a quantized cache (shared by the
fused and unfused models and the CUDA-graph runner: all read the same state, each step appends one token)
and once into a DynamicCache, then times ``--steps`` greedy decode steps per model in ``--rounds``
alternating rounds (host clock between two synchronizations around each step; median per model). Also
recorded: the peak memory a decode step allocates beyond what was allocated before it (the
unfused path's dequantized copy of one layer), the KV bytes each cache holds, and the largest
relative difference of the fused step's logits from the unfused step's on the same state.
``--device cpu`` with small ``--layers``/``--hidden`` runs the same code as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from bench_kv_quant_decode import parse_cases

from longfx.eval import infer


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.hidden // args.head_dim
    cfg = LlamaConfig(hidden_size=args.hidden, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), head_dim=args.head_dim,
                      intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      vocab_size=args.vocab, max_position_embeddings=262144,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def model_args(p: argparse.ArgumentParser) -> None:
    """The model-shape and prefill options ``build`` and ``prefill`` read (Llama-8B defaults)."""
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mlp", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=8192)


def sync(device: str) -> None:
    infer.sync(torch.device(device))


def prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def step(model, cache, tok: torch.Tensor, device: str,
         events: bool = False) -> tuple[float, torch.Tensor, int]:
    """One decode step: (ms, logits, bytes allocated at peak beyond the start). The ms are the
    host's clock between two synchronizations, or with ``events`` (on CUDA) the time between
    two CUDA events recorded around the call."""
    sync(device)
    base = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if (
        events and device == "cuda") else None
    if ev:
        ev[0].record()
    t0 = time.perf_counter()
    with torch.no_grad():
        if callable(getattr(model, "step", None)):            # a DecodeGraph runner
            logits = model.step(tok)
        else:
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
    if ev:
        ev[1].record()
    sync(device)
    ms = ev[0].elapsed_time(ev[1]) if ev else (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    return ms, logits, peak


def run_case(args, model, length: int, batch: int) -> dict:
    import longfx
    from transformers import DynamicCache

    recipe = args.recipe or f"kv_quant(bits={args.bits})"
    if not (recipe.startswith("kv_quant(") and recipe.endswith(")")):
        raise SystemExit(f"--recipe must be one kv_quant(...) recipe, got {recipe!r}")
    fused = longfx.compile(model, recipe)
    plain = longfx.compile(model, recipe[:-1] + (", " if recipe[-2] != "(" else "") + "fuse=false)")
    g = torch.Generator(device="cpu").manual_seed(length + batch)
    ids = torch.randint(3, args.vocab, (batch, length), generator=g).to(args.device)
    t0 = time.perf_counter()
    qcache = fused.longfx_new_cache()
    tok_q = prefill(fused, ids, qcache, args.chunk)
    dcache = DynamicCache(config=model.config)
    tok_d = prefill(model, ids, dcache, args.chunk)
    canon = longfx.compile(model, "")                  # no recipe: canonical ops only
    ccache = DynamicCache(config=model.config)
    tok_c = prefill(canon, ids, ccache, args.chunk)
    from longfx.runtime.decode_graph import DecodeGraph

    # the lowered step replayed as a CUDA graph, over the same state (it records again if
    # another path's append grows the storage)
    runner = DecodeGraph(fused, qcache, headroom=args.steps * args.rounds * 4 + 64)
    kinds = {"fused": (fused, qcache), "unfused": (plain, qcache), "dense": (model, dcache),
             "dense_compiled": (canon, ccache), "fused_graph": (runner, qcache)}
    toks = {"fused": tok_q, "unfused": tok_q, "dense": tok_d, "dense_compiled": tok_c,
            "fused_graph": tok_q}
    prefill_s = time.perf_counter() - t0
    times, peaks = time_steps(kinds, toks, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    # each step appends, so two paths cannot step from one state: the lowered op is compared
    # with the unfused read + attention on every layer's final state instead
    err = lowering_error(qcache, model, args)
    lowered = sum(s.facts.get("kv_decode") == "fused" for g in fused.longfx_backend.report.graphs
                  for s in g.sites if s.kind == "attention")
    return {"length": length, "batch": batch, "layers": args.layers,
            "bits": None if args.recipe else args.bits, "lowered_sites": lowered,
            "recipe": recipe, "steps": args.steps, "rounds": args.rounds,
            "fused_ms": round(med["fused"], 3), "unfused_ms": round(med["unfused"], 3),
            "dense_ms": round(med["dense"], 3), "dense_compiled_ms": round(med["dense_compiled"], 3),
            "fused_vs_unfused": round(med["unfused"] / med["fused"], 3),
            "fused_vs_dense": round(med["dense"] / med["fused"], 3),
            "fused_vs_dense_compiled": round(med["dense_compiled"] / med["fused"], 3),
            "fused_graph_ms": round(med["fused_graph"], 3),
            "fused_graph_vs_dense_compiled": round(med["dense_compiled"] / med["fused_graph"], 3),
            "graph_runner": {"replays": runner.replays, "captures": runner.captures,
                             "normal_steps": runner.normal_steps, "reason": runner.reason},
            "kv_bytes_dense_compiled": infer.kv_bytes(ccache),
            "step_peak_extra_mb": {k: round(max(v) / 2**20, 1) for k, v in peaks.items()},
            "kv_bytes_quant": infer.kv_bytes(qcache), "kv_bytes_dense": infer.kv_bytes(dcache),
            "max_rel_err_fused_vs_unfused_attention": err, "prefill_s": round(prefill_s, 1),
            "state_tokens": qcache.get_seq_length(), "times_ms": {k: [round(x, 3) for x in v]
                                                        for k, v in times.items()}}


def time_steps(kinds: dict, toks: dict, args, events: bool = False) -> tuple[dict, dict]:
    """``args.warmup`` untimed greedy steps per model (compiles each decode graph), then
    ``args.rounds`` rounds that run ``args.steps`` steps of each model in turn. ``kinds``:
    name -> (model, cache); ``toks``: name -> the next input token, advanced in place. Returns
    per name the step times (ms, :func:`step`; ``events``: CUDA events) and peak extra bytes."""
    times = {k: [] for k in kinds}
    peaks = {k: [] for k in kinds}
    for name, (m, c) in kinds.items():                 # warm up: compiles each decode graph
        for _ in range(args.warmup):
            _, logits, _ = step(m, c, toks[name], args.device)
            toks[name] = logits[:, -1:].argmax(-1)
    for _ in range(args.rounds):
        for name, (m, c) in kinds.items():
            for _ in range(args.steps):
                ms, logits, peak = step(m, c, toks[name], args.device, events)
                times[name].append(ms)
                peaks[name].append(peak)
                toks[name] = logits[:, -1:].argmax(-1)
    return times, peaks


def lowering_error(cache, model, args) -> float:
    """Largest relative difference, over the layers, between ``longfx::kv_quant_attention``
    on a layer's state (what the lowered step runs; rotated around for a rotate=true layer) and attention over the layer's
    dequantized read with its sinks (what the unfused step runs), for a random query."""
    from longfx.kernels.attention import dense
    from longfx.kernels.kv_quant import op as kv_op

    worst = 0.0
    heads = model.config.num_attention_heads
    for layer in cache.layers:
        st = layer.state
        B, _, _, D = st.k_ring.shape
        q = torch.randn(B, heads, 1, D, device=st.k_ring.device, dtype=st.k_ring.dtype)
        rot = getattr(layer, "rot", None)
        if rot is None:
            got = kv_op.ATTENTION(q, *st.tensors(), D ** -0.5, st.config.bits, st.config.group,
                                  layer.sink_k, layer.sink_v)
        else:                      # rotate=true: q·Q and the sink copy ·Q in, out·Qᵀ out
            sinks = [None if x is None else kv_op.ROTATE(x, rot, False)
                     for x in (layer.sink_k, layer.sink_v)]
            got = kv_op.ROTATE(kv_op.ATTENTION(kv_op.ROTATE(q, rot, False), *st.tensors(),
                                               D ** -0.5, st.config.bits, st.config.group,
                                               *sinks), rot, True)
        k, v = layer.read()
        want = dense.sdpa(q.float(), k.float(), v.float(), scale=D ** -0.5)
        worst = max(worst, float((got.float() - want).abs().max() / want.abs().max()))
    return round(worst, 5)


def meta(args) -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": args.device,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["cpu"] = platform.processor() or platform.machine()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="32k:1,128k:1,32k:8")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--recipe", default=None, help="a kv_quant(...) recipe (default: "
                   "kv_quant(bits=BITS)); its fuse=false twin is the unlowered model")
    model_args(p)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = build(args)
    rows = []
    for length, batch in parse_cases(args.cases):
        row = run_case(args, model, length, batch) | {"meta": meta(args)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.out:                                   # after each case: a cut run keeps rows
            with open(args.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
                f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
