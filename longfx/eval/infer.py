"""Inference helpers shared by the tasks: chunked prefill through a cache, greedy decoding,
KV-state size, and the environment stamp (hardware, versions, date) every row carries."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import Any, Callable, Iterator

import torch

DEFAULT_CHUNK = 1024


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def new_cache(model):
    """The cache a chunked pass feeds: the model's own longfx cache when its recipe provides
    one (``kv_quant``: ``longfx_new_cache`` set by ``compiled_copy``), else a DynamicCache."""
    factory = getattr(model, "longfx_new_cache", None)
    if callable(factory):
        return factory()
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


def chunked_logits(model, ids: torch.Tensor, chunk: int = DEFAULT_CHUNK, cache=None,
                   keep_last: bool = False) -> Iterator[tuple[int, torch.Tensor, Any]]:
    """Feed ``ids`` (1-D) through ``model`` ``chunk`` tokens at a time with one cache.

    Yields ``(start, logits, cache)`` per chunk; logits are ``[len, V]`` (or ``[1, V]`` for the
    last position only when ``keep_last``). Memory stays flat in the sequence length apart from
    the cache itself.
    """
    dev = device_of(model)
    cache = new_cache(model) if cache is None else cache
    n = ids.numel()
    for s in range(0, n, chunk):
        x = ids[s:s + chunk].to(dev)[None]
        kw = {"logits_to_keep": 1} if keep_last else {}
        with torch.no_grad():
            out = model(input_ids=x, past_key_values=cache, use_cache=True, **kw)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else cache
        yield s, out.logits[0], cache


def prefill(model, ids: torch.Tensor, chunk: int = DEFAULT_CHUNK, keep_all: bool = False):
    """(last-position logits [V], cache) after feeding all of ``ids``."""
    last, cache = None, None
    for _s, logits, cache in chunked_logits(model, ids, chunk, keep_last=not keep_all):
        last = logits[-1]
    return last, cache


def greedy(model, ids: list[int] | torch.Tensor, max_new: int, chunk: int = DEFAULT_CHUNK,
           stop: Callable[[list[int]], bool] | None = None, eos: int | None = None) -> list[int]:
    """Greedy continuation of ``ids``: chunked prefill, then one token at a time."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    logits, cache = prefill(model, ids, chunk)
    dev = device_of(model)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits.argmax())
        if eos is not None and nxt == eos:
            break
        out.append(nxt)
        if stop is not None and stop(out):
            break
        with torch.no_grad():
            o = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache, use_cache=True)
        cache = o.past_key_values if getattr(o, "past_key_values", None) is not None else cache
        logits = o.logits[0, -1]
    return out


def kv_bytes(cache) -> int:
    """Bytes held by the tensors of a KV cache (HF DynamicCache layers, tuples, or any object
    whose attributes hold tensors, e.g. a longfx runtime cache), each storage counted once."""
    if callable(getattr(cache, "nbytes", None)):       # a longfx cache counts its own state
        return int(cache.nbytes())
    seen: set[int] = set()
    total = 0

    def walk(obj, depth=0):
        nonlocal total
        if depth > 6 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for o in vars(obj).values():
                walk(o, depth + 1)

    walk(cache)
    return total


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(dev: torch.device | None = None) -> dict[str, Any]:
    import transformers

    env = {
        "hardware": cpu_name(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if dev is not None and dev.type == "cuda":
        env["device"] = "cuda"
        env["hardware"] = torch.cuda.get_device_name(dev)
        env["cpu"] = cpu_name()
    try:
        from importlib.metadata import version

        env["longfx"] = version("longfx")
    except Exception:  # pragma: no cover
        pass
    return env
