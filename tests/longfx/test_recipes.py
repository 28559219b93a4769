"""Recipe text: parsing, string round trips, coercion, errors with carets, composition."""
from __future__ import annotations

import enum
from dataclasses import field
from typing import Literal

import pytest

from longfx import recipes as R
from longfx.recipes import Pipeline, Recipe, RecipeError, parse, register


class Mode(enum.Enum):
    asym = "asym"
    sym = "sym"


class _Rule:
    def __init__(self, name):
        self.name = name


@pytest.fixture(autouse=True)
def dummies(monkeypatch):
    """Dummy families, registered for each test and removed after it, in a registry of their
    own (the real families, e.g. longfx.passes.rope's yarn, are neither seen nor loaded)."""
    monkeypatch.setattr(R, "REGISTRY", {})
    monkeypatch.setattr(R, "FAMILIES", [])

    @register("sink_window")
    class SinkWindow(Recipe):
        """Keep the first sink tokens and a sliding window."""

        sink: int
        window: int = 1024
        causal: bool = field(default=True, metadata={"omit_default": True})

        def rules(self):
            return [_Rule(f"mask:{self.sink}:{self.window}")]

        def __post_init__(self):
            if self.window <= 0:
                raise ValueError("window must be positive")

    @register("kv_quant")
    class KVQuant(Recipe):
        bits: int = 4
        group: int | None = None
        scheme: Literal["asym", "sym"] = "asym"
        layers: tuple[int, ...] = ()
        scale: float = 1.0
        mode: Mode = Mode.asym
        label: str = "kv"

        def rules(self):
            return [_Rule("kv")]

    @register("yarn")
    class Yarn(Recipe):
        factor: float
        dims: tuple[int, int] = (0, 64)
        names: list[str] = field(default_factory=list)
        flag: bool | int = False

    yield {"sink_window": SinkWindow, "kv_quant": KVQuant, "yarn": Yarn}
    for name in ("sink_window", "kv_quant", "yarn"):
        R.unregister(name)


def _caret(err: RecipeError) -> tuple[int, int]:
    """(column, width) of the caret run in the message."""
    line = err.args[0].splitlines()[-1]
    stripped = line[4:]
    col = len(stripped) - len(stripped.lstrip(" "))
    return col, len(stripped.strip())


# ----------------------------------------------------------------------------------------------
# round trips


def test_readme_example_round_trips(dummies):
    text = "sink_window(sink=4, window=1024) + kv_quant(bits=4)"
    p = parse(text)
    assert p == Pipeline((dummies["sink_window"](4, 1024), dummies["kv_quant"](bits=4)))
    assert str(p) == ("sink_window(sink=4, window=1024) + kv_quant(bits=4, group=none, "
                      "scheme=asym, layers=(), scale=1.0, mode=asym, label=kv)")
    assert parse(str(p)) == p and str(parse(str(p))) == str(p)
    assert len(p) == 2 and [r.name for r in p] == ["sink_window", "kv_quant"]
    assert [r.name for r in p.rules()] == ["mask:4:1024", "kv"]


@pytest.mark.parametrize("text", [
    "sink_window(4)",
    "sink_window(4, 256, false)",
    "kv_quant(2, 64, sym, (1, 2, 3), 1e-3, sym, 'hello world')",
    "kv_quant(label='it''s')".replace("''", "\\'"),
    "kv_quant(label='true')",             # a string that looks like a bool stays a string
    "kv_quant(label='a\\nb\\\\c\"')",
    "kv_quant(label='')",
    "kv_quant(label='4')",
    "kv_quant(layers=(7,))",
    "kv_quant(scale=-inf) + kv_quant(scale=inf) + kv_quant(scale=-0.5)",
    "yarn(factor=4) + yarn(0.1, dims=(2, 3), names=[a, 'b c'], flag=true) + yarn(1e30, flag=3)",
    "  sink_window ( sink = 1 , window = 2 , )  ",
])
def test_round_trip(text):
    p = parse(text)
    assert parse(str(p)) == p
    assert str(parse(str(p))) == str(p)
    if "names=" not in text:  # a list[...] field makes a recipe unhashable; tuple[...] does not
        assert hash(p) == hash(parse(str(p)))  # frozen: usable as a cache key


def test_empty_pipeline_is_identity(dummies):
    for text in ("", "   ", "none", "None", None, "none + none"):
        p = parse(text)
        assert p == Pipeline() and p.is_identity and p.rules() == [] and not p
    assert str(Pipeline()) == "none" and parse(str(Pipeline())) == Pipeline()
    assert parse("none + sink_window(1)") == parse("sink_window(1)")
    assert Pipeline().describe() == "none: no rewrite (identity)"


def test_str_skips_only_marked_defaults(dummies):
    sw = dummies["sink_window"]
    assert str(sw(4)) == "sink_window(sink=4, window=1024)"
    assert str(sw(4, causal=False)) == "sink_window(sink=4, window=1024, causal=false)"
    assert sw(4).describe() == ("sink_window(sink=4, window=1024): Keep the first sink tokens "
                                "and a sliding window.")
    assert parse("kv_quant").recipes[0] == dummies["kv_quant"]()  # no parentheses: defaults


# ----------------------------------------------------------------------------------------------
# coercion


def test_coercion_to_annotations(dummies):
    kv = parse("kv_quant(bits=8.0, group=none, scheme=sym, layers=3, scale=2, mode=sym)").recipes[0]
    assert kv.bits == 8 and type(kv.bits) is int           # integral float -> int
    assert kv.group is None and kv.scheme == "sym"
    assert kv.layers == (3,)                                  # scalar -> 1-tuple
    assert kv.scale == 2.0 and type(kv.scale) is float        # int -> float
    assert kv.mode is Mode.sym                                # enum by name
    kv = parse("kv_quant(layers=[1, 2], label=\"x y\", group=32)").recipes[0]
    assert kv.layers == (1, 2) and kv.label == "x y" and kv.group == 32
    y = parse("yarn(4, dims=[1, 2], names=(a, b), flag=TRUE)").recipes[0]
    assert y.factor == 4.0 and y.dims == (1, 2) and y.names == ["a", "b"] and y.flag is True
    assert parse("yarn(4, flag=7)").recipes[0].flag == 7
    assert parse("sink_window(1_000)").recipes[0].sink == 1000


@pytest.mark.parametrize("text, reason, position, width", [
    ('kv_quant(bits="x")', "bad value for 'bits' of kv_quant(): expected int, got the string 'x'",
     14, 3),
    ("kv_quant(bits=1.5)", "expected int, got the float 1.5", 14, 3),
    ("kv_quant(bits=true)", "expected int, got the bool true", 14, 4),
    ("kv_quant(scheme=fp8)", "expected one of 'asym', 'sym', got the string 'fp8'", 16, 3),
    ("kv_quant(mode=foo)", "expected one of asym, sym", 14, 3),
    ("kv_quant(group=x)", "expected int | None, got the string 'x'", 15, 1),
    ("kv_quant(layers=(1, x))", "bad value for 'layers' of kv_quant(): expected int", 20, 1),
    ("kv_quant(label=3)", "expected str, got the int 3", 15, 1),
    ("kv_quant(bits=(1, 2))", "expected int, got a tuple", 14, 6),
    ("yarn(4, dims=(1, 2, 3))", "expected tuple[int, int] (2 items), got 3 items", 13, 9),
    ("yarn(factor=none)", "expected float, got none", 12, 4),
    ("sink_window(sink=1, window=0)", "sink_window(): window must be positive", 0, 29),
])
def test_bad_values(text, reason, position, width):
    with pytest.raises(RecipeError) as e:
        parse(text)
    assert reason in e.value.reason
    assert e.value.position == position and _caret(e.value) == (position, width)
    assert e.value.args[0].splitlines()[1] == "    " + text


# ----------------------------------------------------------------------------------------------
# syntax and naming errors, each with its caret


@pytest.mark.parametrize("text, reason, position", [
    # unknown recipe name, with a suggestion
    ("sink_windw(4) + kv_quant()", "unknown recipe 'sink_windw'; did you mean 'sink_window'?", 0),
    ("sink_window(4) + kv_qant()", "did you mean 'kv_quant'?", 17),
    ("zzz()", "unknown recipe 'zzz' (known: kv_quant, sink_window, yarn)", 0),
    # unknown argument, with a suggestion
    ("kv_quant(bitz=3)", "unknown argument 'bitz' for kv_quant(); did you mean 'bits'?", 9),
    ("sink_window(1, foo=2)", "(arguments: sink, window, causal)", 15),
    # missing required argument: the caret is under the closing parenthesis
    ("sink_window()", "sink_window() is missing required argument 'sink'", 12),
    ("sink_window(window=3)", "missing required argument 'sink'", 20),
    ("sink_window", "missing required argument 'sink'", 0),
    ("kv_quant() + yarn", "yarn() is missing required argument 'factor'", 13),
    # argument structure
    ("sink_window(1, 2, true, 4)", "sink_window() takes 3 arguments (sink, window, causal), got 4",
     24),
    ("kv_quant(bits=4, 5)", "positional argument after keyword arguments", 17),
    ("kv_quant(bits=4, bits=5)", "argument 'bits' given twice", 17),
    ("sink_window(1, sink=2)", "argument 'sink' of sink_window() given twice", 15),
    ("kv_quant(bits=)", "expected a value, found ')'", 14),
    ("kv_quant(bits=4 group=2)", "expected ',' or ')', found 'group'", 16),
    ("kv_quant(layers=(1 2))", "expected ',' or ')', found '2'", 19),
    # unbalanced parentheses
    ("sink_window(4", "unbalanced parenthesis: this '(' is never closed", 11),
    ("kv_quant(layers=(1, 2)", "unbalanced parenthesis: this '(' is never closed", 8),
    ("kv_quant(layers=[1, 2)", "expected ',' or ']', found ')'", 21),
    ("sink_window(4))", "unbalanced parenthesis: ')' closes nothing", 14),
    # trailing garbage
    ("sink_window(4) foo", "expected '+' or the end of the text, found 'foo'", 15),
    ("sink_window(4) , kv_quant()", "expected '+' or the end of the text, found ','", 15),
    # dangling '+'
    ("sink_window(4) +", "dangling '+': a recipe must follow it", 15),
    ("sink_window(4) +   ", "dangling '+'", 15),
    ("+ sink_window(4)", "dangling '+': a recipe must come before it", 0),
    ("sink_window(4) + + kv_quant()", "expected a recipe name after '+', found '+'", 17),
    # tokens
    ("kv_quant(bits=4k)", "invalid number '4k'", 14),
    ("kv_quant(bits=@)", "unexpected character '@'", 14),
    ("kv_quant(label='abc)", "unterminated string: no closing '", 15),
    ("42", "expected a recipe name, found '42'", 0),
])
def test_errors_point_at_the_token(text, reason, position):
    with pytest.raises(RecipeError) as e:
        parse(text)
    err = e.value
    assert isinstance(err, ValueError)
    assert reason in err.reason, err.reason
    assert err.position == position, (err.position, str(err))
    lines = str(err).splitlines()
    assert lines[0].startswith(err.reason) and lines[1] == "    " + text
    col, width = _caret(err)
    assert col == position and width >= 1 and set(lines[2].strip()) == {"^"}


def test_caret_on_the_right_line_of_multiline_text():
    text = "sink_window(4)\n  + kv_quant(bitz=1)"
    with pytest.raises(RecipeError) as e:
        parse(text)
    assert e.value.position == text.index("bitz")
    lines = str(e.value).splitlines()
    assert "(line 2)" in lines[0] and lines[1] == "      + kv_quant(bitz=1)"
    assert lines[2] == "    " + " " * 13 + "^^^^"


def test_no_eval():
    with pytest.raises(RecipeError):
        parse("kv_quant(bits=__import__('os').getpid())")
    with pytest.raises(RecipeError, match="unknown recipe"):
        parse("__import__('os')")


# ----------------------------------------------------------------------------------------------
# composition and registration


def test_composition(dummies):
    sw, kv = dummies["sink_window"](4), dummies["kv_quant"](bits=2)
    p = sw + kv
    assert isinstance(p, Pipeline) and p.recipes == (sw, kv)
    assert p + "yarn(4)" == parse(f"{sw} + {kv} + yarn(4)")
    assert "yarn(4)" + p == parse(f"yarn(4) + {sw} + {kv}")
    assert "kv_quant(bits=2)" + sw == parse("kv_quant(bits=2) + sink_window(4)")
    assert p + Pipeline() == p == Pipeline() + p == p + None
    assert (p + p).recipes == (sw, kv, sw, kv)
    assert parse(p) is p and parse(sw) == Pipeline((sw,))
    with pytest.raises(TypeError):
        p + 3
    with pytest.raises(TypeError):
        Pipeline(("sink_window(4)",))


def test_register_rules(dummies):
    assert R.REGISTRY["sink_window"] is dummies["sink_window"]
    assert dummies["sink_window"].name == "sink_window"
    with pytest.raises(ValueError, match="already registered"):
        @register("sink_window")
        class Other(Recipe):
            x: int = 1
    with pytest.raises(ValueError, match="not an identifier"):
        register("bad-name")
    with pytest.raises(TypeError, match="subclass of longfx.recipes.Recipe"):
        register("plain")(object)
    assert Recipe().rules() == []


def test_unregister_makes_the_name_unknown():
    R.unregister("yarn")
    with pytest.raises(RecipeError, match="unknown recipe 'yarn'"):
        parse("yarn(4)")
    R.unregister("yarn")  # unregistering twice is harmless
