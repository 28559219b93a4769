"""Tuning run: YaRN's attention temperature in ``extend``'s schedule (``dynamic_yarn(factor=6,
margin=2, mscale=m)``, temperature (0.1·m·ln s + 1)² on q·k) on the two passkey cells
``extend(to=32768)`` misses: 16k with the prompt in 1024-token chunks (85% held out) and 32k in
one call (84% held out). Tuning seeds only (never the held-out 4242–9595).

    python benchmarks/tune_extend_mscale.py --gguf /tmp/smol.gguf --out $OUT/extend_mscale.jsonl

Each value runs in its own process (the GPU is shared; a failing one loses only itself), the
16k chunked cell then the 32k one-call cell; rows go to one jsonl per value, joined at the end.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mscale", default="1.5,2,3")
    p.add_argument("--seeds", default="7,8")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--deadline", type=float, default=520.0)
    p.add_argument("--cells", default="16384:1024,32768:65536",
                   help="LENGTH:CHUNK cells; each value × cell runs in its own process "
                        "(--split) or each value runs its cells in turn")
    p.add_argument("--split", action="store_true", help="one process per value and cell")
    p.add_argument("--ppl", default="", help="ppl lengths, run once per value (1024-token chunks)")
    p.add_argument("--recipe", action="append", default=[],
                   help="run these recipes instead of the mscale values (tagged r0, r1, ...)")
    args = p.parse_args(argv)
    out = Path(args.out)
    procs = []
    runs = [(f"r{i}", r) for i, r in enumerate(args.recipe)] or [
        (f"m{m}", f"dynamic_yarn(factor=6, margin=2, mscale={m})" if float(m) != 1 else
         "extend(to=32768)") for m in args.mscale.split(",")]
    for m, recipe in runs:
        cells = [c.split(":") for c in args.cells.split(",")]
        groups = [[c] for c in cells] if args.split else [cells]
        for gi, group in enumerate(groups):
            tag = m + (f".c{gi}" if args.split else "")
            part = out.with_suffix(f".{tag}.jsonl")
            base = [sys.executable, str(HERE / "run_smollm2_gpu.py"), "--gguf", args.gguf,
                    "--out", str(part), "--recipe", recipe, "--trials", str(args.trials),
                    "--deadline", str(args.deadline)]
            cmds = [base + ["--ppl-lengths", args.ppl, "--passkey-lengths", ""]] \
                if args.ppl and gi == 0 else []
            for seed in args.seeds.split(","):
                for length, chunk in group:
                    cmds.append(base + ["--ppl-lengths", "", "--passkey-lengths", length,
                                        "--chunk", chunk, "--seed", seed])
            script = " ; ".join(" ".join(f"'{c}'" for c in cmd) for cmd in cmds)
            log = open(out.with_suffix(f".{tag}.log"), "w")
            procs.append((tag, part, subprocess.Popen(["bash", "-c", script], stdout=log,
                                                      stderr=subprocess.STDOUT)))
    t0 = time.time()
    for m, part, proc in procs:
        left = max(1.0, args.deadline + 60 - (time.time() - t0))
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"{m}: killed at the deadline", flush=True)
    with open(out, "a") as f:
        for m, part, _ in procs:
            if part.exists():
                f.write(part.read_text())
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
