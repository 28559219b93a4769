"""SmolLM2-135M (or another GGUF: ``--model-name``) on a GPU: perplexity and classic passkey,
dense vs the long-context recipes.

Run on the lent H100 (the device tool), with the GGUF carried in two chunks and joined first:

    python benchmarks/run_smollm2_gpu.py --gguf /tmp/smol.gguf --out $OUT/smollm2_gpu.jsonl

Each recipe runs in its own ``evaluate`` call (one failing recipe does not lose the others);
rows are appended as they are measured, so a run cut by the time limit keeps what it did.
``--deadline`` (seconds) stops starting new recipes after that long.
"""
from __future__ import annotations

import argparse
import time
import traceback

RECIPES = [
    "",                                                   # dense
    "self_extend(group=8, window=4096)",
    "sink_window(sink=4, window=1024) + rope_cap",
    "self_extend(group=16, window=4096)",
    "yarn(factor=4)",
    "sink_window(sink=4, window=1024)",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--deadline", type=float, default=480.0)
    p.add_argument("--recipe", action="append", help="override the recipe list")
    p.add_argument("--ppl-lengths", default="4096,8192,16384,32768")
    p.add_argument("--passkey-lengths", default="4096,8192,16384,32768")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens per forward)")
    p.add_argument("--seed", type=int, default=0, help="passkey seed (another seed = held-out prompts)")
    p.add_argument("--model-name", default="smollm2-135m", help="the name the rows carry")
    args = p.parse_args(argv)
    import torch

    import longfx
    from longfx.eval import evaluate

    t0 = time.time()
    model, tok = longfx.load(args.gguf)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loaded in {time.time() - t0:.1f}s on {next(model.parameters()).device}", flush=True)
    for recipe in args.recipe or RECIPES:
        if time.time() - t0 > args.deadline:
            print(f"deadline: skipping {recipe!r}", flush=True)
            continue
        t1 = time.time()
        try:
            for task, lengths in (("ppl", args.ppl_lengths), ("passkey", args.passkey_lengths)):
                if not lengths:
                    continue
                evaluate(model, recipes=[recipe] if recipe else [], tokenizer=tok,
                         tasks=[task], lengths=[int(n) for n in lengths.split(",")],
                         trials=args.trials, seed=args.seed, chunk=args.chunk, out=args.out,
                         progress=False, model_name=args.model_name, dense=not recipe)
            print(f"{recipe or 'dense'}: {time.time() - t1:.1f}s", flush=True)
        except Exception:  # noqa: BLE001 - record and go on with the next recipe
            print(f"{recipe or 'dense'} FAILED:\n{traceback.format_exc()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
