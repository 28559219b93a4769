"""The host cost of one lowered ``kv_quant`` decode step's two ops, taken apart.

The profile of a whole-model step (experiment_kv_decode_host.py) gave ~0.3 ms of CPU a call to
``longfx::kv_quant_attention`` and ``longfx::kv_quant_append``. Here each layer of that cost is
timed alone on one 4-bit state (32k tokens, B=1, 8 KV heads, D=128, bf16): the host time to
*enqueue* ``--calls`` calls (no sync between them; a sync after the last is outside the clock),
divided by the calls, so it is CPU time, not kernel time:

* ``torch.ops.longfx.kv_quant_attention`` / ``kv_quant_append`` (what the compiled graph calls);
* the same through the Python implementation behind the op (``triton.attention_decode`` /
  ``triton.append`` on a prebuilt state), so the difference is the custom-op wrapper plus
  ``from_tensors`` and the support checks;
* ``from_tensors`` + ``supports_attention`` alone;
* baselines: one ``torch.add`` and one ``torch.ops.longfx.kv_rotate`` on a [1, 32, 1, 128]
  tensor (the wrapper cost of a trivial custom op).

    python benchmarks/experiment_kv_decode_launch.py --out $OUT/kv_decode_launch_h100.json
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_kv_quant_decode import random_state
from cuda_timing import gpu_meta, save_json


def enqueue_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) / calls * 1e6, 2)


def main(argv=None) -> int:
    from longfx.kernels.kv_quant import op as kv_op
    from longfx.kernels.kv_quant import reference as R
    from longfx.kernels.kv_quant import triton as T

    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    cfg = R.KVQuantConfig(4, 64, 128, "u8")
    st = random_state(R, 1, 8, 128, args.length, cfg, dev)
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    rot = torch.eye(128, device=dev)
    scale = 128 ** -0.5
    rows = {
        "attention op": lambda: kv_op.ATTENTION(q, *st.tensors(), scale, 4, 64, None, None),
        "attention impl (triton.attention_decode)": lambda: T.attention_decode(q, st, scale),
        "from_tensors + supports_attention": lambda: T.supports_attention(
            q, R.QuantizedKV.from_tensors(st.tensors(), 4, 64)),
        "torch.add baseline": lambda: torch.add(q, 1.0),
        "kv_rotate op baseline": lambda: kv_op.ROTATE(q, rot, False),
    }
    out = {name: enqueue_us(fn, args.calls) for name, fn in rows.items()}
    # the append advances the state: give it room for every call (warm-up included)
    room = args.calls + 16
    st2 = random_state(R, 1, 8, 128, args.length, cfg, dev)
    big = R.QuantizedKV.empty(1, 8, 128, args.length + 2 * room + 64, cfg, torch.bfloat16, dev)
    n = st2.k_codes.shape[2]
    for name in R.QuantizedKV.NAMES[:4]:
        src, dst = getattr(st2, name), getattr(big, name)
        dst[:, :, :src.shape[2]].copy_(src)
    big.k_ring.copy_(st2.k_ring)
    big.v_ring.copy_(st2.v_ring)
    big.length.copy_(st2.length)
    del st2, n
    k = torch.randn(1, 8, 1, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out["append op"] = enqueue_us(lambda: kv_op.APPEND(*big.tensors(), k, v, 4, 64), args.calls)
    out["append impl (triton.append)"] = enqueue_us(lambda: T.append(big, k, v), args.calls)
    for name, us in out.items():
        print(f"{name}: {us} us", flush=True)
    save_json(args.out, host_us_per_call=out, length=args.length, calls=args.calls,
              meta=gpu_meta())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
