"""``needle``: RULER-style multi-key / multi-value retrieval.

``multikey``: several names each with a 6-digit code; the question asks for one name's code;
score 1 when the first number answered is that code. ``multivalue``: one name with several
codes; the question asks for all; score = fraction of the codes found in the answer (recall).
Options: ``needle_modes`` (default both), ``keys`` (4), ``values`` (4).
"""
from __future__ import annotations

import random
from typing import Iterator

from . import data, infer

NAME = "needle"
MODES = ("multikey", "multivalue")


def _modes(ctx) -> list[str]:
    m = ctx.options.get("needle_modes", MODES)
    return [m] if isinstance(m, str) else list(m)


def units(ctx) -> int:
    return len(ctx.lengths) * len(_modes(ctx)) * ctx.trials


def prompts(tok, length: int, mode: str, seed: int, trials: int, keys: int = 4, values: int = 4):
    return [data.needle(tok, length, random.Random(data.stable_seed("needle", seed, length, mode, t)),
                        mode, keys, values) for t in range(trials)]


def run(ctx, model) -> Iterator[dict]:
    keys, values = int(ctx.options.get("keys", 4)), int(ctx.options.get("values", 4))
    eos = getattr(ctx.tok, "eos_token_id", None)
    for length in ctx.lengths:
        for mode in _modes(ctx):
            scores, answers = [], []
            max_new = 10 if mode == "multikey" else 9 * values + 6
            for p in prompts(ctx.tok, length, mode, ctx.seed, ctx.trials, keys, values):
                text = data.decode(ctx.tok, infer.greedy(model, p.ids, max_new, ctx.chunk, eos=eos))
                found = data.numbers(text)
                if mode == "multikey":
                    scores.append(float(bool(found) and found[0] == p.answers[0]))
                else:
                    scores.append(len(set(found) & set(p.answers)) / len(p.answers))
                answers.append({"want": p.answers, "answer": text.strip()[:80]})
                ctx.tick()
            yield {"task": NAME, "variant": mode, "length": length, "n": len(scores),
                   "metrics": {"acc": sum(scores) / len(scores)}, "answers": answers,
                   "keys": keys if mode == "multikey" else 1, "values": 1 if mode == "multikey" else values}
