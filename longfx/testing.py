"""Pass-level testing for users: build a tiny model, run one pass, assert what it did.

    from longfx import testing
    model, inputs = testing.tiny("llama", "eager")              # 2-layer random-weight model
    result = testing.run_pass(model, inputs, rules=[MyRule()])  # canonical rules run first
    testing.assert_counts(result, "attention", rewritten=2)
    testing.assert_close(result)                                # rewritten graph == original
    testing.assert_rejected(result, "attention", "softmax over axis")

``run_pass`` captures the model's graphs with Dynamo (a recording backend), rewrites a copy
of each through the same engine ``longfx.compile`` uses, and keeps the originals, the
rewritten graphs, the reports and the example inputs Dynamo passed, so numerics can be
compared graph by graph. The zoo (``longfx.rewrite.testing.zoo``) and the hand-written
models (``longfx.rewrite.testing.handmade``) are the fixtures longfx tests itself with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from longfx.rewrite.capture import capture_config
from longfx.rewrite.engine import rewrite_graph
from longfx.rewrite.report import GraphReport, RewriteReport
from longfx.rewrite.rule import Rule
from longfx.rewrite.testing import handmade, zoo


def tiny(name: str, attn_implementation: str = "eager", seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A zoo model (HF architecture, random weights) or a hand-written one, with inputs."""
    if name in zoo.ZOO:
        return zoo.build(name, attn_implementation, seed=seed)
    if name in handmade.names():
        return handmade.make(name, seed=seed)
    raise KeyError(f"unknown tiny model {name!r}; zoo: {zoo.names()}, hand-written: {handmade.names()}")


def capture(model: torch.nn.Module, inputs: Any) -> list[tuple[fx.GraphModule, list]]:
    """Every graph Dynamo captures for one call of ``model(inputs)``, with its example inputs."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def record(gm: fx.GraphModule, example_inputs: list) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    # static shapes: each test sees concrete sizes whatever was compiled before it
    compiled = torch.compile(model, backend=record, dynamic=False)
    with torch.no_grad(), capture_config():
        _call(compiled, inputs)
    return graphs


def _call(fn: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


@dataclass
class PassResult:
    originals: list[fx.GraphModule] = field(default_factory=list)
    rewritten: list[fx.GraphModule] = field(default_factory=list)
    inputs: list[list] = field(default_factory=list)
    report: RewriteReport = field(default_factory=RewriteReport)

    @property
    def graphs(self) -> list[GraphReport]:
        return self.report.graphs

    def sites(self, kind: str | None = None) -> list:
        return [s for s in self.report.sites if kind is None or s.kind == kind]


def run_pass(model: torch.nn.Module, inputs: Any, rules: list[Rule] | None = None, *,
             canonicalize: bool = True) -> PassResult:
    """Capture ``model`` on ``inputs`` and rewrite each graph with the canonical rules (unless
    ``canonicalize=False``) followed by ``rules``."""
    result = PassResult()
    for i, (gm, example) in enumerate(capture(model, inputs)):
        new, graph_report = rewrite_graph(gm, example, rules, name=f"graph {i}",
                                          canonicalize=canonicalize)
        result.originals.append(gm)
        result.rewritten.append(new)
        result.inputs.append(example)
        result.report.graphs.append(graph_report)
    return result


def assert_counts(result: PassResult, kind: str, *, found: int | None = None,
                  rewritten: int | None = None, rejected: int | None = None,
                  rewritable: int | None = None) -> None:
    """Assert how many sites of ``kind`` were found / rewritable / rewritten / rejected."""
    c = result.report.counts().get(kind, {"found": 0, "rewritable": 0, "rewritten": 0, "rejected": 0})
    for name, want in (("found", found), ("rewritable", rewritable), ("rewritten", rewritten),
                       ("rejected", rejected)):
        if want is not None and c.get(name, 0) != want:
            rows = [(r["key"], r["status"], r.get("reason")) for r in result.report.rows()
                    if r["kind"] == kind]
            raise AssertionError(f"{kind}: expected {name}={want}, got {c.get(name, 0)}; sites: {rows}")


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flat(e)]
    if isinstance(x, dict):
        return [t for e in x.values() for t in _flat(e)]
    return []


def max_rel_error(a: Any, b: Any) -> float:
    """Largest ‖a−b‖∞ / max(‖b‖∞, tiny) over matching tensors of two nested outputs."""
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb):
        raise AssertionError(f"outputs differ in structure: {len(fa)} vs {len(fb)} tensors")
    worst = 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            raise AssertionError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if not x.is_floating_point():
            if not torch.equal(x, y):
                raise AssertionError("integer outputs differ")
            continue
        scale = y.abs().max().clamp_min(1e-12)
        worst = max(worst, float(((x - y).abs().max() / scale).nan_to_num(float("inf"))))
    return worst


def assert_close(result: PassResult, rtol: float = 1e-5) -> float:
    """Run each rewritten graph and its original on the recorded inputs; assert agreement."""
    worst = 0.0
    for orig, new, example in zip(result.originals, result.rewritten, result.inputs):
        with torch.no_grad():
            err = max_rel_error(new(*example), orig(*example))
        worst = max(worst, err)
    if worst > rtol:
        raise AssertionError(f"rewritten graph differs from the original: relative error {worst:.3g} > {rtol}")
    return worst


def assert_rejected(result: PassResult, kind: str, reason: str) -> None:
    """Assert some site of ``kind`` was rejected with a reason containing ``reason``."""
    rows = [r for r in result.report.rows() if r["kind"] == kind and r["status"] == "rejected"]
    if not any(reason in (r.get("reason") or "") for r in rows):
        raise AssertionError(f"no {kind} site rejected with {reason!r}; rejected: "
                             f"{[(r['key'], r.get('reason')) for r in rows]}")


__all__ = ["PassResult", "assert_close", "assert_counts", "assert_rejected", "capture",
           "max_rel_error", "run_pass", "tiny", "zoo", "handmade"]
