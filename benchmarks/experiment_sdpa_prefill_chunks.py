"""Chunked prefill through ``dense.sdpa`` (the canonical op's long-call path): SDPA left to
choose its backend vs cuDNN excluded, over chunks whose key length grows chunk by chunk.

Why: SDPA's first choice on the H100 (cuDNN) builds an execution plan for every new shape
(experiment_sdpa_decode_lengths.py: 38-58 ms a decode call over growing lengths). A chunked
prefill is the same pattern at a larger scale: every chunk attends over a longer past. Here
``--chunks`` chunks of ``--chunk`` queries (bf16, 32 query / 8 KV heads, D 128) each attend
over all keys so far with the bottom-right causal mask the op builds, timed per chunk with a
sync (host + device), median; each variant gets its own lengths (no shared plan cache).

    python benchmarks/experiment_sdpa_prefill_chunks.py --out $OUT/sdpa_prefill_chunks_h100.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from cuda_timing import gpu_meta, save_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from longfx.kernels.attention import dense

NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def run(chunk: int, start: int, chunks: int, backends) -> list[float]:
    g = torch.Generator(device="cuda").manual_seed(start)
    total = start + chunk * chunks
    k = torch.randn(1, 8, total, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    walls = []
    for i in range(chunks):
        n = start + (i + 1) * chunk                         # keys after this chunk
        q = torch.randn(1, 32, chunk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        mask = torch.ones(chunk, n, dtype=torch.bool, device="cuda").tril(n - chunk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if backends is None:
            dense.sdpa(q, k[:, :, :n], v[:, :, :n], attn_mask=mask, scale=128 ** -0.5)
        else:
            with sdpa_kernel(backends):
                dense.sdpa(q, k[:, :, :n], v[:, :, :n], attn_mask=mask, scale=128 ** -0.5)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    return walls


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = {}
    for i, (name, backends) in enumerate((("default", None), ("no cudnn", NO_CUDNN))):
        start = args.start + i * 7                          # lengths of its own
        walls = run(args.chunk, start, args.chunks, backends)
        rows[name] = {"median_ms": round(statistics.median(walls), 3),
                      "walls_ms": [round(w, 3) for w in walls]}
        print(name, rows[name], flush=True)
    save_json(args.out, rows=rows,
              meta=gpu_meta(chunk=args.chunk, chunks=args.chunks, start=args.start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
