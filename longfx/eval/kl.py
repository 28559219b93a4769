"""``kl``: next-token distributions of a recipe against the unrewritten model.

Both models read the first N corpus tokens chunk by chunk, each with its own cache (memory
stays flat); per position KL(dense || recipe) of the softmax distributions and whether their
argmax agrees. The dense row itself is the reference (kl 0, agreement 1) and is not computed.
"""
from __future__ import annotations

from typing import Iterator

import torch

from . import data, infer

NAME = "kl"


def units(ctx) -> int:
    return sum(-(-n // ctx.chunk) for n in ctx.lengths)


def compare(dense, model, ids: torch.Tensor, chunk: int, tick=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position KL [N], per-position top-1 agreement [N] bool)."""
    kls, agree = [], []
    for (_s, a, _c1), (_t, b, _c2) in zip(infer.chunked_logits(dense, ids, chunk),
                                          infer.chunked_logits(model, ids, chunk)):
        la = torch.log_softmax(a.float(), -1)
        lb = torch.log_softmax(b.float().to(la.device), -1)
        kls.append((la.exp() * (la - lb)).sum(-1).clamp_min(0).cpu())
        agree.append((la.argmax(-1) == lb.argmax(-1)).cpu())
        if tick:
            tick()
    return torch.cat(kls), torch.cat(agree)


def run(ctx, model) -> Iterator[dict]:
    toks = data.corpus_tokens(ctx.tok)
    for n in ctx.lengths:
        if model is ctx.dense:
            ctx.tick(-(-n // ctx.chunk))
            yield {"task": NAME, "length": n, "n": n, "reference": True,
                   "metrics": {"kl": 0.0, "kl_max": 0.0, "top1_agree": 1.0}}
            continue
        kl, ag = compare(ctx.dense, model, toks[:n], ctx.chunk, ctx.tick)
        yield {"task": NAME, "length": n, "n": n, "data": data.CORPUS_NAME,
               "metrics": {"kl": float(kl.mean()), "kl_max": float(kl.max()),
                           "kl_last_quarter": float(kl[-max(1, n // 4):].mean()),
                           "top1_agree": float(ag.float().mean())}}
