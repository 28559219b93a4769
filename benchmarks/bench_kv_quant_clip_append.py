"""Time a decode-step append of the clip-searching 2-bit KV cache: ``reference.append`` (plain
torch, what ``longfx::kv_quant_append(..., clip=True)`` runs today) vs the Triton
``triton_clip.append_clip``; and check, at that size, that the two give the same state.

    python benchmarks/bench_kv_quant_clip_append.py \
        --out benchmarks/results/kv_quant_clip_append_h100.json

The state is the recipe ``kv_quant(bits=2, clip=true, key_bits=4)``'s (2-bit values, 4-bit
keys, group 64, residual 128, u8 scales; ``rotate`` is the caller's and does not change the
append), B=1, 8 kv heads, D=128, bf16, holding ``--length`` tokens (32k). Appends of ``s``
tokens (``--chunks``, 1 and 1024) are timed with CUDA events around each call, the length
reset to the same value before each (outside the timed region), medians of ``--reps``:

* s=1 is timed at two lengths: one where the token only goes to the ring (``ring``: 63 of 64
  decode steps) and one where a whole group also leaves the ring and is quantized with the
  search (``pack``); ``per_step_ms`` is their mean over a cycle of ``group`` steps,
  (63·ring + pack) / 64. s=1024 packs 16 groups.
* ``graph10_ms``: the Triton append only (the reference syncs with the host to read the
  length and cannot be captured): 10 consecutive appends captured in one CUDA graph and
  replayed, time per append (for s=1 the 10 steps cross one group boundary at most).

``exact``: the two appends' states after filling ``--length`` random tokens (keys with an
outlier channel and rare huge tokens, values with large entries) in chunks of 1024, then
``--tail`` one-token appends: how many key / value groups' params and how many code bytes
differ (0 is bit-exact; the kernel's docstring says where near-ties could differ).
"""
from __future__ import annotations

import argparse
import statistics

import torch
from cuda_timing import gpu_meta, save_json

from longfx.kernels.kv_quant import reference as R
from longfx.kernels.kv_quant import triton_clip as TC


def _data(B, H, n, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g, device="cuda")
    k[..., 1] += 4.0                                    # an outlier channel
    k[:, :, 5::23, 3] *= 25.0                           # rare huge tokens
    v = torch.randn(B, H, n, D, generator=g, device="cuda")
    v[:, :, 3::7, D // 2] *= 30.0
    return k.to(dtype), v.to(dtype)


def _timed(fn, reset, reps: int) -> list[float]:
    """CUDA-event milliseconds of fn() over reps calls, reset() (untimed) before each."""
    out = []
    for _ in range(reps):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _median(fn, reset, warmup: int, reps: int) -> float:
    _timed(fn, reset, warmup)
    return statistics.median(_timed(fn, reset, reps))


def _graph10(state, k, v, length: int, warmup: int, reps: int) -> float:
    """Per-append ms of 10 Triton appends captured in one CUDA graph, replayed (length reset
    before each replay)."""
    def reset():
        state.length.fill_(length)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            reset()
            TC.append_clip(state, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            TC.append_clip(state, k, v)
    return _median(graph.replay, reset, warmup, reps) / 10


def _diff(a: R.QuantizedKV, b: R.QuantizedKV) -> dict:
    c, L = a.config, int(a.length)
    n, g = R.n_packed(L, c), c.group
    kp = (a.k_params[:, :, :n // g] != b.k_params[:, :, :n // g]).any(-2)   # [B, H, n/g, D]
    vp = (a.v_params[:, :, :n] != b.v_params[:, :, :n]).any(-2)             # [B, H, n, Jv]
    return {"length": L, "key_groups": kp.numel(), "key_groups_differ": int(kp.sum()),
            "value_groups": vp.numel(), "value_groups_differ": int(vp.sum()),
            "k_code_bytes_differ": int((a.k_codes != b.k_codes).sum()),
            "v_code_bytes_differ": int((a.v_codes != b.v_codes).sum()),
            "ring_and_length_equal": all(torch.equal(getattr(a, x), getattr(b, x))
                                         for x in ("k_ring", "v_ring", "length")),
            "identical": all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--length", type=int, default=32768, help="tokens the state holds")
    ap.add_argument("--chunks", default="1,1024", help="append sizes s to time")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tail", type=int, default=130, help="one-token appends after the fill "
                    "in the exactness check")
    args = ap.parse_args()
    B, H, D, dtype = 1, args.kv_heads, args.dim, torch.bfloat16
    c = R.KVQuantConfig(bits=2, group=64, residual=128, clip=True, key_bits=4)
    chunks = [int(s) for s in args.chunks.split(",")]
    cap = args.length + 10 * max(chunks) + args.tail + 2 * c.group   # graph10: 10 appends

    # exactness at size: the same tokens through both appends
    k, v = _data(B, H, args.length + args.tail, D, dtype, seed=0)
    ref = R.QuantizedKV.empty(B, H, D, cap, c, dtype, "cuda")
    tri = R.QuantizedKV.empty(B, H, D, cap, c, dtype, "cuda")
    for t in range(0, args.length, 1024):
        R.append(ref, k[:, :, t:t + 1024], v[:, :, t:t + 1024])
        TC.append_clip(tri, k[:, :, t:t + 1024], v[:, :, t:t + 1024])
    for t in range(args.length, args.length + args.tail):
        R.append(ref, k[:, :, t:t + 1], v[:, :, t:t + 1])
        TC.append_clip(tri, k[:, :, t:t + 1], v[:, :, t:t + 1])
    torch.cuda.synchronize()
    exact = _diff(tri, ref)
    print("exact:", exact)

    # timing: states holding args.length tokens (or just short of a group boundary)
    rows = []
    for s in chunks:
        kn, vn = _data(B, H, s, D, dtype, seed=s)
        # ring: n_packed(L + 1) == n_packed(L); pack: the append quantizes a group
        boundary = args.length + c.ring - (args.length + c.ring) % c.group
        at = {"any": args.length} if s > 1 else {"ring": args.length + 1, "pack": boundary}
        if s == 1:
            assert R.n_packed(at["ring"] + 1, c) == R.n_packed(at["ring"], c)
            assert R.n_packed(at["pack"] + 1, c) > R.n_packed(at["pack"], c)
        for where, L in at.items():
            for st in (ref, tri):
                st.length.fill_(L)

            def reset():
                ref.length.fill_(L)
                tri.length.fill_(L)

            row = {"s": s, "at": where, "length": L,
                   "packed_groups": (R.n_packed(L + s, c) - R.n_packed(L, c)) // c.group,
                   "reference_ms": _median(lambda: R.append(ref, kn, vn), reset, args.warmup,
                                           args.reps),
                   "triton_ms": _median(lambda: TC.append_clip(tri, kn, vn), reset, args.warmup,
                                        args.reps),
                   "triton_graph10_ms": _graph10(tri, kn, vn, L, args.warmup, args.reps)}
            row["speedup"] = row["reference_ms"] / row["triton_ms"]
            rows.append(row)
            print(row)
    per_step = {}
    for name in ("reference_ms", "triton_ms", "triton_graph10_ms"):
        ring = next(r[name] for r in rows if r["s"] == 1 and r["at"] == "ring")
        pack = next(r[name] for r in rows if r["s"] == 1 and r["at"] == "pack")
        per_step[name] = ((c.group - 1) * ring + pack) / c.group
    print("per decode step (s=1, mean over a group cycle):", per_step)
    save_json(args.out, meta=gpu_meta(config=str(c), batch=B, kv_heads=H, head_dim=D,
                                      dtype=str(dtype), reps=args.reps, warmup=args.warmup),
              exact=exact, rows=rows, per_step_s1_ms=per_step)


if __name__ == "__main__":
    main()
