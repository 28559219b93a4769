"""Decode attention over a quantized KV state (longfx.kernels.kv_quant, Triton) vs bf16 SDPA.

    python benchmarks/bench_kv_quant_decode.py --out benchmarks/results/kv_quant_decode_h100.json

Issue 6's speed target (H100): 4-bit decode attention over 128k KV at least 3x faster than
bf16 ``F.scaled_dot_product_attention(enable_gqa=True)`` over the same KV, and at B=8 over 32k
too. Shapes are Llama-8B's: 32 query / 8 kv heads, D=128, one query token. The state is
filled with random codes and scales (decode speed does not depend on the values), the bf16
cache with random values; each side is timed with CUDA events after a warmup, median of
``--iters`` calls, replayed as CUDA graphs (GPU time: ``*_ms``) and launched eagerly
(``*_eager_ms``, which includes Python launch overhead); the reported ``quant_ms`` and
``sdpa_bf16_ms`` are medians over ``--rounds`` alternating timings of the fastest point and SDPA
(``rounds_ms``), with the dequantized reference copy freed first. The decode kernel's warps, stages and
split count are swept over the ``--num-*`` lists and the fastest is reported (``tuning`` keeps
every point). Also recorded: GB/s of state bytes the kernel reads (packed codes, scales,
zeros and the full-precision ring), the largest relative difference from the reference
(dequantize + attention, in fp32), and the time of a one-token append (quantize-on-append).

The decode variants are timed (``--variants``: "joined", the unpack-to-[N, D] kernel, and the
bit-plane kernel with its operand modes "planes", "magic", "asm" and "tf32", and its
transposed form "asmt", the default; see longfx.kernels.kv_quant.triton) over the sweep ``--block-n`` x ``--num-splits`` x ``--num-warps`` x
``--num-stages`` x ``--maxnreg``; each row's ``quant_ms`` and knobs are the fastest point
over all variants (``variant`` names it) and ``variants`` keeps the best point of each, with
its GB/s, speedup and error; ``asmt_options`` records the "asmt" switches
(``triton._ASMT``, ``--asmt-raw`` sets its raw operands) and the combine tile. ``--quick``: the 4- and 2-bit rows of 128k:1 and 32k:8 with a smaller sweep
(under 2 minutes on an H100).
``--key-bits``: key widths to pair with each of ``--bits`` (0: the values' width; e.g.
``--bits 4,2 --key-bits 0,4`` times 4-bit, 2-bit and K4V2 — 4-bit keys over 2-bit values,
``reference.KVQuantConfig(key_bits=...)``, which only "asmt" decodes); each row's ``key_bits``
says which.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from cuda_timing import median_ms


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"128k:1,32k:8" -> [(131072, 1), (32768, 8)] (length:batch)."""
    out = []
    for item in text.split(","):
        length, batch = item.split(":")
        mult = 1024 if length.lower().endswith("k") else 1
        out.append((int(length.lower().rstrip("k")) * mult, int(batch)))
    return out


def time_ms(fn, warmup: int, iters: int) -> float:
    return median_ms(fn, warmup, iters)


def graph_ms(fn, warmup: int, iters: int) -> float:
    """Median time of ``fn`` replayed as a CUDA graph (GPU time, no Python launch overhead;
    the kernels read the state's length on the device, so a decode step can be a graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup, iters)


def random_state(R, batch, kv_heads, dim, length, config, device):
    """A state holding ``length`` tokens of random codes and plausible scales (the keys' at
    their own width, ``config.kbits``)."""
    st = R.QuantizedKV.empty(batch, kv_heads, dim, length + config.group, config,
                             torch.bfloat16, device)
    g = torch.Generator(device=device).manual_seed(0)
    for codes in (st.k_codes, st.v_codes):
        codes.copy_(torch.randint(0, 256, codes.shape, generator=g, device=device,
                                  dtype=torch.int32).to(torch.uint8))
    for params, bits in ((st.k_params, config.kbits), (st.v_params, config.bits)):
        qmax = (1 << bits) - 1
        a = 2.0 / qmax                          # codes span [-1, 1]: scale a, zero -1
        if config.scales == "fp16":
            params[..., 0, :] = a
            params[..., 1, :] = -1.0
        else:                                   # reference.affine's u8 encoding
            params[..., 0, :] = R.SCALE_BIAS + round(R.SCALE_STEPS * math.log2(a))
            params[..., 1, :] = 128 + round(-1.0 / (a * qmax / R.ZERO_STEPS))
    st.k_ring.normal_(generator=g)
    st.v_ring.normal_(generator=g)
    st.length.fill_(length)
    return st


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rel_err(out, want) -> float:
    return float((out.float() - want).abs().max() / want.abs().max())


def bench_case(R, T, length, batch, bits, a, key_bits: int | None = None) -> dict:
    """One row: ``bits``-bit values, ``key_bits``-bit keys (None: ``bits``)."""
    device = torch.device("cuda")
    key_bits = None if key_bits == bits else key_bits
    config = R.KVQuantConfig(bits=bits, group=a.group, residual=a.residual, scales=a.scales,
                             key_bits=key_bits)
    st = random_state(R, batch, a.kv_heads, a.dim, length, config, device)
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, a.heads, a.queries, a.dim, generator=g, device=device,
                    dtype=torch.bfloat16)
    scale = a.dim ** -0.5
    read = T.packed_bytes_read(st, length)
    block_ns = [bn for bn in _ints(a.block_n) if a.group % bn == 0] or [min(64, a.group)]
    tuned = []          # (ms, variant, block_n, warps, stages, splits, run, maxnreg)
    for variant in a.variants.split(","):
        for block_n in block_ns:
            for warps in _ints(a.num_warps):
                for stages in _ints(a.num_stages):
                    for splits, maxnreg in itertools.product(
                            [x or None for x in _ints(a.num_splits)],
                            [x or None for x in _ints(a.maxnreg)]):
                        def run(variant=variant, block_n=block_n, warps=warps, stages=stages,
                                splits=splits, maxnreg=maxnreg):
                            return T.attention_decode(q, st, scale, splits, warps, stages,
                                                      variant=variant, block_n=block_n,
                                                      maxnreg=maxnreg)
                        tuned.append((graph_ms(run, a.warmup, a.iters), variant, block_n, warps,
                                      stages, splits, run, maxnreg))
    best = {}                                                        # variant -> fastest point
    for x in tuned:
        if x[1] not in best or x[0] < best[x[1]][0]:
            best[x[1]] = x
    t_quant, variant, block_n, warps, stages, splits, run, maxnreg = min(tuned,
                                                                         key=lambda x: x[0])
    t_quant_eager = time_ms(run, a.warmup, a.iters)

    kd, vd = R.dequantize_state(st)                                  # [B, Hkv, L, D] bf16
    mask = torch.ones(a.queries, length, dtype=torch.bool, device=device).tril(length - a.queries)
    want = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), attn_mask=mask,
                                          scale=scale, enable_gqa=True)
    errs = {v: _rel_err(x[6](), want) for v, x in best.items()}
    err = errs[variant]
    # free the dequantized copy before timing SDPA: with another K + V alive SDPA ran 4-11%
    # slower (benchmarks/experiment_kv_decode_sdpa_ab.py, H100, 2026-11-24)
    del kd, vd, want

    k = torch.randn(batch, a.kv_heads, length, a.dim, generator=g, device=device,
                    dtype=torch.bfloat16)
    v = torch.randn_like(k)
    causal = a.queries > 1

    def sdpa():
        # S queries at the end of the cache: bottom-right causal; S == 1 needs no mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if causal else None,
                                              scale=scale, enable_gqa=True)

    # the fastest point and SDPA in alternating rounds (these machines drift): medians of each
    rounds = [(graph_ms(run, a.warmup, a.iters), graph_ms(sdpa, a.warmup, a.iters))
              for _ in range(a.rounds)]
    t_quant = statistics.median(r[0] for r in rounds)
    t_sdpa = statistics.median(r[1] for r in rounds)
    t_sdpa_eager = time_ms(sdpa, a.warmup, a.iters)
    del k, v

    kn = torch.randn(batch, a.kv_heads, 1, a.dim, generator=g, device=device, dtype=torch.bfloat16)
    start_len = length - 1                      # the append flushes a group every group tokens

    def append():
        st.length.fill_(start_len)
        T.append(st, kn, kn)

    t_append = graph_ms(append, a.warmup, a.iters)
    st.length.fill_(length)
    bf16_bytes = 2 * batch * a.kv_heads * length * a.dim * 2
    variants = {v: dict(ms=x[0], block_n=x[2], num_warps=x[3], num_stages=x[4],
                        num_splits=x[5], maxnreg=x[7], gbps=read / x[0] / 1e6,
                        speedup=t_sdpa / x[0],
                        max_rel_err_vs_reference=errs[v])
                for v, x in best.items()}
    return dict(length=length, batch=batch, bits=bits, key_bits=config.kbits, group=a.group,
                residual=a.residual,
                scales=a.scales, heads=a.heads, kv_heads=a.kv_heads, dim=a.dim,
                queries=a.queries, quant_ms=t_quant, sdpa_bf16_ms=t_sdpa, rounds_ms=rounds,
                speedup=t_sdpa / t_quant,
                target_speedup=3.0 if bits == 4 and config.kbits == 4 else None,
                quant_eager_ms=t_quant_eager, sdpa_bf16_eager_ms=t_sdpa_eager,
                num_warps=warps, num_stages=stages, num_splits=splits,
                tuning=[dict(ms=x[0], variant=x[1], block_n=x[2], num_warps=x[3],
                             num_stages=x[4], num_splits=x[5], maxnreg=x[7]) for x in tuned],
                state_bytes_read=read, quant_gbps=read / t_quant / 1e6,
                sdpa_gbps=bf16_bytes / t_sdpa / 1e6, max_rel_err_vs_reference=err,
                append_1tok_ms=t_append, variant=variant, block_n=block_n, maxnreg=maxnreg,
                default_variant=T.DEFAULT_VARIANT, variants=variants,
                asmt_options=dict(T._ASMT, combine_tile=T._COMBINE_TILE))


def save(path: str, rows: list[dict]) -> None:
    """Write ``rows`` as JSON with the GPU, torch / Triton versions and the date (also used by
    the experiment_kv_decode_* scripts)."""
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=datetime.now(timezone.utc).isoformat())
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--cases", default="128k:1,32k:8", help="length:batch pairs")
    ap.add_argument("--bits", default="4,2", help="value code widths")
    ap.add_argument("--key-bits", default="0", help="key code widths to pair with each of "
                    "--bits (0: the same as the values'; e.g. 0,4 adds K4V2 to 2-bit)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--scales", default="u8", choices=("u8", "fp16"))
    ap.add_argument("--queries", type=int, default=1, help="query tokens per step (S)")
    ap.add_argument("--variants", default="joined,planes,magic,asm,asmt",
                    help="decode kernels to time (longfx.kernels.kv_quant.triton.VARIANTS)")
    ap.add_argument("--block-n", default="32,64", help="decode tile sizes to try (those that "
                    "do not divide --group are skipped)")
    ap.add_argument("--num-warps", default="1,2,4,8", help="decode kernel warps to try")
    ap.add_argument("--num-stages", default="2,3,4", help="decode kernel stages to try")
    ap.add_argument("--num-splits", default="0,64,128,256", help="split-KV programs per kv "
                    "head to try (0: the kernel's heuristic)")
    ap.add_argument("--maxnreg", default="0", help="register caps a thread to try (0: none; "
                    "128 helped 4-warp programs on an H100, fewer warps need none)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the fastest "
                    "point and SDPA whose medians make the reported times")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="4- and 2-bit rows of 128k:1 and "
                    "32k:8, sweep block_n 32,64 x splits 0,128 x warps 1,2 x stages 3, "
                    "20 iterations (under 2 minutes on an H100); overrides those options")
    ap.add_argument("--asmt-raw", type=int, choices=(0, 1), default=None, help="set the "
                    "asmt kernel's raw-operand option (triton._ASMT['raw']) for this run")
    a = ap.parse_args(argv)
    if a.quick:
        a.cases, a.bits, a.block_n, a.num_splits = "128k:1,32k:8", "4,2", "32,64", "0,128"
        a.num_warps, a.num_stages, a.maxnreg, a.warmup, a.iters = "1,2", "3", "0", 5, 20
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_quant_decode needs a CUDA GPU")

    from longfx.kernels.kv_quant import reference as R
    from longfx.kernels.kv_quant import triton as T

    if a.asmt_raw is not None:
        T._ASMT["raw"] = bool(a.asmt_raw)
    rows = []
    for length, batch in parse_cases(a.cases):
        pairs = []                                            # (key bits, value bits)
        for bits in _ints(a.bits):
            for kb in _ints(a.key_bits):
                if (kb or bits, bits) not in pairs:
                    pairs.append((kb or bits, bits))
        for kb, bits in pairs:
            row = bench_case(R, T, length, batch, bits, a, kb)
            print(json.dumps(row), flush=True)
            print(f"# {length} tokens B={batch} K{kb}V{bits}: sdpa {row['sdpa_bf16_ms']:.4f} ms; "
                  + "; ".join(f"{v} {x['ms']:.4f} ms {x['gbps']:.0f} GB/s x{x['speedup']:.2f} "
                              f"(block_n {x['block_n']}, splits {x['num_splits']}, warps "
                              f"{x['num_warps']}, stages {x['num_stages']}, maxnreg "
                              f"{x['maxnreg']}, err "
                              f"{x['max_rel_err_vs_reference']:.1e})"
                              for v, x in row["variants"].items()), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    if a.out:
        save(a.out, rows)
    return rows


if __name__ == "__main__":
    main()
