"""A decode step's SDPA call over a KV length that grows by one each step, per SDPA backend.

Why: the host profile of a compiled dense decode step (experiment_kv_decode_host.py,
results/debug/kv_decode_host_h100.json) showed ``aten::_cudnn_attention_forward`` taking
~6.7 ms of CPU a call when ``longfx::attention`` ran SDPA with no mask and ``enable_gqa``, while
the op alone over a fixed length takes 0.09 ms. A backend that builds a plan per shape pays that
on every step of a real decode, where the length changes each time.

For each variant: ``--steps`` calls over lengths that grow by one (views of one preallocated
cache; each variant gets lengths no variant before it used, so no plan cache is shared), host
wall time per call with a sync after each, median; then the same number of calls at one fixed
length. Variants: SDPA with its default backend choice, the op with no mask (what
``op.unmasked_sdpa_can_run`` sends to SDPA, with cuDNN excluded since this experiment), SDPA
forced to each of flash / cuDNN / efficient with ``enable_gqa``, and the op with an all-true
mask (grouped.py).
32 query / 8 KV heads, head_dim 128, bf16, one query.

    python benchmarks/experiment_sdpa_decode_lengths.py --out $OUT/sdpa_decode_lengths_h100.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from cuda_timing import gpu_meta, save_json
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, lengths) -> float:
    walls = []
    for n in lengths:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(n)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(walls), 4)


def main(argv=None) -> int:
    import longfx.kernels.attention.op  # noqa: F401  (registers longfx::attention)

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        n_var = 7
        k = torch.randn(1, 8, L + (n_var + 1) * args.steps, 128, device="cuda", dtype=torch.bfloat16,
                        generator=g)
        v = torch.randn_like(k)
        ones = torch.ones(1, 1, 1, k.shape[2], device="cuda", dtype=torch.bool)

        def sdpa(backend):
            def call(n):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n],
                                                          scale=128 ** -0.5, enable_gqa=True)
            return call

        variants = {
            "sdpa default": lambda n: F.scaled_dot_product_attention(
                q, k[:, :, :n], v[:, :, :n], scale=128 ** -0.5, enable_gqa=True),
            "op, no mask": lambda n: torch.ops.longfx.attention(q, k[:, :, :n], v[:, :, :n], None,
                                                                128 ** -0.5, False, 0.0),
            "op, all-true mask (grouped)": lambda n: torch.ops.longfx.attention(
                q, k[:, :, :n], v[:, :, :n], ones[..., :n], 128 ** -0.5, False, 0.0),
            "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        }
        row = {"length": L}
        assert len(variants) <= n_var
        for i, (name, fn) in enumerate(variants.items()):
            start = L + i * args.steps                                  # lengths of its own
            try:
                fn(start)                                               # first call: warm
                grow = timed(fn, range(start + 1, start + 1 + args.steps))
                fixed = timed(fn, [start + 1] * args.steps)
                row[name] = {"growing_ms": grow, "fixed_ms": fixed}
            except RuntimeError as e:
                row[name] = {"error": str(e).splitlines()[0][:200]}
            print(L, name, row[name], flush=True)
        rows.append(row)
    save_json(args.out, rows=rows, meta=gpu_meta())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
