"""``longfx.eval``: measure what a recipe costs in accuracy and buys in speed and memory.

    from longfx.eval import evaluate
    rows = evaluate("smollm2-135m", recipes=["sink_window(sink=4, window=1024)"],
                    tasks=["ppl", "passkey"], lengths=[2048, 4096], out="results.jsonl")

The dense baseline (recipe ``""`` run on the plain, uncompiled model) always runs first in the
same process; every other recipe is applied with ``longfx.compile(model, recipe)`` and each of
its rows carries ``delta`` (its metrics minus the dense row's for the same task/length/depth).
A recipe may also be a ``(label, fn)`` pair where ``fn(model) -> model`` builds a variant by
hand (for experiments and tests). Rows are JSON-able dicts, written one per line to ``out`` as
they complete (so a long run that is stopped keeps what it measured).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from . import cost, data, infer, kl, needle, passkey, ppl
from .table import PRIMARY

DENSE = ""
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# name -> (run(ctx, model), units(ctx))
TASKS: dict[str, tuple[Callable, Callable]] = {
    "ppl": (ppl.run, ppl.units),
    "passkey": (passkey.run, passkey.units),
    "passkey_alt": (passkey.run_alt, passkey.units),
    "passkey_hard": (passkey.run_hard, passkey.units),
    "needle": (needle.run, needle.units),
    "kl": (kl.run, kl.units),
    "cost": (cost.run, cost.units),
}

__all__ = ["evaluate", "TASKS", "DENSE", "Context", "load_rows", "data"]


@dataclass
class Context:
    """What a task sees: tokenizer, grid, seeds, chunk size, the dense model (for ``kl``)."""
    tok: Any
    lengths: list[int]
    seed: int = 0
    trials: int = 1
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    chunk: int = infer.DEFAULT_CHUNK
    dense: Any = None
    recipe: str = DENSE
    options: dict[str, Any] = field(default_factory=dict)
    tick: Callable[..., None] = lambda *a, **k: None


def _device(device: str | None) -> str:
    """``"auto"`` (or None): CUDA when available, else CPU; otherwise the name as given."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return str(device)


def _resolve(model_or_name, tokenizer, device: str | None = "auto"):
    """(model, tokenizer, name). A model loaded here by name goes to ``device``; a model
    object passed in stays where it is."""
    if isinstance(model_or_name, str):
        if model_or_name.startswith("zoo:"):
            from longfx.rewrite.testing import zoo

            model, _inputs = zoo.build(model_or_name[4:], "sdpa")
            return model.to(_device(device)), tokenizer, model_or_name
        from longfx.models import load

        model, tok = load(model_or_name)
        return model.to(_device(device)), tokenizer or tok, model_or_name
    model = model_or_name
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    return model, tokenizer, Path(str(name)).name or type(model).__name__


def _variants(model, recipes: Iterable[Any]) -> list[tuple[str, Callable[[], Any], bool]]:
    """[(label, build, is_plain)]: dense first, then each recipe once."""
    out: list[tuple[str, Callable[[], Any], bool]] = [(DENSE, lambda: model, True)]
    seen = {DENSE}
    for r in recipes:
        if isinstance(r, tuple):
            label, fn = r
            out.append((str(label), (lambda fn=fn: fn(model)), False))
            continue
        text = str(r).strip()
        if text != DENSE:
            import longfx.recipes

            text = str(longfx.recipes.parse(text))   # canonical spelling, fails early if malformed
        if text in seen:
            continue
        seen.add(text)

        def build(text=text):
            import longfx

            return longfx.compile(model, text)
        out.append((text, build, False))
    return out


def _key(row: dict) -> tuple:
    return (row["task"], row.get("length"), row.get("depth"), row.get("variant"))


def add_deltas(rows: list[dict]) -> list[dict]:
    """Fill ``delta`` on every non-dense row from the dense row of the same cell (in place)."""
    dense = {(r["model"], *_key(r)): r for r in rows if r["recipe"] == DENSE}
    for r in rows:
        if r["recipe"] == DENSE:
            continue
        base = dense.get((r["model"], *_key(r)))
        if base is None:
            continue
        r["delta"] = {k: v - base["metrics"][k] for k, v in r["metrics"].items()
                      if isinstance(v, (int, float)) and isinstance(base["metrics"].get(k), (int, float))}
    return rows


def load_rows(paths: Iterable[str | Path]) -> list[dict]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def evaluate(model_or_name: Any, recipes: Sequence[Any] = (), tasks: Sequence[str] = ("ppl",),
             lengths: Sequence[int] = (2048,), seed: int = 0, trials: int = 1,
             depths: Sequence[float] = DEFAULT_DEPTHS, out: str | Path | None = None,
             progress: bool = True, tokenizer: Any = None, chunk: int = infer.DEFAULT_CHUNK,
             model_name: str | None = None, dense: bool = True, device: str | None = "auto",
             **options) -> list[dict]:
    """Run ``tasks`` at ``lengths`` for the dense model and each recipe; return the rows.

    ``dense=False`` skips the dense rows (when they were recorded already with the same
    settings: on a slow machine the dense 32k run is the longest part).

    ``model_or_name``: a model (``tokenizer=`` then needed for text tasks; tiny models without
    one get a character tokenizer), an embedded name such as ``"smollm2-135m"``, or ``"zoo:NAME"``.
    A model loaded by name goes to ``device`` (``"auto"``: CUDA when torch sees one).
    ``options`` go to tasks: ``needle_modes``, ``keys``, ``values`` (needle), ``decode_tokens`` (cost).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    if not lengths or any(int(n) < 2 for n in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {list(lengths)}")
    torch.manual_seed(seed)
    random.seed(seed)
    model, tok, name = _resolve(model_or_name, tokenizer, device)
    model.eval()
    name = model_name or name
    if tok is None:
        tok = data.CharTokenizer(model.config.vocab_size)
    env = infer.environment(infer.device_of(model))
    ctx = Context(tok=tok, lengths=[int(n) for n in lengths], seed=seed, trials=trials,
                  depths=[float(d) for d in depths], chunk=chunk, dense=model, options=options)
    variants = _variants(model, recipes)
    if not dense:
        variants = [v for v in variants if not v[2]]
    sink = open(out, "a") if out else None
    rows: list[dict] = []
    bar = _Bar(progress)
    try:
        with bar:
            for label, build, plain in variants:
                vm = build()
                ctx.recipe = label
                for t in tasks:
                    run, units = TASKS[t]
                    ctx.tick = bar.task(f"{t} · {label or 'dense'}", units(ctx))
                    t0 = time.perf_counter()
                    for r in run(ctx, vm):
                        row = {"model": name, "recipe": label, "plain_model": plain, **r,
                               "seed": seed, "trials": trials if t not in ("ppl", "kl", "cost") else None,
                               "chunk": chunk,
                               "elapsed_s": round(time.perf_counter() - t0, 3), **env}
                        if label != DENSE:
                            row["rewrite"] = rewrite_summary(vm)
                            if getattr(vm, "longfx_new_cache", None):    # kv_quant: the cache is the rewrite
                                row["rewrite"]["runtime_cache"] = type(vm.longfx_new_cache()).__name__
                            elif row["rewrite"]["rewritten"] == 0:
                                row["warning"] = ("the recipe rewrote no site: this row "
                                                  "measures the unchanged model")
                                _warn_once(label, row["warning"], row["rewrite"])
                            add_deltas(rows + [row])
                        rows.append(row)
                        if sink:
                            sink.write(json.dumps(row) + "\n")
                            sink.flush()
                    bar.done()
    finally:
        if sink:
            sink.close()
    return rows


def rewrite_summary(model: Any) -> dict:
    """Sites a compiled variant's recipe rewrote (transform stage) and the first reasons it
    gave for the ones it did not — so a recipe row can never silently be the dense model."""
    report = getattr(getattr(model, "longfx_backend", None), "report", None)
    if report is None or str(report.recipe or "").strip() in ("", "none"):
        return {"rewritten": None, "rejected": 0, "reasons": []}   # nothing asked: no verdict
    done, reasons, rejected = 0, [], 0
    for g in report.graphs:
        for r in g.results:
            if r.stage != "transform":
                continue
            if r.status == "rewritten":
                done += 1
            else:
                rejected += 1
                if r.reason and r.reason not in reasons:
                    reasons.append(r.reason)
    return {"rewritten": done, "rejected": rejected, "reasons": reasons[:3]}


_warned: set = set()


def _warn_once(label: str, message: str, summary: dict) -> None:
    if label in _warned:
        return
    _warned.add(label)
    import warnings

    why = "; ".join(summary.get("reasons") or []) or "no reason recorded"
    warnings.warn(f"{label}: {message} ({why})", RuntimeWarning, stacklevel=3)


class _Bar:
    """rich progress, one bar per (task, recipe); silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None
        self.cur = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p:
            self.p.__exit__(*exc)

    def task(self, desc: str, total: int):
        if not self.p:
            return lambda *a, **k: None
        self.cur = self.p.add_task(desc, total=total)
        cur = self.cur
        return lambda n=1, **k: self.p.advance(cur, n)

    def done(self):
        if self.p and self.cur is not None:
            t = self.p.tasks[-1]
            self.p.update(self.cur, completed=t.total)
