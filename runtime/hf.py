"""Run a model through the rewritten graph while it stays the model the user had.

:func:`compiled_copy` returns a shallow copy of the module (same parameters, buffers and
submodules; nothing is duplicated) whose ``forward`` is ``torch.compile(original.forward,
backend=...)``. Because only ``forward`` changes, the copy accepts the same arguments
(input_ids, attention_mask, position_ids, past_key_values, use_cache, ...), returns the same
output type, and HF ``generate()`` drives it as usual. The original model is left untouched.

A recipe that owns the runtime KV state (``kv_quant``) passes ``new_cache``: a factory of the
longfx cache (runtime/cache.py). The copy then swaps it in whenever ``past_key_values`` is
absent or an empty plain HF ``DynamicCache`` (what ``generate()`` makes before the first step;
it takes the cache back from ``outputs.past_key_values`` afterwards), and exposes the factory
as ``longfx_new_cache`` (the evaluation harness uses it).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from longfx.rewrite.capture import Backend, graph_breaks, new_graph_breaks, capture_config


def compiled_copy(model: torch.nn.Module, backend: Backend, *, dynamic: bool | None = None,
                  fullgraph: bool = False,
                  new_cache: Callable[[], Any] | None = None) -> torch.nn.Module:
    compiled_forward = torch.compile(model.forward, backend=backend, dynamic=dynamic,
                                     fullgraph=fullgraph)

    @functools.wraps(model.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if new_cache is not None and _wants_new_cache(kwargs):
            kwargs["past_key_values"] = new_cache()
        _reserve(kwargs)
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
    if new_cache is not None:
        object.__setattr__(clone, "longfx_new_cache", new_cache)
    return clone


def _reserve(kwargs: dict[str, Any]) -> None:
    """Let a longfx cache grow its storage for this call before Dynamo traces ``update``."""
    past = kwargs.get("past_key_values")
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    if callable(getattr(past, "reserve", None)) and isinstance(x, torch.Tensor) and x.dim() >= 2:
        past.reserve(x.shape[1])


def _wants_new_cache(kwargs: dict[str, Any]) -> bool:
    """True when the call would otherwise use a fresh plain HF cache (or none)."""
    if kwargs.get("use_cache") is False:
        return False
    past = kwargs.get("past_key_values")
    if past is None:
        return True
    from transformers import DynamicCache

    return type(past) is DynamicCache and past.get_seq_length() == 0


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
