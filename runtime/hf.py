"""Run a model through the rewritten graph while it stays the model the user had.

:func:`compiled_copy` returns a shallow copy of the module (same parameters, buffers and
submodules; nothing is duplicated) whose ``forward`` is ``torch.compile(original.forward,
backend=...)``. Because only ``forward`` changes, the copy accepts the same arguments
(input_ids, attention_mask, position_ids, past_key_values, use_cache, ...), returns the same
output type, and HF ``generate()`` drives it as usual. The original model is left untouched.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from longfx.rewrite.capture import Backend, graph_breaks, new_graph_breaks, capture_config


def compiled_copy(model: torch.nn.Module, backend: Backend, *, dynamic: bool | None = None,
                  fullgraph: bool = False) -> torch.nn.Module:
    compiled_forward = torch.compile(model.forward, backend=backend, dynamic=dynamic,
                                     fullgraph=fullgraph)

    @functools.wraps(model.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        before = graph_breaks()
        with capture_config():
            out = compiled_forward(*args, **kwargs)
        for reason in new_graph_breaks(before):
            msg = f"graph break (that part runs unrewritten): {reason}"
            if msg not in backend.report.warnings:
                backend.report.warnings.append(msg)
        return out

    clone = copy.copy(model)
    object.__setattr__(clone, "forward", forward)
    object.__setattr__(clone, "longfx_backend", backend)
    return clone


def example_inputs(model: torch.nn.Module, seq_len: int = 16, batch: int = 1) -> dict[str, Any]:
    """Inputs an HF model accepts, made from its config (deterministic token ids)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"{type(model).__name__} is not a transformers model: pass example inputs "
            "explicitly, e.g. longfx.inspect(model, inputs=(x,))")
    vocab = getattr(config, "vocab_size", None) or 100
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab - 1), (batch, seq_len), generator=g).to(device)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        dec = torch.full((batch, max(2, seq_len // 2)), start, dtype=torch.long, device=device)
        inputs["decoder_input_ids"] = dec
    return inputs
