"""``ppl``: perplexity over the first N tokens of the CPython help-topics text.

One chunked pass at the longest requested length (a DynamicCache carried across chunks, loss
computed per chunk, so memory stays flat apart from the KV state); each shorter length is read
off as a prefix of that pass, which for a causal model equals running it alone.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from . import data, infer

NAME = "ppl"


def units(ctx) -> int:
    return math.ceil(max(ctx.lengths) / ctx.chunk)


def nll_stream(model, ids: torch.Tensor, chunk: int, tick=None, cache=None) -> torch.Tensor:
    """Per-position negative log-likelihood ``[len(ids) - 1]`` (position t predicts ids[t+1]).
    ``cache``: the KV cache to read through (default: ``infer.chunked_logits``'s own)."""
    out = []
    n = ids.numel()
    for s, logits, _cache in infer.chunked_logits(model, ids, chunk, cache=cache):
        tgt = ids[s + 1:s + 1 + logits.shape[0]].to(logits.device)
        lg = logits[: tgt.numel()].float()
        out.append(torch.nn.functional.cross_entropy(lg, tgt, reduction="none").cpu())
        if tick:
            tick()
    nll = torch.cat(out)
    assert nll.numel() == n - 1
    return nll


def run(ctx, model) -> Iterator[dict]:
    lengths = sorted(set(ctx.lengths))
    toks = data.corpus_tokens(ctx.tok)
    top = lengths[-1]
    if toks.numel() < top:
        raise ValueError(f"ppl: the corpus has {toks.numel()} tokens, fewer than {top}")
    nll = nll_stream(model, toks[:top], ctx.chunk, ctx.tick)
    for n in lengths:
        mean = float(nll[: n - 1].mean())
        yield {"task": NAME, "length": n, "n": n - 1,
               "metrics": {"ppl": math.exp(mean), "nll": mean},
               "data": data.CORPUS_NAME, "prefix_of": top, "chunk": ctx.chunk}
