"""Record the CPU numbers of SmolLM2-135M (dense) into benchmarks/results/.

    python benchmarks/run_smollm2_cpu.py [--stages ppl,pk-mid,pk-ends,pk-quarters]

Stages run in order and append rows as each cell completes, so a run that is stopped keeps
what it measured. Perplexity at all lengths comes from one 16k pass (prefixes). Passkey is
run at depth 0.5 across all lengths first (that row shows the failure past the trained
context), then the other depths where CPU time allows.
"""
import argparse
from pathlib import Path

from longfx.eval import evaluate

OUT = Path(__file__).parent / "results" / "smollm2-135m_cpu.jsonl"
PK = [1024, 2048, 4096, 8192, 12288, 16384]
STAGES = {
    "ppl": dict(tasks=["ppl"], lengths=[2048, 4096, 8192, 16384]),
    "pk-mid": dict(tasks=["passkey"], lengths=PK, depths=[0.5]),
    "pk-ends": dict(tasks=["passkey"], lengths=PK[:4], depths=[0.0, 1.0]),
    "pk-quarters": dict(tasks=["passkey"], lengths=PK[:3], depths=[0.25, 0.75]),
    "pk-far": dict(tasks=["passkey"], lengths=PK[4:], depths=[0.0, 1.0]),
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    for s in a.stages.split(","):
        print(f"== stage {s}", flush=True)
        evaluate("smollm2-135m", out=a.out, seed=0, trials=1, progress=True, **STAGES[s])
