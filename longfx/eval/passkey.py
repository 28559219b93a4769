"""``passkey`` / ``passkey_alt`` / ``passkey_hard``: a 5-digit key at several depths, answered
greedily.

The prompt ends with the raw continuation "... The pass key is" (no chat template), the model
continues greedily for a few tokens and the first number it writes is compared with the key.
``passkey``: the classic prompt, Landmark Attention's template (Mohtashami & Jaggi 2023), the
one the literature's passkey numbers use. ``passkey_alt``: longfx's own filler and wording (the
harness's ``passkey`` before 2026-11-23, session 5; rows measured with it carry no ``prompt``
field). ``passkey_hard``: the ``alt`` wording with the key in corpus prose.
One row per (length, depth) cell plus one per length with depth ``None`` (all depths pooled).

Placement. ``passkey_alt`` and ``passkey_hard`` put every trial of a cell at exactly its depth.
``passkey`` follows the classic protocol, where the key's position is drawn uniformly (Landmark
Attention draws the haystack prefix length at random): each trial draws its depth uniformly in
the depth's cell, the interval reaching halfway to the neighbouring depths (with the default
depths 0, 0.25, ..., 1: [0, 0.125], [0.125, 0.375], ..., [0.875, 1]; one depth alone: exact).
With a fixed position the trials of a cell differ only in the key's digits and succeed or fail
together (SmolLM2, H100, 2026-11-23: dense at 8k answered "the pass key." in all 4 trials at
depths 0 and 1, the key next to the instruction or the question, and found it in all 12 at
0.25–0.75), so n trials would weigh like one.
"""
from __future__ import annotations

import random
import time
from typing import Iterator, Sequence

from . import data, infer

NAME = "passkey"
ALT = "passkey_alt"
HARD = "passkey_hard"
MAX_NEW = 10


def units(ctx) -> int:
    return len(ctx.lengths) * len(ctx.depths) * ctx.trials


def _seed(seed: int, length: int, depth: float, trial: int, hard: bool) -> int:
    return data.stable_seed("passkey", seed, length, round(depth * 1000), trial, hard)


def cell(depth: float, depths: Sequence[float]) -> tuple[float, float]:
    """The interval of depths a classic trial of ``depth`` draws from: halfway to the neighbours
    in ``depths``, clipped to [0, 1]; ``(depth, depth)`` when it is the only depth."""
    others = sorted(d for d in set(depths) if d != depth)
    if not others:
        return depth, depth
    below = [d for d in others if d < depth]
    above = [d for d in others if d > depth]
    lo = (below[-1] + depth) / 2 if below else 0.0
    hi = (above[0] + depth) / 2 if above else 1.0
    return max(0.0, lo), min(1.0, hi)


def prompts(tok, length: int, depth: float, seed: int, trials: int, hard: bool = False,
            style: str = "classic", depths: Sequence[float] | None = None) -> list[data.Prompt]:
    """The prompts of one cell; the same seed gives the same keys in every style. The classic
    style draws each trial's depth in ``cell(depth, depths)`` (module docstring)."""
    out = []
    for t in range(trials):
        rng = random.Random(_seed(seed, length, depth, t, hard))
        at = depth
        if style == "classic" and not hard:
            lo, hi = cell(depth, depths if depths is not None else [depth])
            at = random.Random(_seed(seed, length, depth, t, "position")).uniform(lo, hi)
        out.append(data.passkey(tok, length, at, rng, hard, style))
    return out


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
            for p in prompts(ctx.tok, length, depth, ctx.seed, ctx.trials, hard, style, ctx.depths):
                out = infer.greedy(model, p.ids, MAX_NEW, ctx.chunk, stop=_digits_done(ctx.tok, 5), eos=eos)
                text = data.decode(ctx.tok, out)
                got = data.first_number(text)
                hits.append(got == p.answers[0])
                answers.append({"depth": depth, "at": round(p.depth, 4), "key": p.answers[0],
                                "answer": text.strip()[:40]})
                ctx.tick()
            pooled += hits
            lo, hi = cell(depth, ctx.depths) if style == "classic" else (depth, depth)
            yield {"task": task, "length": length, "depth": depth, "n": len(hits),
                   "metrics": {"acc": sum(hits) / len(hits)}, "prompt_tokens": len(p.ids),
                   "prompt": style, "depth_range": [lo, hi],
                   "cell_s": round(time.perf_counter() - t0, 3)}
        yield {"task": task, "length": length, "depth": None, "n": len(pooled),
               "metrics": {"acc": sum(pooled) / len(pooled)}, "prompt": style, "answers": answers}


def run_alt(ctx, model) -> Iterator[dict]:
    return run(ctx, model, style="alt")


def run_hard(ctx, model) -> Iterator[dict]:
    return run(ctx, model, hard=True)
