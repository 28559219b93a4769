"""``longfx`` command line: inspect, diff, generate, demo.

    longfx inspect smollm2-135m [--json]
    longfx diff smollm2-135m --recipe "..." [--context 32768] [--json]
    longfx generate smollm2-135m --recipe "..." --prompt "The capital of France is"
    longfx export smollm2-135m --recipe "sink_window(sink=4, window=1024)" -o out/smollm2
    longfx generate --onnx out/smollm2 --prompt "The capital of France is"
    longfx eval smollm2-135m --task passkey,ppl --length 2048,4096 [--plot out.png]
    longfx demo

MODEL is an embedded model name (``longfx.models.MODELS``), a local HF folder, a GGUF file,
or ``zoo:NAME`` for a tiny random-weight model of the test zoo (e.g. ``zoo:gemma3``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax

console = Console()


def _load(spec: str, attn_implementation: str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer or None, example inputs or None) for a MODEL argument."""
    if spec.startswith("zoo:"):
        from longfx.rewrite.testing import zoo

        name = spec[4:]
        model, inputs = zoo.build(name, attn_implementation or "sdpa")
        return model, None, inputs
    from longfx.models import load

    model, tok = load(spec, attn_implementation=attn_implementation)   # shows its own progress
    return model, tok, None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_inspect(args: argparse.Namespace) -> int:
    import longfx

    model, _tok, inputs = _load(args.model, args.attn)
    with console.status("capturing and analyzing the graph"):
        report = longfx.inspect(model, inputs, seq_len=args.seq_len)
    if args.json:
        print(report.to_json(context=args.context, indent=2))
        return 0
    console.print(report.table(kinds=tuple(args.kinds.split(","))))
    console.print(report.summary(args.context))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import longfx

    model, _tok, inputs = _load(args.model, args.attn)
    with console.status("capturing, canonicalizing and applying the recipe"):
        result = longfx.diff(model, args.recipe, inputs, seq_len=args.seq_len,
                             context=args.context)
    report = result.report
    if args.json:
        out = report.to_dict(context=args.context)
        out["diff"] = result.text
        print(json.dumps(out, indent=2))
        return 0
    console.print(report.table())
    text = report.graph_diff()
    lines = text.splitlines()
    if args.max_lines and len(lines) > args.max_lines:
        text = "\n".join(lines[:args.max_lines]) + f"\n... ({len(lines) - args.max_lines} more lines; --max-lines 0 shows all)"
    console.print(Syntax(text, "diff", word_wrap=True))
    if report.kv_state:                      # never cut by --max-lines: a KV recipe's whole diff
        console.print(report.kv_state_text(), markup=False)
    console.print(report.summary(args.context))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


def _generate(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, float, int]:
    import torch

    messages = [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), dt, int(new.numel())


def cmd_generate(args: argparse.Namespace) -> int:
    if args.onnx:
        return _generate_onnx(args)
    if not args.model or args.prompt is None:
        console.print("[red]generate needs MODEL and --prompt (or --onnx DIR)[/red]")
        return 2
    import longfx

    model, tok, _ = _load(args.model, args.attn)
    if tok is None:
        console.print("[red]generate needs a model with a tokenizer (not a zoo model)[/red]")
        return 2
    fast = longfx.compile(model, args.recipe)
    text, dt, n = _generate(fast, tok, args.prompt, args.max_new_tokens)
    console.print(Panel(text, title=f"{args.model} — {args.recipe or 'no recipe (canonical only)'}"))
    console.print(f"{n} tokens in {dt:.2f} s (first call includes graph capture and rewriting); "
                  f"peak RSS {_peak_rss_mib():.0f} MiB")
    for w in fast.longfx_backend.report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


def _generate_onnx(args: argparse.Namespace) -> int:
    """Generate through an exported folder in onnxruntime (runtime/ort.py)."""
    from pathlib import Path

    import numpy as np

    from longfx.runtime.ort import ORTModel

    model = ORTModel.from_dir(args.onnx)
    if args.prompt_ids is not None:
        ids = np.array([[int(t) for t in args.prompt_ids.split()]], dtype=np.int64)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens)
        dt = time.perf_counter() - t0
        print(" ".join(map(str, out[0, ids.shape[1]:].tolist())))
    else:
        if args.prompt is None:
            console.print("[red]generate needs --prompt (or --prompt-ids)[/red]")
            return 2
        if not (Path(args.onnx) / "tokenizer.json").exists():
            console.print(f"[red]{args.onnx} has no tokenizer.json: pass --prompt-ids[/red]")
            return 2
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.onnx)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = tok(args.prompt)["input_ids"]
        ids = np.array([ids], dtype=np.int64)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens)
        dt = time.perf_counter() - t0
        text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        recipe = model.meta.get("recipe") or "no recipe (canonical only)"
        console.print(Panel(text, title=f"{args.onnx} (onnxruntime) — {recipe}"))
    n = out.shape[1] - ids.shape[1]
    t = model.last_times
    console.print(f"{n} tokens in {dt:.2f} s: prefill {ids.shape[1]} tokens {t.prefill_s:.3f} s, "
                  f"decode {t.decode_ms_per_token:.1f} ms/token (onnxruntime, CPU)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import longfx

    model, tok, _ = _load(args.model, args.attn)
    with console.status("capturing, rewriting and exporting to ONNX"):
        result = longfx.export_onnx(model, args.output, args.recipe, target=args.target,
                                    tokenizer=tok, check=not args.no_check)
    files = sorted(p for p in result.path.iterdir() if p.is_file())
    for p in files:
        console.print(f"  {p}  ({p.stat().st_size / 2**20:.1f} MiB)")
    meta = result.meta
    kinds = {}
    for row in meta["attention"]:
        key = row["op"] + (f"(sink={row['sink']}, window={row['window']}"
                           + (f", cap={row['cap']}" if row.get("cap") else "") + ")"
                           if "window" in row else "")
        kinds[key] = kinds.get(key, 0) + 1
    console.print(f"recipe: {meta['recipe'] or '(none)'}; attention: "
                  + ", ".join(f"{n}x {k}" for k, n in kinds.items()))
    if "check" in meta:
        console.print(f"onnxruntime check: logits max relative error "
                      f"{meta['check']['max_rel_logits_error']:.2e} vs the rewritten graph")
    console.print(f"export took {result.timings.get('total_s', 0):.1f} s "
                  + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in result.timings.items()
                              if k != "total_s"))
    return 0


DEMO_PROMPT = "Explain in two sentences why long context windows are expensive for transformers."


def cmd_demo(args: argparse.Namespace) -> int:
    """Load SmolLM2, show its sites, apply a recipe, show the diff, generate, time it."""
    import torch

    import longfx

    t_start = time.perf_counter()
    console.rule("[bold]longfx demo")
    t0 = time.perf_counter()
    model, tok = longfx.load(args.model)
    console.print(f"loaded [bold]{args.model}[/bold] in {time.perf_counter() - t0:.1f} s "
                  f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, "
                  f"{model.config.num_hidden_layers} layers)")

    console.rule("1. sites found in the graph")
    t0 = time.perf_counter()
    report = longfx.inspect(model)
    console.print(report.table(kinds=("attention",)) if args.verbose else _short_table(report))
    console.print(report.summary(8192))
    console.print(f"(capture + analysis {time.perf_counter() - t0:.1f} s)")

    console.rule(f"2. recipe: {args.recipe or '(empty: canonicalize only)'}")
    t0 = time.perf_counter()
    d = longfx.diff(model, args.recipe)
    lines = d.text.splitlines()
    console.print(Syntax("\n".join(lines[:40]), "diff", word_wrap=True))
    console.print(f"... {len(lines)} diff lines in all; `longfx diff {args.model} --recipe ...` shows them")
    console.print(d.report.summary(8192))
    console.print(f"(rewrite {time.perf_counter() - t0:.1f} s)")

    console.rule("3. generate: original vs rewritten")
    eager_text, eager_dt, n1 = _generate(model, tok, DEMO_PROMPT, args.max_new_tokens)
    fast = longfx.compile(model, args.recipe)
    fast_text, fast_dt, n2 = _generate(fast, tok, DEMO_PROMPT, args.max_new_tokens)
    console.print(Panel(fast_text, title="rewritten model"))
    same = "identical" if fast_text == eager_text else "DIFFERENT"
    console.print(f"original: {n1} tokens in {eager_dt:.2f} s; rewritten: {n2} tokens in "
                  f"{fast_dt:.2f} s (includes capture of the prefill and decode graphs); "
                  f"text {same}")
    with torch.no_grad():
        ids = tok(DEMO_PROMPT, return_tensors="pt")["input_ids"]
        a = model(ids).logits
        b = fast(ids).logits
    rel = float((a - b).abs().max() / a.abs().max())
    console.print(f"logits max relative difference: {rel:.2e}")
    console.rule()
    console.print(f"total {time.perf_counter() - t_start:.1f} s, peak RSS {_peak_rss_mib():.0f} MiB")
    return 0 if same == "identical" or args.recipe else 1


def _short_table(report) -> Any:
    from rich.table import Table

    t = Table(title=f"{report.model}: sites")
    for col in ("kind", "found", "rewritable", "layers", "spellings", "details"):
        t.add_column(col)
    rows = report.rows()
    for kind in ("attention", "rope", "kv"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        layers = sorted({r["layer"] for r in mine if r["layer"] is not None})
        span = f"{layers[0]}..{layers[-1]}" if layers else "-"
        kinds = sorted({str(r.get("mask_kind") or r.get("style") or r.get("role") or "") for r in mine} - {""})
        t.add_row(kind, str(len(mine)), str(sum(bool(r["rewritable"]) for r in mine)), span,
                  ", ".join(sorted({r["spelling"] for r in mine})), ", ".join(kinds))
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longfx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser, optional: bool = False) -> None:
        sp.add_argument("model", nargs="?" if optional else None,
                        help="embedded model name, HF folder, GGUF file, or zoo:NAME")
        sp.add_argument("--attn", default=None, help="attn_implementation: eager | sdpa")
        sp.add_argument("--context", type=int, default=8192,
                        help="context length for the KV-bytes / FLOPs estimate (default 8192)")
        sp.add_argument("--seq-len", type=int, default=16,
                        help="tokens in the example input the graph is captured with (masks "
                             "are named from it: use more than a sliding window to see it)")

    sp = sub.add_parser("inspect", help="list attention, RoPE and KV sites")
    model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("--kinds", default="attention,rope,kv", help="which site kinds to list")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("diff", help="show what a recipe changes in the graph")
    model_args(sp)
    sp.add_argument("--recipe", default="", help='e.g. "sink_window(sink=4, window=1024)"')
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--max-lines", type=int, default=200, help="diff lines to print (0: all)")
    sp.set_defaults(func=cmd_diff)

    sp = sub.add_parser("generate", help="generate text through the rewritten model")
    model_args(sp, optional=True)
    sp.add_argument("--recipe", default="")
    sp.add_argument("--prompt", default=None)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--onnx", default=None, metavar="DIR",
                    help="run a folder written by `longfx export` in onnxruntime instead")
    sp.add_argument("--prompt-ids", default=None,
                    help="with --onnx: the prompt as space-separated token ids")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("export", help="rewrite and export to ONNX (prefill + decode, KV state)")
    model_args(sp)
    sp.add_argument("--recipe", default="")
    sp.add_argument("-o", "--output", required=True, help="output folder")
    sp.add_argument("--target", default="opset23", choices=["opset23", "decomposed"],
                    help="attention as ONNX Attention-23 (default) or MatMul/Softmax ops")
    sp.add_argument("--no-check", action="store_true",
                    help="skip the onnxruntime check against the rewritten graph")
    sp.set_defaults(func=cmd_export)

    from longfx.eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)          # longfx eval MODEL --recipe R --task T --length N[,N...]

    sp = sub.add_parser("demo", help="the main job on the embedded default model")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--recipe", default="")
    sp.add_argument("--max-new-tokens", type=int, default=48)
    sp.add_argument("--verbose", action="store_true", help="list every site")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - the CLI reports errors, not tracebacks
        from longfx.recipes import RecipeError

        if isinstance(e, (RecipeError, ImportError, KeyError, ValueError, FileNotFoundError, TypeError)):
            console.print(f"[red]error:[/red] {e}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
