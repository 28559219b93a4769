"""What a rewrite found and did: per-site rows, the graph diff, and cost estimates.

A :class:`RewriteReport` collects one :class:`GraphReport` per captured graph (a model under
Dynamo may give several: prefill and decode, or pieces around a graph break). Each site row
says matched (found, nothing asked of it), rewritten (by which rules) or rejected (and why).
``diff()`` is the unified diff of the generated graph code before and after. ``estimate(L)``
gives KV-state bytes and attention FLOPs for a context of L tokens before and after, from the
facts each site carries: a family that keeps fewer tokens sets ``kv_budget`` (tokens kept),
one that quantizes sets ``kv_bits``, a sparse one sets ``density`` (fraction of the dense
score matrix computed); a dense site keeps everything.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from longfx.rewrite.manager import SiteResult
from longfx.rewrite.sites import Site


@dataclass
class GraphReport:
    name: str
    sites: list[Site]
    results: list[SiteResult] = field(default_factory=list)
    code_before: str = ""
    code_after: str = ""
    warnings: list[str] = field(default_factory=list)

    def status(self, site: Site) -> tuple[str, str | None, list[str]]:
        rows = [r for r in self.results if r.site is site]
        # a recipe's verdict outranks canonicalization: a site a transform rule rejected is
        # reported rejected (with that reason) even though it was canonicalized
        transform = [r for r in rows if r.stage == "transform"]
        if transform and not any(r.status == "rewritten" for r in transform):
            return "rejected", transform[0].reason, [r.rule for r in rows
                                                     if r.status == "rewritten"]
        rewritten = [r.rule for r in rows if r.status == "rewritten"]
        if rewritten:
            return "rewritten", None, rewritten
        if not site.rewritable:
            return "rejected", site.reason, []
        rejected = [r for r in rows if r.status == "rejected"]
        if rejected:
            return "rejected", rejected[0].reason, []
        return "matched", None, []

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.code_before.splitlines(keepends=True), self.code_after.splitlines(keepends=True),
            fromfile=f"{self.name} (before)", tofile=f"{self.name} (after)", n=2)) + self.tables()

    def tables(self) -> str:
        """The frequency table of each RoPE site a recipe changed (facts set by passes/rope)."""
        out = []
        for s in self.sites:
            f = s.facts
            if s.kind == "rope" and "inv_freq_before" in f:
                out.append(f"frequency table {self.name} {s.key} ({f.get('rope_method')}): "
                           f"mscale {f.get('mscale')}\n  inv_freq before {f['inv_freq_before']}"
                           f"\n  inv_freq after  {f['inv_freq_after']}\n")
        return "".join(out)


def _kv_row_bytes(site: Site, context: int, after: bool) -> float:
    f = site.facts
    heads = f.get("num_kv_heads") or 1
    dim = f.get("head_dim") or 0
    bits = (f.get("kv_bits") if after else None) or f.get("dtype_bits") or 32
    tokens = context
    if after and f.get("kv_budget"):
        tokens = min(context, int(f["kv_budget"]))
    return 2.0 * heads * dim * tokens * bits / 8


def _attn_flops(site: Site, context: int, after: bool) -> float:
    f = site.facts
    heads = f.get("num_heads") or 1
    dim = f.get("head_dim") or 0
    causal = f.get("is_causal") or str(f.get("mask_kind", "")).startswith(("causal", "sliding"))
    pairs = context * (context + 1) / 2 if causal else float(context) * context
    density = f.get("density", 1.0) if after else 1.0
    if after and f.get("sparse_spec"):
        from longfx.passes.sparse import spec_density

        density = spec_density(site, context)
    return 4.0 * heads * dim * pairs * density


@dataclass
class RewriteReport:
    model: str = ""
    recipe: str = ""
    graphs: list[GraphReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # KV-state bytes per layer read from a KV-cache recipe's runtime cache (runtime/state_bytes.py):
    # {"context": L, "recipe": str, "layers": [{"layer", "before", "after", "bf16"}] or None,
    #  "note": str}
    kv_state: dict[str, Any] | None = None

    @property
    def sites(self) -> list[Site]:
        return [s for g in self.graphs for s in g.sites]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for g in self.graphs:
            for s in g.sites:
                status, reason, rules = g.status(s)
                row = s.to_dict()
                row.update(graph=g.name, status=status, rules=rules)
                if reason:
                    row["reason"] = reason
                out.append(row)
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.rows():
            c = out.setdefault(row["kind"], {"found": 0, "rewritable": 0, "rewritten": 0,
                                             "rejected": 0})
            c["found"] += 1
            c["rewritable"] += bool(row["rewritable"])
            c[row["status"]] = c.get(row["status"], 0) + 1
        return out

    def diff(self) -> str:
        return self.graph_diff() + self.kv_state_text()

    def graph_diff(self) -> str:
        """The graph-code diff of every captured graph (without the KV-state block)."""
        return "".join(g.diff() for g in self.graphs)

    def kv_state_text(self) -> str:
        """KV-state bytes per layer before → after (a KV-cache recipe; "" otherwise)."""
        ks = self.kv_state
        if not ks:
            return ""
        if ks["layers"] is None:
            return f"KV state: {ks['note']}\n"
        from longfx.runtime.state_bytes import render

        return render(ks["layers"], ks["context"], ks["recipe"]) + f"  ({ks['note']})\n"

    def estimate(self, context: int = 8192) -> dict[str, float]:
        """KV bytes and prefill attention FLOPs at ``context`` tokens (batch 1), before/after."""
        attn = [s for g in self.graphs[:1] for s in g.sites if s.kind == "attention"]
        return {
            "context": context,
            "kv_bytes_before": sum(_kv_row_bytes(s, context, False) for s in attn),
            "kv_bytes_after": sum(_kv_row_bytes(s, context, True) for s in attn),
            **self._kv_state_bytes(context),
            "attn_flops_before": sum(_attn_flops(s, context, False) for s in attn),
            "attn_flops_after": sum(_attn_flops(s, context, True) for s in attn),
        }

    def _kv_state_bytes(self, context: int) -> dict[str, Any]:
        """The runtime caches' own bytes (the model's and the recipe's), when they were read at
        this ``context``."""
        ks = self.kv_state
        if not ks or ks["layers"] is None or ks["context"] != context:
            return {}
        return {"kv_bytes_before": float(sum(r["before"] for r in ks["layers"])),
                "kv_bytes_after": float(sum(r["after"] for r in ks["layers"])),
                "kv_bytes_source": "runtime caches (runtime/state_bytes.py)"}

    def to_dict(self, context: int = 8192) -> dict[str, Any]:
        return {"model": self.model, "recipe": self.recipe, "sites": self.rows(),
                "counts": self.counts(), "estimate": self.estimate(context),
                "graphs": [g.name for g in self.graphs],
                "kv_state": self.kv_state,
                "warnings": self.warnings + [w for g in self.graphs for w in g.warnings]}

    def to_json(self, context: int = 8192, **kw) -> str:
        return json.dumps(self.to_dict(context), **kw)

    # ------------------------------------------------------------------ rendering
    def table(self, kinds: tuple[str, ...] = ("attention", "rope", "kv")):
        from rich.table import Table

        t = Table(title=f"{self.model or 'model'}: sites" + (f" — {self.recipe}" if self.recipe else ""))
        for col in ("site", "layer", "spelling", "status", "details"):
            t.add_column(col)
        for row in self.rows():
            if row["kind"] not in kinds:
                continue
            status = row["status"]
            color = {"rewritten": "green", "matched": "cyan", "rejected": "red"}[status]
            detail = _details(row)
            if row.get("reason"):
                detail = f"{detail}  [red]{row['reason']}[/red]".strip()
            t.add_row(row["key"], "" if row["layer"] is None else str(row["layer"]),
                      row["spelling"], f"[{color}]{status}[/{color}]", detail)
        return t

    def summary(self, context: int = 8192) -> str:
        parts = []
        for kind, c in self.counts().items():
            parts.append(f"{c['found']} {kind} ({c['rewritten']} rewritten, {c['rejected']} rejected)")
        e = self.estimate(context)
        gib = 2 ** 30
        return ("; ".join(parts) + f". At {context} tokens: KV {e['kv_bytes_before'] / gib:.3f} → "
                f"{e['kv_bytes_after'] / gib:.3f} GiB, attention {e['attn_flops_before'] / 1e12:.2f} → "
                f"{e['attn_flops_after'] / 1e12:.2f} TFLOP")

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        import io

        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text() + self.summary() + "\n"


def _details(row: dict[str, Any]) -> str:
    if row["kind"] == "attention":
        bits = [f"H={row.get('num_heads')}/{row.get('num_kv_heads')}", f"D={row.get('head_dim')}"]
        if row.get("mask_kind"):
            seen = f" (seen at {row['mask_seen_len']} keys)" if row.get("mask_seen_len") else ""
            bits.append(f"{row['mask_kind']}{seen}")
        elif row.get("is_causal"):
            bits.append("causal")
        if row.get("softcap"):
            bits.append(f"softcap={row['softcap']}")
        if row.get("gqa") and row["gqa"] != "none":
            bits.append(f"gqa {row['gqa']}")
        return " ".join(bits)
    if row["kind"] == "rope":
        return " ".join(f"{k}={row[k]}" for k in ("style", "rotary_dim", "base") if row.get(k) is not None)
    if row["kind"] == "kv":
        return " ".join(f"{k}={row[k]}" for k in ("role", "axis", "static", "attention") if row.get(k) is not None)
    return ""
