"""Evaluation data: the long English text that ships with CPython, and prompt builders.

Everything is generated or read locally. The long text is ``pydoc_data.topics`` (the help
topics of the running CPython, about 465k characters, ~113k SmolLM2 tokens), joined in sorted
topic order so it is the same for a given Python version. Prompt builders take an explicit
``random.Random`` seed, so the same seed gives the same prompts token for token.
"""
from __future__ import annotations

import functools
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

CORPUS_NAME = f"pydoc_data.topics (CPython {sys.version_info[0]}.{sys.version_info[1]})"


def stable_seed(*parts) -> int:
    """A seed from ``parts`` that is the same in every process (``hash()`` of str is not)."""
    return zlib.crc32(repr(parts).encode())


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


class CharTokenizer:
    """Stand-in tokenizer for tiny random models without one (the test zoo): one id per character.

    0 is end-of-sequence, 1 a newline, printable ASCII ``c`` is ``ord(c) - 30`` (2..96), anything
    else 97 (decoded as "?"); ids past the vocabulary are clamped. Needs vocab >= 98 to round-trip.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.name_or_path = f"char{vocab_size}"

    def _id(self, c: str) -> int:
        i = 1 if c == "\n" else (ord(c) - 30 if 32 <= ord(c) <= 126 else 97)
        return min(i, self.vocab_size - 1)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._id(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        def ch(i: int) -> str:
            return "" if i == 0 else "\n" if i == 1 else chr(i + 30) if i <= 96 else "?"
        return "".join(ch(int(i)) for i in ids)


def encode(tok, text: str) -> list[int]:
    if isinstance(tok, CharTokenizer):
        return tok.encode(text)
    return list(tok(text, add_special_tokens=False).input_ids)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def _tok_key(tok) -> str:
    return f"{type(tok).__name__}:{getattr(tok, 'name_or_path', '')}:{len(tok) if hasattr(tok, '__len__') else tok.vocab_size}"


_TOKEN_CACHE: dict[str, torch.Tensor] = {}


def corpus_tokens(tok) -> torch.Tensor:
    """The corpus as a 1-D int64 tensor, tokenized once per tokenizer and cached in memory."""
    key = _tok_key(tok)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = torch.tensor(encode(tok, corpus_text()), dtype=torch.long)
    return _TOKEN_CACHE[key]


def prose_tokens(tok, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of corpus prose from a seeded offset (wrapping around)."""
    toks = corpus_tokens(tok)
    start = rng.randrange(0, max(1, len(toks) - n))
    out = toks[start:start + n].tolist()
    while len(out) < n:
        out += toks[: n - len(out)].tolist()
    return out


# ---------------------------------------------------------------- prompts

# The classic passkey prompt: the template of Mohtashami & Jaggi (2023, "Landmark Attention",
# arXiv:2305.16300), reused by LongLoRA and YaRN, and the one the reference numbers were
# measured with. It is a benchmark definition, so its text is kept as published.
LANDMARK_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.")
LANDMARK_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and"
                   " back again.")
LANDMARK_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
LANDMARK_QUESTION = " What is the pass key? The pass key is"

# Written for longfx: neutral sentences that carry no information and repeat cleanly. The
# harness's passkey prompt before 2026-11-23 (session 5); now ``style="alt"`` (task
# ``passkey_alt``) and the frame of ``passkey_hard``.
FILLER = (" The river runs past the old mill. Clouds drift slowly over the hills."
          " A bell rings somewhere in the valley. Then everything is quiet again.")
PASSKEY_INTRO = ("Somewhere in the long text below a pass key is hidden. Read carefully and"
                 " remember the key; you will be asked for it at the end.\n")
PASSKEY_LINE = " The pass key is {key}. Remember it: {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

# style -> (intro, filler, key line, question)
PASSKEY_STYLES = {
    "classic": (LANDMARK_INTRO, LANDMARK_FILLER, LANDMARK_LINE, LANDMARK_QUESTION),
    "alt": (PASSKEY_INTRO, FILLER, PASSKEY_LINE, PASSKEY_QUESTION),
}

NEEDLE_INTRO = ("The long text below hides several secret codes, each one given for a name."
                " Remember them; you will be asked about them at the end.\n")
NEEDLE_LINE = " The secret code for {name} is {value}.\n"
NEEDLE_ASK_ONE = "\nWhat is the secret code for {name}? The secret code for {name} is"
NEEDLE_ASK_ALL = "\nWhat are all the secret codes for {name}? The secret codes for {name} are"
NAMES = ("amber", "falcon", "willow", "copper", "harbor", "meadow", "cobalt", "lantern",
         "orchid", "granite", "saffron", "juniper", "thistle", "marble", "cedar", "pebble")


@dataclass
class Prompt:
    ids: list[int]
    answers: list[str]                # the digits strings expected
    depth: float | None = None
    insert_at: list[int] = field(default_factory=list)   # token offsets of the inserted lines
    meta: dict[str, Any] = field(default_factory=dict)


def _filler_tokens(tok, n: int, filler: str = FILLER) -> list[int]:
    unit = encode(tok, filler)
    reps = n // len(unit) + 1
    return (unit * reps)[:n]


def _boundaries(tok, hay: list[int], prose: bool, filler: str = FILLER) -> list[int]:
    """Token offsets in ``hay`` where a sentence ends (insertion points that keep text readable)."""
    if not prose:
        unit = len(encode(tok, filler))
        # the filler is built from whole units; sentence ends inside a unit are found once
        ends = [i + 1 for i, t in enumerate(encode(tok, filler)) if decode(tok, [t]).rstrip().endswith(".")]
        out = [0] + [u * unit + e for u in range(len(hay) // unit + 1) for e in ends]
        return [b for b in out if b <= len(hay)]
    out = [0]
    for i, t in enumerate(hay):
        s = decode(tok, [t])
        if s.endswith("\n") or s.rstrip().endswith("."):
            out.append(i + 1)
    out.append(len(hay))
    return out


def _place(tok, hay: list[int], depth: float, prose: bool, filler: str = FILLER) -> int:
    target = round(depth * len(hay))
    b = _boundaries(tok, hay, prose, filler)
    return min(b, key=lambda x: (abs(x - target), x))


def passkey(tok, length: int, depth: float, rng: random.Random, hard: bool = False,
            style: str = "classic") -> Prompt:
    """A prompt of about ``length`` tokens with a 5-digit key at ``depth`` (0 = start, 1 = end).

    ``style="classic"``: the Landmark Attention template (repeated "The grass is green. ..."
    filler). ``style="alt"``: longfx's own filler and wording. Hard: the ``alt`` wording with
    corpus prose from a seeded offset as the haystack.
    """
    if style not in PASSKEY_STYLES:
        raise ValueError(f"passkey style must be one of {', '.join(PASSKEY_STYLES)}, got {style!r}")
    if hard:
        style = "alt"
    intro_t, filler, line_t, q_t = PASSKEY_STYLES[style]
    key = str(rng.randrange(10000, 100000))
    intro, line, q = encode(tok, intro_t), encode(tok, line_t.format(key=key)), encode(tok, q_t)
    n = max(0, length - len(intro) - len(line) - len(q))
    hay = prose_tokens(tok, n, rng) if hard else _filler_tokens(tok, n, filler)
    at = _place(tok, hay, depth, hard, filler)
    ids = intro + hay[:at] + line + hay[at:] + q
    return Prompt(ids, [key], depth, [len(intro) + at], {"key": key, "hard": hard, "style": style})


def needle(tok, length: int, rng: random.Random, mode: str = "multikey", keys: int = 4, values: int = 4) -> Prompt:
    """RULER-style retrieval. ``multikey``: ``keys`` names with one code each, ask for one;
    ``multivalue``: one name with ``values`` codes, ask for all. Lines at seeded random depths."""
    names = rng.sample(NAMES, keys if mode == "multikey" else 1)
    if mode == "multikey":
        pairs = [(nm, str(rng.randrange(100000, 1000000))) for nm in names]
        asked = rng.choice(names)
        answers = [v for nm, v in pairs if nm == asked]
        question = NEEDLE_ASK_ONE.format(name=asked)
    elif mode == "multivalue":
        asked = names[0]
        pairs = [(asked, str(rng.randrange(100000, 1000000))) for _ in range(values)]
        answers = [v for _, v in pairs]
        question = NEEDLE_ASK_ALL.format(name=asked)
    else:
        raise ValueError(f"needle mode must be 'multikey' or 'multivalue', not {mode!r}")
    intro, q = encode(tok, NEEDLE_INTRO), encode(tok, question)
    lines = [encode(tok, NEEDLE_LINE.format(name=nm, value=v)) for nm, v in pairs]
    n = max(0, length - len(intro) - len(q) - sum(map(len, lines)))
    body, at = _insert_lines(tok, _filler_tokens(tok, n), lines, rng, prose=False)
    ids = intro + body + q
    at = [len(intro) + a for a in at]
    return Prompt(ids, answers, None, at, {"mode": mode, "asked": asked, "pairs": pairs})


def _insert_lines(tok, hay: list[int], lines: list[list[int]], rng: random.Random,
                  prose: bool) -> tuple[list[int], list[int]]:
    """``hay`` with each of ``lines`` inserted at a seeded sentence end (in order); also the
    offsets where the lines start."""
    spots = sorted(rng.choice(_boundaries(tok, hay, prose)) for _ in lines)
    ids, prev, at = [], 0, []
    for spot, ln in zip(spots, lines):
        ids += hay[prev:spot]
        at.append(len(ids))
        ids += ln
        prev = spot
    return ids + hay[prev:], at


RECALL_LINE = " The access code of {name} is {value}."
RECALL_REPEAT = "\nThe access code of {name} is {value}."


def recall(tok, hay: list[int], rng: random.Random, keys: int = 4) -> Prompt:
    """Calibration text that needs far retrieval, in the manner of DuoAttention's synthetic
    data (Xiao et al. 2024, arXiv:2410.10819, §3.2: passkeys inserted into long text, all
    recalled at its end): ``keys`` lines "The access code of NAME is NNNNNN." at seeded sentence
    ends of ``hay`` (a token list, e.g. corpus prose), then every line repeated in a shuffled
    order. ``meta["line_tokens"]`` gives each hidden line's length (they start at ``insert_at``),
    ``meta["tail"]`` counts the tokens of that recall part, the queries whose next tokens
    can only be predicted by attending to the far lines. Wording and names differ from the
    passkey and needle prompts the evaluation uses."""
    if keys < 1:
        raise ValueError(f"recall needs keys >= 1, got {keys}")
    names = rng.sample(NAMES, min(keys, len(NAMES)))
    pairs = [(nm, str(rng.randrange(100000, 1000000))) for nm in names]
    lines = [encode(tok, RECALL_LINE.format(name=nm, value=v)) for nm, v in pairs]
    order = list(range(len(pairs)))
    rng.shuffle(order)
    tail = [t for i in order for t in encode(tok, RECALL_REPEAT.format(name=pairs[i][0],
                                                                       value=pairs[i][1]))]
    n = max(0, len(hay) - len(tail) - sum(map(len, lines)))
    body, at = _insert_lines(tok, hay[:n], lines, rng, prose=True)
    return Prompt(body + tail, [v for _, v in pairs], None, at,
                  {"pairs": pairs, "tail": len(tail), "line_tokens": [len(x) for x in lines]})


_NUM = re.compile(r"\d(?:[\d,]|(?<=\d) (?=\d))*")


def numbers(text: str) -> list[str]:
    """Digit strings in generated text; tolerates '48 213', '48,213' and leading ':' or quotes."""
    return [re.sub(r"\D", "", m.group()) for m in _NUM.finditer(text)]


def first_number(text: str) -> str | None:
    found = numbers(text)
    return found[0] if found else None
