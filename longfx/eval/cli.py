"""``longfx eval``: the evaluation harness on the command line.

    longfx eval smollm2-135m --recipe "sink_window(sink=4, window=1024)" --task ppl,passkey \\
        --length 2048,4096 --out results.jsonl --plot results.png

The dense model always runs too. ``--recipe`` may be repeated; ``--task`` and ``--length``
take comma lists. Rows are appended to ``--out`` as JSON lines; a table is printed at the end.
``--from FILE.jsonl`` re-prints (and re-plots) recorded rows without running anything.
"""
from __future__ import annotations

import argparse
import json
import sys


def _ints(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if part:
            mult = 1024 if part.endswith("k") else 1
            out.append(int(float(part.rstrip("k")) * mult))
    return out


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from . import TASKS

    p = subparsers.add_parser("eval", help="accuracy / cost of recipes vs the dense model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="embedded name, HF folder, .gguf, or zoo:NAME")
    p.add_argument("--recipe", action="append", default=[], help="recipe to compare (repeatable)")
    p.add_argument("--task", default="ppl", help=f"comma list of {','.join(TASKS)}")
    p.add_argument("--length", default="2048", help="comma list of context lengths (2k = 2048)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (0 = start)")
    p.add_argument("--trials", type=int, default=1, help="prompts per passkey cell / needle length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per forward through the cache (a value >= the prompt feeds it in one call, as generate() does; dynamic RoPE recipes differ between the two: docs/rope.md)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="append rows here as JSON lines")
    p.add_argument("--plot", help="write the figure (PNG) here")
    p.add_argument("--from", dest="from_", metavar="JSONL", action="append",
                   help="show/plot recorded rows instead of running")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense rows (recorded already with the same settings)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import evaluate, load_rows
    from .table import table

    console = Console()
    if args.from_:
        rows = load_rows(args.from_)
    else:
        if not args.model:
            console.print("[red]error:[/red] MODEL is required (or --from FILE.jsonl)")
            return 2
        try:
            rows = evaluate(args.model, recipes=args.recipe, tasks=[t for t in args.task.split(",") if t],
                            lengths=_ints(args.length), seed=args.seed, trials=args.trials,
                            depths=_floats(args.depths), out=args.out, chunk=args.chunk,
                            progress=not args.no_progress, dense=not args.no_dense,
                            device=args.device)
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            return 2
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        console.print(table(rows, title=f"longfx eval · {rows[0]['hardware'] if rows else ''}"))
    if args.plot:
        from .plots import plot

        console.print(f"wrote {plot(rows, args.plot)}")
    return 0


def main(argv=None) -> int:   # python -m longfx.eval.cli ... (until wired into longfx/cli.py)
    ap = argparse.ArgumentParser(prog="longfx")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
