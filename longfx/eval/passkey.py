"""``passkey`` / ``passkey_alt`` / ``passkey_hard``: a 5-digit key at several depths, answered
greedily.

The prompt ends with the raw continuation "... The pass key is" (no chat template), the model
continues greedily for a few tokens and the first number it writes is compared with the key.
``passkey``: the classic prompt, Landmark Attention's template (Mohtashami & Jaggi 2023), the
one the literature's passkey numbers use. ``passkey_alt``: longfx's own filler and wording (the
harness's ``passkey`` before 2026-11-23, session 5; rows measured with it carry no ``prompt``
field). ``passkey_hard``: the ``alt`` wording with the key in corpus prose.
One row per (length, depth) cell plus one per length with depth ``None`` (all depths pooled).
"""
from __future__ import annotations

import random
import time
from typing import Iterator

from . import data, infer

NAME = "passkey"
ALT = "passkey_alt"
HARD = "passkey_hard"
MAX_NEW = 10


def units(ctx) -> int:
    return len(ctx.lengths) * len(ctx.depths) * ctx.trials


def _seed(seed: int, length: int, depth: float, trial: int, hard: bool) -> int:
    return data.stable_seed("passkey", seed, length, round(depth * 1000), trial, hard)


def prompts(tok, length: int, depth: float, seed: int, trials: int, hard: bool = False,
            style: str = "classic") -> list[data.Prompt]:
    """The prompts of one cell; the same seed gives the same keys and depths in every style."""
    return [data.passkey(tok, length, depth, random.Random(_seed(seed, length, depth, t, hard)),
                         hard, style) for t in range(trials)]


def _digits_done(tok, want: int):
    def stop(out: list[int]) -> bool:
        got = data.numbers(data.decode(tok, out))
        return bool(got) and len(got[0]) >= want and not data.decode(tok, out[-1:]).strip().isdigit()
    return stop


def run(ctx, model, hard: bool = False, style: str = "classic") -> Iterator[dict]:
    task = HARD if hard else (ALT if style == "alt" else NAME)
    style = "alt" if hard else style
    eos = getattr(ctx.tok, "eos_token_id", None)
    for length in ctx.lengths:
        pooled, answers = [], []
        for depth in ctx.depths:
            hits, t0 = [], time.perf_counter()
            for p in prompts(ctx.tok, length, depth, ctx.seed, ctx.trials, hard, style):
                out = infer.greedy(model, p.ids, MAX_NEW, ctx.chunk, stop=_digits_done(ctx.tok, 5), eos=eos)
                text = data.decode(ctx.tok, out)
                got = data.first_number(text)
                hits.append(got == p.answers[0])
                answers.append({"depth": depth, "key": p.answers[0], "answer": text.strip()[:40]})
                ctx.tick()
            pooled += hits
            yield {"task": task, "length": length, "depth": depth, "n": len(hits),
                   "metrics": {"acc": sum(hits) / len(hits)}, "prompt_tokens": len(p.ids),
                   "prompt": style, "cell_s": round(time.perf_counter() - t0, 3)}
        yield {"task": task, "length": length, "depth": None, "n": len(pooled),
               "metrics": {"acc": sum(pooled) / len(pooled)}, "prompt": style, "answers": answers}


def run_alt(ctx, model) -> Iterator[dict]:
    return run(ctx, model, style="alt")


def run_hard(ctx, model) -> Iterator[dict]:
    return run(ctx, model, hard=True)
