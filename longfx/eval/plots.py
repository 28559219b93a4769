"""Matplotlib figures of result rows (PNG): accuracy vs length per recipe, accuracy vs KV bytes
(the Pareto view: up and to the left is better), and latency vs length. Panels without data
(e.g. no ``cost`` rows) say so instead of being left empty."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .table import pooled

ACC_TASKS = ("passkey", "passkey_hard", "needle")


def _label(r):
    return r["recipe"] or "dense"


def plot(rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pooled(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax_acc, ax_pareto, ax_lat = axes

    # 1. accuracy (or perplexity when no accuracy task ran) vs length
    acc = [r for r in rows if r["task"] in ACC_TASKS]
    series = defaultdict(list)
    if acc:
        for r in acc:
            key = (_label(r), r["task"] + (f":{r['variant']}" if r.get("variant") else ""))
            series[key].append((r["length"], 100 * r["metrics"]["acc"]))
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_ylim(-5, 105)
    else:
        for r in rows:
            if r["task"] == "ppl":
                series[(_label(r), "ppl")].append((r["length"], r["metrics"]["ppl"]))
        ax_acc.set_ylabel("perplexity")
        ax_acc.set_yscale("log")
    for (rc, task), pts in sorted(series.items()):
        pts.sort()
        ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{rc} · {task}")
    ax_acc.set_xlabel("context length (tokens)")
    ax_acc.set_title("quality vs length")

    # 2. accuracy vs KV bytes at the same (recipe, length)
    kv = {(r["recipe"], r["length"]): r["metrics"]["kv_bytes"] for r in rows if r["task"] == "cost"}
    pts = [(kv[(r["recipe"], r["length"])] / 2**20, 100 * r["metrics"]["acc"], _label(r), r["length"])
           for r in acc if (r["recipe"], r["length"]) in kv]
    if pts:
        for rc in sorted({p[2] for p in pts}):
            mine = [p for p in pts if p[2] == rc]
            ax_pareto.scatter([p[0] for p in mine], [p[1] for p in mine], label=rc)
            for p in mine:
                ax_pareto.annotate(str(p[3]), (p[0], p[1]), fontsize=7)
        ax_pareto.set_xscale("log")
    else:
        ax_pareto.text(0.5, 0.5, "needs an accuracy task\nand the cost task", ha="center",
                       va="center", transform=ax_pareto.transAxes)
    ax_pareto.set_ylim(-5, 105)
    ax_pareto.set_xlabel("KV state (MiB)")
    ax_pareto.set_ylabel("accuracy (%)")
    ax_pareto.set_title("accuracy vs KV bytes")

    # 3. latency vs length
    cost = [r for r in rows if r["task"] == "cost"]
    if cost:
        by = defaultdict(list)
        for r in cost:
            by[_label(r)].append((r["length"], r["metrics"]["prefill_s"], 1000 * r["metrics"]["decode_s_per_token"]))
        ax2 = ax_lat.twinx()
        for rc, p in sorted(by.items()):
            p.sort()
            ax_lat.plot([x[0] for x in p], [x[1] for x in p], marker="o", label=f"{rc} prefill")
            ax2.plot([x[0] for x in p], [x[2] for x in p], marker="x", ls="--", label=f"{rc} decode")
        ax_lat.set_ylabel("prefill (s)")
        ax2.set_ylabel("decode (ms / token)")
        ax2.legend(fontsize=7, loc="lower right")
    else:
        ax_lat.text(0.5, 0.5, "run the cost task", ha="center", va="center", transform=ax_lat.transAxes)
    ax_lat.set_xlabel("context length (tokens)")
    ax_lat.set_title("latency vs length")

    for ax in (ax_acc, ax_pareto, ax_lat):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    model = rows[0]["model"] if rows else ""
    hw = rows[0].get("hardware", "") if rows else ""
    fig.suptitle(f"longfx eval · {model} · {hw}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
