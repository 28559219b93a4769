"""CUDA-event timing (and the error measure) shared by the GPU benchmark scripts (imported as a sibling module: the
scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``)."""
from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone

import torch


def bench(fn, warmup: int, reps: int) -> dict:
    """Median / min / max milliseconds of ``fn()`` over ``reps`` CUDA-event-timed calls,
    after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": reps}


def graph_bench(fn, warmup: int, reps: int, calls: int = 10) -> dict:
    """:func:`bench` of ``fn`` captured as a CUDA graph of ``calls`` back-to-back calls and
    replayed (per-call times): GPU time without Python launch overhead, which dominates a
    decode step of a few microseconds of GPU work (a real decode loop runs as a graph too)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):                      # warm up (compiles, allocator) off the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    out = bench(graph.replay, warmup, reps)
    return {k: (v / calls if k.endswith("_ms") else v) for k, v in out.items()} | {
        "graph_calls": calls}


def median_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` (see :func:`bench`)."""
    return bench(fn, warmup, reps)["median_ms"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the largest magnitude of the reference ``b``."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def gpu_meta(**extra) -> dict:
    """What a GPU run's JSON records about where it ran: torch, Triton, cuDNN and Python
    versions, the GPU's name, the UTC date, and ``extra``."""
    meta = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no Triton: nothing to record
        pass
    return {**meta, **extra}


def save_json(path: str | None, **fields) -> None:
    """Write ``fields`` as one JSON object to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(fields, f, indent=1)


def map_checkout(root) -> None:
    """Make ``longfx.kernels`` importable straight from a checkout at ``root`` (no ``pip
    install``): the folders are mapped into ``longfx`` the way setup.py maps them, without
    running longfx/__init__."""
    import sys
    import types

    for name, path in (("longfx", root / "longfx"), ("longfx.kernels", root / "kernels")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
