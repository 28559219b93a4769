"""An independent implementation of the harness's ``ppl`` and classic ``passkey`` tasks.

Issue 3 asks that the harness's numbers match an independent implementation of the same
tasks. This script imports neither longfx nor its evaluation code: only torch and
transformers. It differs from ``longfx.eval`` on purpose wherever the task allows:

* ``ppl``: one forward over the whole prefix with ``labels=`` (transformers computes the
  shifted cross-entropy) — no cache, no chunking — against the harness's chunked pass through a
  ``DynamicCache``. Same text (CPython's ``pydoc_data.topics``, topics joined in sorted order
  with blank lines, as the task defines it), same first N tokens; the two must agree to
  numerical precision.
* ``passkey``: its own prompt (the filler of Mohtashami & Jaggi 2023, "Landmark Attention",
  the template later reused by LongLoRA and YaRN), its own seeds (so the keys and depths'
  exact placements are held out from the harness's), and ``model.generate`` for the greedy
  answer. Accuracies agree with the harness's within sampling error, not token for token.

    python benchmarks/independent_check.py --model DIR_OR_GGUF --lengths 2048,4096 \
        --trials 10 --out results.jsonl

``--model`` is a folder transformers can load, or a ``.gguf`` file (loaded with
``gguf_file=``). Each row is a JSON line: task, length, depth, n, metrics, environment.

``--recipe R`` (repeatable) also runs the same prompts through ``longfx.compile(model, R)`` —
the only place longfx is imported, so the dense rows stay independent of it; the prompts
then go through each recipe in one ``generate`` call (no chunked prefill).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import re
import time
from pathlib import Path

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def load(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    where = str(p.parent) if p.suffix == ".gguf" else str(p)
    tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True,
                                                 dtype=torch.float32, **kw)
    return model.to(device).eval(), tok


def text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, in one forward pass."""
    with torch.no_grad():
        out = model(input_ids=ids[None], labels=ids[None], use_cache=False)
    return math.exp(float(out.loss))


def passkey_prompt(tok, length: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """About ``length`` tokens: intro, filler with the key line at ``depth``, question."""
    key = str(rng.randint(10000, 99999))
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    head, line, tail = enc(INTRO), enc(KEY_LINE.format(key=key)), enc(QUESTION)
    unit = enc(FILLER)
    room = max(0, length - len(head) - len(line) - len(tail))
    n_units = room // len(unit)
    before = round(depth * n_units)
    ids = head + unit * before + line + unit * (n_units - before) + tail
    return ids, key


def answer(model, tok, ids: list[int], device: str) -> str:
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "device": device, "implementation": "benchmarks/independent_check.py"}
    if device == "cuda":
        env["hardware"] = torch.cuda.get_device_name()
    else:
        env["hardware"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                env["hardware"] = next(ln.split(":", 1)[1].strip() for ln in f
                                       if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--ppl-lengths", default=None, help="default: --lengths")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tasks", default="ppl,passkey")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--recipe", action="append", default=[],
                    help="also run through longfx.compile(model, RECIPE); '' is the dense model")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model, tok = load(args.model, device)
    print(f"loaded in {time.time() - t0:.1f}s on {device}", flush=True)
    env = environment(device)
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    ppl_lengths = [int(x) for x in (args.ppl_lengths or args.lengths).split(",")]
    rows = []

    def emit(row):
        row = {"model": args.name, **row, "env": env}
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)

    variants = args.recipe or [""]
    for recipe in variants:
        try:
            run_variant(args, model, tok, device, recipe, tasks, lengths, ppl_lengths, emit)
        except Exception as e:  # noqa: BLE001 - one failing recipe does not lose the others
            print(f"{recipe or 'dense'} FAILED: {type(e).__name__}: {e}", flush=True)
    return 0


def run_variant(args, model, tok, device, recipe, tasks, lengths, ppl_lengths, emit):
    m = model
    if recipe:
        import longfx   # only for recipe rows

        m = longfx.compile(model, recipe)

    def emit_r(row, recipe=recipe):
        emit({**row, "recipe": recipe})

    if "ppl" in tasks:
        ids = torch.tensor(tok(text(), add_special_tokens=False).input_ids, device=device)
        for n in ppl_lengths:
            t1 = time.time()
            emit_r({"task": "ppl", "length": n, "n": n - 1,
                    "metrics": {"ppl": perplexity(m, ids[:n])},
                    "seconds": round(time.time() - t1, 2)})
    if "passkey" in tasks:
        for n in lengths:
            pooled, t1 = [], time.time()
            for depth in DEPTHS:
                hits = []
                for t in range(args.trials):
                    rng = random.Random(f"{args.seed}/{n}/{depth}/{t}")
                    ids, key = passkey_prompt(tok, n, depth, rng)
                    got = re.findall(r"\d+", answer(m, tok, ids, device))
                    hits.append(bool(got) and got[0] == key)
                pooled += hits
                emit_r({"task": "passkey", "length": n, "depth": depth, "n": len(hits),
                        "metrics": {"acc": sum(hits) / len(hits)}})
            emit_r({"task": "passkey", "length": n, "depth": None, "n": len(pooled),
                    "metrics": {"acc": sum(pooled) / len(pooled)},
                    "seconds": round(time.time() - t1, 2)})


if __name__ == "__main__":
    raise SystemExit(main())
