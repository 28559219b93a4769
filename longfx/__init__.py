"""longfx: compiler passes for long-context inference.

    import longfx
    model, tok = longfx.load("smollm2-135m")
    print(longfx.inspect(model))                       # attention / RoPE / KV sites
    print(longfx.diff(model, ""))                      # what a recipe changes
    fast = longfx.compile(model, "")                   # same model, rewritten graph
    longfx.export_onnx(model, "out/smollm2", "sink_window(sink=4, window=1024)")   # + ORT
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from longfx.api import Diff, backend, compile, diff, inspect  # noqa: E402,A004

_LAZY = {"load": ("longfx.models", "load"), "parse": ("longfx.recipes", "parse"),
         "recipes": ("longfx.recipes", None), "testing": ("longfx.testing", None),
         "models": ("longfx.models", None),
         "export_onnx": ("longfx.runtime.onnx_export", "export_onnx")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'longfx' has no attribute {name!r}")


__all__ = ["Diff", "backend", "compile", "diff", "export_onnx", "inspect", "load", "parse",
           "recipes", "testing"]
