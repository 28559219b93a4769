"""GPU benchmark of a ``decode_topk`` (Quest) decode step with the bounds kept in the cache,
against dense SDPA over the whole cache and the old path (bounds recomputed from K each step,
one selection per query head), all in one run.

Setting (issue 5's): bf16, B=1, 32 query / 8 KV heads, head dim 128, one query over 32k and
128k keys, keeping 10% of 16-token blocks (sink 16, window 64). Random q/k/v: the timing
depends on how many blocks are kept, not which.

Paths, each captured as a CUDA graph of 10 calls and replayed (median of ``--reps``; launch
overhead out, as ``block_sparse_h100.json``'s ``decode_parts_graph``):

* ``dense_sdpa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` over contiguous
  K/V (HF's DynamicCache layout); ``dense_sdpa_store``: the same over the cache store's view
  (``k_store[:, :, :L]``, capacity beyond L);
* ``new``: the step as a QuestCache model runs it — ``op.update_bounds`` for the appended token
  (one block per KV head), then ``op.forward`` with the kept ``kmin``/``kmax`` and
  ``decode_select="kv_head"``; ``new_attention``: without the update;
* ``old``: ``op.forward`` without bounds and ``decode_select="head"`` (before this change);
* ``kv_head_recomputed``: kv-head selection with the bounds recomputed from K (the path when
  ``decode_topk`` is combined with another KV-cache recipe);
* parts of ``new``: the update, the table (scoring kernel + topk), the table kernel, and a small
  sweep of the table kernel's split count and warps;
* ``model``: a random 2-layer Llama through ``longfx.compile`` (QuestCache, lowering, Triton on
  CUDA), generate() against the same recipe over a cache that keeps no bounds.

Checks on the GPU: kept bounds after the update equal the bounds recomputed from K; the new
table lists the reference's blocks; the new output against the dense-mask reference of the
same table; a budget covering every block against dense SDPA.

    python benchmarks/bench_decode_topk_cache.py --out results/decode_topk_cache_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import traceback

import torch
import torch.nn.functional as F
from cuda_timing import graph_bench, rel


def _g(fn, reps):
    return graph_bench(fn, 3, reps)["median_ms"]


def run_length(a, n: int) -> dict:
    from longfx.kernels.block_sparse import op, reference as R
    from longfx.kernels.block_sparse import triton as QT
    from longfx.kernels.sparse_attention import triton as T

    torch.manual_seed(n)
    H, Hkv, D, bs = a.heads, a.kv_heads, a.head_dim, 16
    cap = n + 1024                                                       # a store with room
    dt = torch.bfloat16
    q = torch.randn(1, H, 1, D, device="cuda", dtype=dt)
    k_store = torch.randn(1, Hkv, cap, D, device="cuda", dtype=dt)
    v_store = torch.randn(1, Hkv, cap, D, device="cuda", dtype=dt)
    k, v = k_store[:, :, :n], v_store[:, :, :n]                          # what the cache returns
    kc, vc = k.contiguous(), v.contiguous()
    kmin, kmax = R.block_bounds(k_store, bs)                             # [1, Hkv, cap/16, D]
    scale = D ** -0.5
    base = dict(op.OFF, decode_block=bs, decode_density=a.density, decode_sink=16,
                decode_window=64, decode_min_len=0)
    new_p, old_p = dict(base, decode_select="kv_head"), dict(base, decode_select="head")
    row = {"length": n, "density_arg": a.density, "bounds_bytes": 2 * kmin[:, :, :-(-n // bs)]
           .numel() * 2, "k_bytes": kc.numel() * 2}

    # ---- checks
    k_store[:, :, n - 1] = torch.randn(1, Hkv, D, device="cuda", dtype=dt)   # the new token
    op.update_bounds(k_store, kmin, kmax, n - 1, n, bs)
    lo, hi = R.block_bounds(k, bs)
    nb = lo.shape[2]
    row["bounds_equal_recomputed"] = bool(torch.equal(kmin[:, :, :nb], lo)
                                          and torch.equal(kmax[:, :, :nb], hi))
    table, full = op.decode_table(q, k, n, bs, 0, a.density, 16, 64, "kv_head", kmin, kmax)
    ref_t = R.decode_table(q, None, bs, 0, a.density, 16, 64, select="kv_head",
                           bounds=(kmin, kmax), skv=n)
    sets = [sorted(table[0, h, 0].tolist()) == sorted(x for x in ref_t[0, h, 0].tolist() if x >= 0)
            for h in range(Hkv)]
    row["table_full"], row["kept_blocks"] = full, int(table.shape[-1])
    row["table_rows_equal_reference"] = sum(sets)
    out = op.forward(q, k, v, None, scale, 0.0, **new_p, kmin=kmin, kmax=kmax)
    want = R.attention_with_table(q.float(), k.float(), v.float(), table, bs, scale)
    row["rel_err_vs_table_reference"] = rel(out, want)
    full_out = op.forward(q, k, v, None, scale, 0.0, **dict(new_p, decode_density=1.0),
                          kmin=kmin, kmax=kmax, dense_fallback=False)
    row["full_budget_rel_err_vs_sdpa"] = rel(full_out, F.scaled_dot_product_attention(
        q, kc, vc, enable_gqa=True, scale=scale))
    old = op.forward(q, k, v, None, scale, 0.0, **old_p)
    row["old_vs_new_rel_diff"] = rel(old, out)                         # different selections
    print(json.dumps(row), flush=True)

    # ---- timings (CUDA graphs)
    g = {}
    g["dense_sdpa"] = _g(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), a.reps)
    g["dense_sdpa_store"] = _g(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                               a.reps)

    def new():
        op.update_bounds(k_store, kmin, kmax, n - 1, n, bs)
        return op.forward(q, k, v, None, scale, 0.0, **new_p, kmin=kmin, kmax=kmax)

    g["new"] = _g(new, a.reps)
    g["new_attention"] = _g(lambda: op.forward(q, k, v, None, scale, 0.0, **new_p, kmin=kmin,
                                               kmax=kmax), a.reps)
    g["old"] = _g(lambda: op.forward(q, k, v, None, scale, 0.0, **old_p), a.reps)
    g["kv_head_recomputed"] = _g(lambda: op.forward(q, k, v, None, scale, 0.0, **new_p), a.reps)
    g["part_update"] = _g(lambda: op.update_bounds(k_store, kmin, kmax, n - 1, n, bs), a.reps)
    g["part_table"] = _g(lambda: QT.kv_decode_table(q, kmin, kmax, n, bs, 0, a.density, 16, 64),
                         a.reps)
    sc = torch.randn(1, Hkv, -(-n // bs), device="cuda")
    g["part_topk"] = _g(lambda: torch.topk(sc, table.shape[-1], dim=-1, sorted=False), a.reps)
    g["part_topk_sorted"] = _g(lambda: torch.topk(sc, table.shape[-1], dim=-1), a.reps)
    g["part_sort_slice"] = _g(lambda: torch.sort(sc, dim=-1, descending=True).indices[
        ..., :table.shape[-1]], a.reps)
    for ns in (None, 16, 64):
        for w in (None, 1, 2):
            try:
                g[f"part_kernel_ns{ns}_w{w}"] = _g(lambda: T.block_sparse_attention(
                    q, k, v, table, bs, scale, table_full=True, num_splits=ns, num_warps=w),
                    a.reps)
            except Exception as e:  # noqa: BLE001 - a config may not compile
                g[f"part_kernel_ns{ns}_w{w}"] = f"{type(e).__name__}: {e}"[:200]
    row["graph_ms"] = g
    row["speedup_new_vs_dense"] = g["dense_sdpa"] / g["new"]
    row["speedup_old_vs_dense"] = g["dense_sdpa"] / g["old"]
    row["speedup_new_vs_old"] = g["old"] / g["new"]
    print(json.dumps(row), flush=True)
    return row


def run_model(a) -> dict:
    """End to end on the GPU: a random 2-layer Llama (bf16, 16 / 4 heads, head dim 64) through
    ``longfx.compile(model, "decode_topk(...)")`` — the QuestCache it swaps in, the lowering,
    the Triton update and table on CUDA — against the same recipe over a cache that keeps no
    bounds (recomputed each step): greedy tokens of a prefill + 8 one-token steps fed without
    an attention mask (as ``longfx.eval.infer.greedy`` feeds them: with transformers 5.17,
    ``generate()``'s decode masks read its ``attention_mask`` and the sparse rules keep such
    steps dense, for any cache), the decode calls that ran sparse, the report's rows."""
    import longfx
    from longfx.kernels.block_sparse import op
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    class PlainCache(DynamicCache):     # not swapped by longfx.compile: no bounds kept
        pass

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=16384, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 1000, (1, a.model_prompt), device="cuda")
    recipe = "decode_topk(density=0.1, min_len=0)"

    def greedy(cache):
        fast = longfx.compile(model, recipe)
        toks, x = [], ids
        with torch.no_grad(), op.record_density() as st:
            for _ in range(9):
                logits = fast(input_ids=x, past_key_values=cache, use_cache=True).logits
                x = logits[:, -1:].argmax(-1)
                toks.append(int(x))
        rows = [r for g in fast.longfx_backend.report.graphs for r in g.results
                if r.rule == "sparse.decode_topk_bounds"]
        return toks, st, rows, fast

    got, st, rows, fast = greedy(longfx.compile(model, recipe).longfx_new_cache())
    plain, st_plain, _, _ = greedy(PlainCache())
    return {"prompt": a.model_prompt, "recipe": recipe, "cache": "QuestCache",
            "decode_calls_sparse": st["decode"][2], "decode_calls_sparse_plain": st_plain["decode"][2],
            "bounds_rule": {s: sum(r.status == s for r in rows) for s in ("rewritten", "rejected")},
            "bounds_rule_reasons": sorted({r.reason for r in rows if r.reason}),
            "tokens": got, "tokens_equal_recomputed_bounds": got == plain,
            "graph_breaks": [w for w in fast.longfx_backend.report.warnings if "graph break" in w]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="decode_topk_cache.json")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model-prompt", type=int, default=4096, help="0: skip the model check")
    a = ap.parse_args(argv)
    res = {"bench": "decode_topk_cache", "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "python": platform.python_version(),
           "args": vars(a), "rows": []}
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time (arguments parsed)")
        res["error"] = "no CUDA device"
    else:
        import triton
        res["gpu"], res["triton"] = torch.cuda.get_device_name(), triton.__version__
        for n in (int(x) for x in a.lengths.split(",")):
            try:
                res["rows"].append(run_length(a, n))
            except Exception as e:  # noqa: BLE001 - keep the other length
                res["rows"].append({"length": n, "error": f"{type(e).__name__}: {e}"[:500]})
                traceback.print_exc()
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
            torch.cuda.empty_cache()
        if a.model_prompt:
            try:
                res["model"] = run_model(a)
            except Exception as e:  # noqa: BLE001 - the op rows stand
                res["model"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
            print(json.dumps(res["model"]), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
