"""Rich table of result rows: one line per (model, task, variant, length), one column group per
recipe (its primary metric and, for rewritten recipes, the delta vs dense)."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from rich.table import Table

PRIMARY = {"ppl": "ppl", "passkey": "acc", "passkey_alt": "acc", "passkey_hard": "acc",
           "needle": "acc", "kl": "kl", "cost": "prefill_s",
           "kv_bytes": "ratio"}     # KV bytes against dense, rows recorded by benchmark scripts
EXTRA = {"kl": ("top1_agree",),
         "cost": ("decode_s_per_token", "kv_bytes", "kv_bytes_decode", "peak_mem_bytes"),
         "kv_bytes": ("kv_bytes",)}


def fmt(metric: str, v) -> str:
    if v is None:
        return "—"
    if metric == "acc" or metric == "top1_agree":
        return f"{100 * v:.0f}%"
    if metric.endswith("bytes"):
        for unit in ("B", "KiB", "MiB", "GiB"):
            if abs(v) < 1024 or unit == "GiB":
                return f"{v:.1f} {unit}" if unit != "B" else f"{v:.0f} B"
            v /= 1024
    if metric.endswith("_s") or metric.endswith("_token"):
        return f"{v * 1000:.1f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if metric == "kl":
        return f"{v:.4f}"
    if metric in ("ppl", "nll"):
        return f"{v:.2f}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def pooled(rows: Iterable[dict]) -> list[dict]:
    """Rows of one cell per (model, recipe, task, variant, length): passkey depth cells are
    pooled (n-weighted) into the length row, ignoring the per-run pooled rows (depth None)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    rest = []
    for r in rows:
        if r["task"].startswith("passkey"):
            if r.get("depth") is not None:
                groups[(r["model"], r["recipe"], r["task"], r.get("variant"), r["length"])].append(r)
        else:
            rest.append(r)
    out = []
    for (model, recipe, task, variant, length), rs in groups.items():
        n = sum(r["n"] for r in rs)
        acc = sum(r["metrics"]["acc"] * r["n"] for r in rs) / n
        out.append({**rs[0], "depth": None, "n": n, "metrics": {"acc": acc},
                    "depths": sorted({r["depth"] for r in rs})})
    # keep the last row of each non-pooled cell (a re-run supersedes)
    last = {}
    for r in rest:
        last[(r["model"], r["recipe"], r["task"], r.get("variant"), r["length"])] = r
    return out + list(last.values())


def table(rows: list[dict], title: str | None = None) -> Table:
    rows = pooled(rows)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    t = Table(title=title, show_lines=False)
    for c in ("model", "task", "length", "n"):
        t.add_column(c, justify="right" if c in ("length", "n") else "left")
    for rc in recipes:
        t.add_column(rc or "dense", justify="right")
        if rc:
            t.add_column("Δ", justify="right")
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        task = r["task"] + (f":{r['variant']}" if r.get("variant") else "")
        cells[(r["model"], task, r["length"])][r["recipe"]] = r
    for (model, task, length), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        base = task.split(":")[0]
        metrics = (PRIMARY[base], *(m for m in EXTRA.get(base, ())
                                    if any(r["metrics"].get(m) is not None for r in by.values())))
        for i, m in enumerate(metrics):
            any_row = next(iter(by.values()))
            line = [model if i == 0 else "", task if m == task else f"{task} {m}",
                    str(length), str(any_row.get("n", ""))]
            dense = by.get("", {}).get("metrics", {}).get(m)
            for rc in recipes:
                r = by.get(rc)
                v = r["metrics"].get(m) if r else None
                line.append(fmt(m, v))
                if rc:
                    d = (v - dense) if (v is not None and dense is not None) else None
                    line.append(("+" if d is not None and d > 0 else "") + fmt(m, d) if d is not None else "—")
            t.add_row(*line)
    return t


def markdown(rows: list[dict], metrics_of=PRIMARY) -> str:
    """The same table as GitHub markdown (for RESULTS.md)."""
    rows = pooled(rows)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    head = ["task", "length", "n"] + [f"`{rc}`" if rc else "dense" for rc in recipes]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        task = r["task"] + (f":{r['variant']}" if r.get("variant") else "")
        cells[(task, r["length"])][r["recipe"]] = r
    for (task, length), by in sorted(cells.items()):
        base = task.split(":")[0]
        for m in (metrics_of[base], *EXTRA.get(base, ())):
            if m != metrics_of[base] and all(r["metrics"].get(m) is None for r in by.values()):
                continue                       # an extra metric no row has (older rows)
            any_row = next(iter(by.values()))
            line = [task if m == task else f"{task} {m}", str(length), str(any_row.get("n", ""))]
            for rc in recipes:
                r = by.get(rc)
                line.append(fmt(m, r["metrics"].get(m)) if r else "—")
            out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)
