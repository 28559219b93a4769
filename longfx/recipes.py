"""Recipes: what a rewrite does, as frozen dataclasses with a string form.

    pipeline = parse("sink_window(sink=4, window=1024) + kv_quant(bits=4)")
    str(pipeline)                      # 'sink_window(sink=4, window=1024) + kv_quant(bits=4)'
    parse(str(pipeline)) == pipeline   # the string form round-trips
    pipeline + "yarn(factor=4)"        # composition: Pipeline, Recipe or text on either side
    parse("") == parse("none") == parse(None) == Pipeline()   # rewrites nothing

A recipe family is a frozen dataclass registered under its name::

    @register("sink_window")
    class SinkWindow(Recipe):
        '''Keep the first ``sink`` tokens and a sliding ``window`` of recent ones.'''
        sink: int = 4
        window: int = 1024
        causal: bool = field(default=True, metadata={"omit_default": True})

        def rules(self) -> list:
            return [...]          # transform-stage rewrite rules

``str(recipe)`` writes every argument by name, in field order, so a report says exactly what ran;
a field with ``metadata={"omit_default": True}`` is written only when it differs from its default.

The text grammar (a small hand-written tokenizer and parser; nothing is ``eval``-ed)::

    pipeline := "" | term ("+" term)*
    term     := "none"                            # the identity: "none + x" == "x"
              | NAME ["(" [arg ("," arg)* [","]] ")"]
    arg      := NAME "=" value | value            # positional args follow field order
    value    := INT | FLOAT | STRING | NAME | "(" values ")" | "[" values "]"

NAME values ``true``/``false`` (any case) are bools, ``none`` is None, any other bare name is a
string; quoted strings take ``'`` or ``"`` with backslash escapes. Values are coerced to the
dataclass field's annotation (int, float, bool, str, Optional/Union, Literal, Enum, tuple[...],
list[...]). Every error is a :class:`RecipeError` whose message shows the text with a caret under
the offending token and whose ``.position`` is that token's offset.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal, Union

__all__ = ["Recipe", "Pipeline", "RecipeError", "REGISTRY", "register", "unregister", "parse"]


# ----------------------------------------------------------------------------------------------
# errors


class RecipeError(ValueError):
    """A recipe text that does not parse, or arguments that do not fit the recipe.

    ``position`` is the offset in ``text`` of the offending token (``length`` characters long);
    ``reason`` is the message without the caret display.
    """

    def __init__(self, reason: str, text: str = "", position: int = 0, length: int = 1):
        self.reason, self.text = reason, text
        self.position, self.length = position, max(1, length)
        super().__init__(self._format())

    def _format(self) -> str:
        if not self.text:
            return self.reason
        # show the line holding the error (recipes are usually one line)
        start = self.text.rfind("\n", 0, self.position) + 1
        end = self.text.find("\n", self.position)
        end = len(self.text) if end < 0 else end
        line = self.text[start:end]
        column = self.position - start
        width = max(1, min(self.length, len(line) - column))
        where = f" (line {self.text.count(chr(10), 0, start) + 1})" if "\n" in self.text else ""
        return f"{self.reason}{where}\n    {line}\n    {' ' * column}{'^' * width}"


class _CoerceError(Exception):
    def __init__(self, message: str, node: "_Value"):
        super().__init__(message)
        self.message, self.node = message, node


# ----------------------------------------------------------------------------------------------
# the base class and the registry


REGISTRY: dict[str, type["Recipe"]] = {}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Recipe:
    """Base of every recipe family: a frozen dataclass whose fields are its arguments."""

    name: ClassVar[str] = ""

    def rules(self) -> list:
        """The transform-stage rewrite rules this recipe contributes (none by default)."""
        return []

    def describe(self) -> str:
        doc = (type(self).__doc__ or "").strip().splitlines()
        summary = doc[0].strip() if doc and not doc[0].startswith(type(self).__name__ + "(") else ""
        return f"{self}: {summary}" if summary else str(self)

    def __str__(self) -> str:
        shown = []
        for f in _init_fields(type(self)):
            value = getattr(self, f.name)
            if _required(f) or not f.metadata.get("omit_default") or value != _default(f):
                shown.append(f"{f.name}={_format_value(value)}")
        return f"{type(self).name or type(self).__name__}({', '.join(shown)})"

    def __add__(self, other: Any) -> "Pipeline":
        return Pipeline((self,)) + other

    def __radd__(self, other: Any) -> "Pipeline":
        return _as_pipeline(other) + self


def register(name: str):
    """Class decorator: register a Recipe subclass under ``name`` (made a frozen dataclass if it
    is not one yet)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"recipe name {name!r} is not an identifier")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise TypeError(f"@register({name!r}) needs a subclass of longfx.recipes.Recipe")
        if "__dataclass_params__" not in cls.__dict__:
            cls = dataclass(frozen=True)(cls)
        elif not cls.__dataclass_params__.frozen:
            raise TypeError(f"recipe {name!r}: {cls.__name__} must be a frozen dataclass")
        existing = REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"recipe name {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


# Modules whose import registers a family's recipes; imported on the first parse so that
# "yarn(factor=4)" works without the user importing anything.
FAMILIES: list[str] = ["longfx.passes.rope", "longfx.passes.sparse", "longfx.passes.self_extend",
                       "longfx.passes.kv_quant", "longfx.passes.block_sparse",
                       "longfx.passes.rope_dynamic", "longfx.passes.kv_evict"]
FAMILIES += ["longfx.passes.vertical_slash", "longfx.passes.flex_prefill"]
FAMILIES += ["longfx.passes.gear"]
FAMILIES += ["longfx.passes.think", "longfx.passes.minicache", "longfx.passes.duo_heads"]
_loaded: set[str] = set()


def _load_families() -> None:
    import importlib

    for module in FAMILIES:
        if module not in _loaded:
            _loaded.add(module)
            importlib.import_module(module)


def unregister(name: str) -> None:
    """Remove a registered recipe (tests register dummies and remove them)."""
    REGISTRY.pop(name, None)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


# ----------------------------------------------------------------------------------------------
# the pipeline


@dataclass(frozen=True)
class Pipeline:
    """An ordered composition of recipes; empty = identity (rewrites nothing)."""

    recipes: tuple[Recipe, ...] = ()

    def __post_init__(self):
        recipes = tuple(self.recipes)
        for r in recipes:
            if not isinstance(r, Recipe):
                raise TypeError(f"Pipeline holds Recipe instances, not {type(r).__name__}")
        object.__setattr__(self, "recipes", recipes)
        for i, r in enumerate(recipes):      # a recipe may refuse what follows it
            check = getattr(r, "check_followers", None)
            if check is not None:
                check(recipes[i + 1:])

    def __str__(self) -> str:
        return " + ".join(str(r) for r in self.recipes) if self.recipes else "none"

    def __add__(self, other: Any) -> "Pipeline":
        return Pipeline(self.recipes + _as_pipeline(other).recipes)

    def __radd__(self, other: Any) -> "Pipeline":
        return _as_pipeline(other) + self

    def __len__(self) -> int:
        return len(self.recipes)

    def __iter__(self) -> Iterator[Recipe]:
        return iter(self.recipes)

    @property
    def is_identity(self) -> bool:
        return not self.recipes

    def rules(self) -> list:
        return [rule for r in self.recipes for rule in r.rules()]

    def describe(self) -> str:
        if not self.recipes:
            return "none: no rewrite (identity)"
        return "\n".join(r.describe() for r in self.recipes)


def _as_pipeline(value: Any) -> Pipeline:
    if isinstance(value, Pipeline):
        return value
    if isinstance(value, Recipe):
        return Pipeline((value,))
    if value is None or isinstance(value, str):
        return parse(value)
    raise TypeError(f"cannot compose a recipe pipeline with {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str       # NAME INT FLOAT STR OP EOF
    value: Any
    start: int
    end: int


_NUMBER = re.compile(r"-?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORDISH = re.compile(r"[A-Za-z0-9_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}
_OPS = "()[],=+"


def _tokenize(text: str) -> list[_Token]:
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in _OPS:
            tokens.append(_Token("OP", c, i, i + 1))
            i += 1
            continue
        if c in "'\"":
            j, chars = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    chars.append(_ESCAPES.get(text[j + 1], "\\" + text[j + 1]))
                    j += 2
                else:
                    chars.append(text[j])
                    j += 1
            if j >= n:
                raise RecipeError("unterminated string: no closing " + c, text, i, 1)
            tokens.append(_Token("STR", "".join(chars), i, j + 1))
            i = j + 1
            continue
        if c == "-" and text.startswith(("-inf", "-nan"), i) and not _IDENT.match(text, i + 4):
            tokens.append(_Token("FLOAT", float(text[i:i + 4]), i, i + 4))
            i += 4
            continue
        m = _NUMBER.match(text, i)
        if m and (c.isdigit() or c in "-."):
            j = m.end()
            tail = _WORDISH.match(text, j).end()
            raw = m.group()
            if tail > j or raw in ("-", ".", "-."):
                end = max(tail, j)
                raise RecipeError(f"invalid number {text[i:end]!r}", text, i, end - i)
            clean = raw.replace("_", "")
            try:
                if any(ch in clean for ch in ".eE"):
                    tokens.append(_Token("FLOAT", float(clean), i, j))
                else:
                    tokens.append(_Token("INT", int(clean), i, j))
            except ValueError:
                raise RecipeError(f"invalid number {raw!r}", text, i, j - i) from None
            i = j
            continue
        m = _IDENT.match(text, i)
        if m:
            tokens.append(_Token("NAME", m.group(), i, m.end()))
            i = m.end()
            continue
        raise RecipeError(f"unexpected character {c!r}", text, i, 1)
    tokens.append(_Token("EOF", None, n, n))
    return tokens


# ----------------------------------------------------------------------------------------------
# parser


@dataclass
class _Value:
    """A parsed argument value with its span, before coercion."""

    value: Any                       # python value; list of _Value for sequences
    start: int
    end: int
    kind: str = "scalar"             # scalar | bare (unquoted name) | tuple | list

    def plain(self) -> Any:
        if self.kind == "tuple":
            return tuple(v.plain() for v in self.value)
        if self.kind == "list":
            return [v.plain() for v in self.value]
        return self.value


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    # -- helpers
    def peek(self, k: int = 0) -> _Token:
        return self.tokens[min(self.i + k, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def is_op(self, tok: _Token, op: str) -> bool:
        return tok.kind == "OP" and tok.value == op

    def show(self, tok: _Token) -> str:
        return "the end of the text" if tok.kind == "EOF" else repr(self.text[tok.start:tok.end])

    def error(self, reason: str, start: int, end: int | None = None) -> RecipeError:
        return RecipeError(reason, self.text, start, (end if end is not None else start + 1) - start)

    def error_at(self, reason: str, tok: _Token) -> RecipeError:
        return self.error(reason, tok.start, max(tok.end, tok.start + 1))

    # -- grammar
    def pipeline(self) -> Pipeline:
        recipes = []
        while True:
            tok = self.peek()
            if (tok.kind == "NAME" and tok.value.lower() == "none"
                    and not self.is_op(self.peek(1), "(")):
                self.advance()  # "none" is the identity: "none + x" == "x"
            else:
                recipes.append(self.recipe(first=self.i == 0))
            tok = self.peek()
            if tok.kind == "EOF":
                return Pipeline(tuple(recipes))
            if self.is_op(tok, "+"):
                plus = self.advance()
                if self.peek().kind == "EOF":
                    raise self.error_at("dangling '+': a recipe must follow it", plus)
                continue
            if self.is_op(tok, ")") or self.is_op(tok, "]"):
                raise self.error_at(f"unbalanced parenthesis: {self.show(tok)} closes nothing", tok)
            raise self.error_at(f"expected '+' or the end of the text, found {self.show(tok)}", tok)

    def recipe(self, first: bool) -> Recipe:
        tok = self.advance()
        if tok.kind != "NAME":
            if self.is_op(tok, "+") and first:
                raise self.error_at("dangling '+': a recipe must come before it", tok)
            after = "" if first else " after '+'"
            raise self.error_at(f"expected a recipe name{after}, found {self.show(tok)}", tok)
        cls = REGISTRY.get(tok.value)
        if cls is None:
            raise self.error_at(_unknown_recipe(tok.value), tok)
        args: list[_Value] = []
        kwargs: dict[str, tuple[_Token, _Value]] = {}
        end_tok = tok
        if self.is_op(self.peek(), "("):
            opening = self.advance()
            while True:
                nxt = self.peek()
                if self.is_op(nxt, ")"):
                    end_tok = self.advance()
                    break
                if nxt.kind == "EOF":
                    raise self.error_at("unbalanced parenthesis: this '(' is never closed",
                                        opening)
                if nxt.kind == "NAME" and self.is_op(self.peek(1), "="):
                    key = self.advance()
                    self.advance()
                    if key.value in kwargs:
                        raise self.error_at(f"argument {key.value!r} given twice", key)
                    kwargs[key.value] = (key, self.value())
                else:
                    value = self.value()
                    if kwargs:
                        raise self.error("positional argument after keyword arguments",
                                         value.start, value.end)
                    args.append(value)
                sep = self.peek()
                if self.is_op(sep, ","):
                    self.advance()
                    continue
                if self.is_op(sep, ")"):
                    continue
                if sep.kind == "EOF":
                    raise self.error_at("unbalanced parenthesis: this '(' is never closed",
                                        opening)
                raise self.error_at(f"expected ',' or ')', found {self.show(sep)}", sep)
        return self.build(cls, tok, end_tok, args, kwargs)

    def value(self) -> _Value:
        tok = self.advance()
        if tok.kind in ("INT", "FLOAT", "STR"):
            return _Value(tok.value, tok.start, tok.end)
        if tok.kind == "NAME":
            low = tok.value.lower()
            if low in ("true", "false"):
                return _Value(low == "true", tok.start, tok.end)
            if low == "none":
                return _Value(None, tok.start, tok.end)
            return _Value(tok.value, tok.start, tok.end, "bare")
        if self.is_op(tok, "(") or self.is_op(tok, "["):
            close = ")" if tok.value == "(" else "]"
            items = []
            while True:
                nxt = self.peek()
                if self.is_op(nxt, close):
                    end = self.advance()
                    return _Value(items, tok.start, end.end, "tuple" if close == ")" else "list")
                if nxt.kind == "EOF":
                    raise self.error_at(f"unbalanced parenthesis: this {tok.value!r} is never "
                                        "closed", tok)
                items.append(self.value())
                sep = self.peek()
                if self.is_op(sep, ","):
                    self.advance()
                elif not self.is_op(sep, close):
                    if sep.kind == "EOF":
                        raise self.error_at(f"unbalanced parenthesis: this {tok.value!r} is "
                                            "never closed", tok)
                    raise self.error_at(f"expected ',' or {close!r}, found {self.show(sep)}", sep)
        raise self.error_at(f"expected a value, found {self.show(tok)}", tok)

    def build(self, cls: type[Recipe], name_tok: _Token, end_tok: _Token, args: list[_Value],
              kwargs: dict[str, tuple[_Token, _Value]]) -> Recipe:
        fields = _init_fields(cls)
        by_name = {f.name: f for f in fields}
        hints = _type_hints(cls)
        if len(args) > len(fields):
            extra = args[len(fields)]
            raise self.error(f"{cls.name}() takes {len(fields)} argument"
                             f"{'' if len(fields) == 1 else 's'} "
                             f"({', '.join(by_name) or 'none'}), got {len(args)}",
                             extra.start, extra.end)
        values: dict[str, Any] = {}
        given: list[tuple[str, _Value]] = [(f.name, v) for f, v in zip(fields, args)]
        for key, (key_tok, v) in kwargs.items():
            if key not in by_name:
                raise self.error_at(_unknown_argument(cls, key), key_tok)
            if any(name == key for name, _ in given):
                raise self.error_at(f"argument {key!r} of {cls.name}() given twice "
                                    "(positionally and by name)", key_tok)
            given.append((key, v))
        for key, v in given:
            try:
                values[key] = _coerce(v, hints.get(key, Any))
            except _CoerceError as e:
                raise self.error(f"bad value for {key!r} of {cls.name}(): {e.message}",
                                 e.node.start, e.node.end) from None
        missing = [f.name for f in fields if _required(f) and f.name not in values]
        if missing:
            where = end_tok if end_tok is not name_tok else name_tok
            plural = "s" if len(missing) > 1 else ""
            raise self.error_at(f"{cls.name}() is missing required argument{plural} "
                                f"{', '.join(repr(m) for m in missing)}", where)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:  # the recipe's own validation (__post_init__)
            raise self.error(f"{cls.name}(): {e}", name_tok.start, end_tok.end) from None


def _unknown_recipe(name: str) -> str:
    known = sorted(REGISTRY)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = f" (known: {', '.join(known)})" if known else " (no recipe is registered)"
    return f"unknown recipe {name!r}{hint}{listing}"


def _unknown_argument(cls: type[Recipe], key: str) -> str:
    names = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown argument {key!r} for {cls.name}(){hint} "
            f"(arguments: {', '.join(names) or 'none'})")


def parse(text: str | Pipeline | Recipe | None) -> Pipeline:
    """Parse a recipe text into a :class:`Pipeline`. ``""``, ``"none"`` and None give the empty
    pipeline (identity); a Pipeline or Recipe is returned as a Pipeline."""
    if isinstance(text, Pipeline):
        return text
    if isinstance(text, Recipe):
        return Pipeline((text,))
    if text is None or not text.strip() or text.strip().lower() == "none":
        return Pipeline(())
    _load_families()
    if not isinstance(text, str):
        raise TypeError(f"parse() takes a recipe text, not {type(text).__name__}")
    return _Parser(text).pipeline()


# ----------------------------------------------------------------------------------------------
# coercion to the field's annotation


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable forward refs: fall back to simple names
        hints = {}
        for f in dataclasses.fields(cls):
            t = f.type
            hints[f.name] = _SIMPLE.get(t, Any) if isinstance(t, str) else t
        return hints


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(tp.__members__)
    return getattr(tp, "__name__", str(tp))


def _describe(node: _Value) -> str:
    v = node.value
    if node.kind in ("tuple", "list"):
        return f"a {node.kind}"
    if v is None:
        return "none"
    if isinstance(v, bool):
        return f"the bool {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {v!r}"
    return f"the {type(v).__name__} {v!r}"


def _coerce(node: _Value, tp: Any) -> Any:
    if tp is Any or tp is object:
        return node.plain()
    origin = typing.get_origin(tp)
    value = node.value
    fail = _CoerceError(f"expected {_type_name(tp)}, got {_describe(node)}", node)

    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and node.kind == "scalar":
            if type(None) in options:
                return None
            raise fail
        for option in options:  # bool before int matters: the first that fits wins
            if option is type(None):
                continue
            try:
                return _coerce(node, option)
            except _CoerceError:
                continue
        raise fail
    if tp is type(None):
        if value is None and node.kind == "scalar":
            return None
        raise fail
    if origin is Literal:
        for choice in typing.get_args(tp):
            if node.kind in ("scalar", "bare") and type(choice) is type(value) and choice == value:
                return choice
        raise fail
    if origin in (tuple, list) or tp in (tuple, list):
        container = origin or tp
        items = value if node.kind in ("tuple", "list") else [node]  # a scalar = 1 element
        args = typing.get_args(tp)
        if not args:
            out = [v.plain() for v in items]
        elif container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise _CoerceError(f"expected {_type_name(tp)} ({len(args)} items), got "
                                   f"{len(items)} item{'s' if len(items) != 1 else ''}", node)
            out = [_coerce(v, a) for v, a in zip(items, args)]
        else:
            out = [_coerce(v, args[0]) for v in items]
        return tuple(out) if container is tuple else out
    if node.kind in ("tuple", "list"):
        raise fail
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if node.kind == "bare" and value.lower() in ("inf", "nan"):
            return float(value)
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, str) and value in tp.__members__:
            return tp.__members__[value]
        for member in tp:
            if type(member.value) is type(value) and member.value == value:
                return member
        raise fail
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail
    return node.plain()


# ----------------------------------------------------------------------------------------------
# string form of values


_KEYWORDS = {"true", "false", "none", "inf", "nan"}


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return value.name if _NAME.match(value.name) else _quote(value.name)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if _NAME.match(value) and value.lower() not in _KEYWORDS:
            return value
        return _quote(value)
    if isinstance(value, tuple):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    raise TypeError(f"a recipe argument cannot be written as text: {value!r}")


def _quote(s: str) -> str:
    out = s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"'{out.replace(chr(13), chr(92) + 'r').replace(chr(0), chr(92) + '0')}'"
