"""Prompt builders: deterministic per seed, right length, key where the depth says."""
import random

import pytest

from longfx.eval import data, needle, passkey

TOK = data.CharTokenizer(128)


def test_corpus_is_long_english_text():
    text = data.corpus_text()
    assert len(text) > 300_000 and "the" in text
    toks = data.corpus_tokens(TOK)
    assert toks is data.corpus_tokens(TOK)          # tokenized once, cached
    assert toks.numel() == len(text)


@pytest.mark.parametrize("hard", [False, True])
def test_passkey_same_seed_same_prompts(hard):
    a = passkey.prompts(TOK, 600, 0.5, seed=3, trials=3, hard=hard)
    b = passkey.prompts(TOK, 600, 0.5, seed=3, trials=3, hard=hard)
    c = passkey.prompts(TOK, 600, 0.5, seed=4, trials=3, hard=hard)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.answers for p in a] != [p.answers for p in c]
    assert len({p.answers[0] for p in a}) == 3      # trials differ


def test_passkey_length_and_depth():
    at = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        p = data.passkey(TOK, 2000, depth, random.Random(0))
        assert abs(len(p.ids) - 2000) <= 2
        text = TOK.decode(p.ids)
        assert text.count(p.answers[0]) == 2 and text.endswith("The pass key is")
        at.append(p.insert_at[0] / len(p.ids))
    assert at == sorted(at) and at[0] < 0.1 and at[-1] > 0.9


def test_needle_prompts():
    mk = needle.prompts(TOK, 800, "multikey", seed=0, trials=2)
    assert [p.ids for p in mk] == [p.ids for p in needle.prompts(TOK, 800, "multikey", seed=0, trials=2)]
    p = mk[0]
    assert len(p.meta["pairs"]) == 4 and len(p.answers) == 1
    assert TOK.decode(p.ids).endswith(f"The secret code for {p.meta['asked']} is")
    mv = needle.prompts(TOK, 800, "multivalue", seed=0, trials=1)[0]
    assert len(mv.answers) == 4 and all(a in TOK.decode(mv.ids) for a in mv.answers)
    with pytest.raises(ValueError):
        data.needle(TOK, 100, random.Random(0), mode="bogus")


def test_recall_hides_codes_in_the_text_and_recalls_them_at_the_end():
    hay = data.corpus_tokens(TOK)[:1500].tolist()
    p = data.recall(TOK, hay, random.Random(5), keys=3)
    assert p.ids == data.recall(TOK, hay, random.Random(5), keys=3).ids
    assert len(p.ids) == 1500 and len(p.meta["pairs"]) == 3
    text = TOK.decode(p.ids)
    tail = TOK.decode(p.ids[-p.meta["tail"]:])
    for name, value in p.meta["pairs"]:
        line = f"The access code of {name} is {value}."
        assert text.count(line) == 2 and line in tail      # once hidden, once recalled
    assert all(a < len(p.ids) - p.meta["tail"] for a in p.insert_at)
    assert TOK.decode(p.ids[:p.insert_at[0]]) == TOK.decode(hay[:p.insert_at[0]])
    with pytest.raises(ValueError, match="keys >= 1"):
        data.recall(TOK, hay, random.Random(0), keys=0)


@pytest.mark.parametrize("text,want", [(" 48213.", "48213"), (": 48 213 is", "48213"),
                                       ("'48,213'", "48213"), ("is 12345. 67890", "12345"),
                                       ("no digits here", None), ("\n\n 00123", "00123")])
def test_number_parser(text, want):
    assert data.first_number(text) == want


@pytest.mark.parametrize("style", ["classic", "alt"])
def test_passkey_styles(style):
    p = data.passkey(TOK, 1500, 0.5, random.Random(1), style=style)
    intro, filler, line, question = data.PASSKEY_STYLES[style]
    text = TOK.decode(p.ids)
    assert text.startswith(intro) and text.endswith(question.strip())
    assert line.format(key=p.answers[0]).strip() in text
    assert filler.strip()[:20] in text and p.meta["style"] == style
    with pytest.raises(ValueError, match="style"):
        data.passkey(TOK, 1500, 0.5, random.Random(1), style="bogus")


def test_passkey_task_is_classic():
    """``passkey`` is the Landmark Attention prompt; the same seed gives the same keys in ``alt``."""
    a = passkey.prompts(TOK, 900, 0.25, seed=0, trials=2)
    b = passkey.prompts(TOK, 900, 0.25, seed=0, trials=2, style="alt")
    assert "The grass is green." in TOK.decode(a[0].ids)
    assert "old mill" in TOK.decode(b[0].ids)
    assert [p.answers for p in a] == [p.answers for p in b]


def test_classic_trials_draw_their_depth_in_the_cell():
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert passkey.cell(0.0, depths) == (0.0, 0.125)
    assert passkey.cell(0.5, depths) == (0.375, 0.625)
    assert passkey.cell(1.0, depths) == (0.875, 1.0)
    assert passkey.cell(0.3, [0.3]) == (0.3, 0.3)
    ps = passkey.prompts(TOK, 2000, 0.5, seed=0, trials=6, depths=depths)
    at = [p.depth for p in ps]
    assert all(0.375 <= a <= 0.625 for a in at) and len(set(at)) == 6
    assert ps[0].ids == passkey.prompts(TOK, 2000, 0.5, seed=0, trials=6, depths=depths)[0].ids
    alt = passkey.prompts(TOK, 2000, 0.5, seed=0, trials=3, style="alt", depths=depths)
    assert {p.depth for p in alt} == {0.5}                    # alt keeps the exact depth
