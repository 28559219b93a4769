"""One vocabulary for FX graphs at torch level (Dynamo) and aten level (torch.export).

Dynamo graphs call ``torch.matmul``, ``F.softmax``, ``operator.add`` and tensor methods
(``call_method "transpose"``); exported graphs call ``aten.matmul.default``,
``aten._softmax.default``... Every matcher in longfx asks :func:`op` for a normalized name
("matmul", "softmax", "add", ...) and :func:`arg` for an argument by position or name, so a
pattern is written once for both levels (the way onnxscript's rewriter matches by op type,
not by exporter spelling).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

# Aliases after the raw name is found: spelling -> normalized name.
_ALIASES = {
    "_softmax": "softmax", "_safe_softmax": "softmax", "softmax": "softmax",
    "scaled_dot_product_attention": "sdpa",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa_cpu_flash",
    "bmm": "matmul", "matmul": "matmul", "mm": "matmul", "einsum": "einsum",
    "baddbmm": "baddbmm",
    "add": "add", "iadd": "add", "radd": "add", "add_": "add",
    "sub": "sub", "rsub": "rsub", "mul": "mul", "imul": "mul", "mul_": "mul", "rmul": "mul",
    "div": "div", "truediv": "div", "div_": "div", "itruediv": "div",
    "neg": "neg", "where": "where", "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    "dropout": "dropout", "native_dropout": "dropout", "clone": "identity",
    "contiguous": "identity", "alias": "identity", "detach": "identity",
    "lift_fresh_copy": "identity",
    "to": "cast", "type_as": "cast", "float": "cast", "half": "cast", "bfloat16": "cast",
    "_to_copy": "cast", "type": "cast", "double": "cast",
    "transpose": "transpose", "t": "transpose", "permute": "permute",
    "view": "view", "reshape": "view", "_unsafe_view": "view", "flatten": "view",
    "unflatten": "view",
    "expand": "expand", "repeat_interleave": "repeat_interleave", "repeat": "repeat",
    "unsqueeze": "unsqueeze", "squeeze": "squeeze",
    "getitem": "getitem", "slice": "slice", "select": "select", "narrow": "narrow",
    "chunk": "chunk", "split": "split", "split_with_sizes": "split", "unbind": "unbind",
    "cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "stack",
    "cos": "cos", "sin": "sin", "outer": "outer", "ger": "outer",
    "view_as_complex": "view_as_complex", "view_as_real": "view_as_real",
    "polar": "polar", "tanh": "tanh", "logical_not": "logical_not", "invert": "logical_not",
    "bitwise_not": "logical_not",
    "index_copy": "index_copy", "index_copy_": "index_copy", "slice_scatter": "slice_scatter",
    "index_put": "index_put", "index_put_": "index_put", "setitem": "setitem",
    "copy_": "copy_", "sqrt": "sqrt", "rsqrt": "rsqrt", "pow": "pow",
    "stride": "stride", "size": "size", "sym_size": "size",
    "linear": "linear", "arange": "arange", "full": "full", "tensor": "tensor",
    "scalar_tensor": "tensor", "zeros": "zeros", "ones": "ones",
    "stack_": "stack", "flip": "flip", "roll": "roll",
    "_assert_tensor_metadata": "assert_meta",
}


def raw_name(node: fx.Node) -> str | None:
    """The spelling of a node's operation without namespace or overload."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    return name.strip("_") if name.startswith("__") else name


def op(node: Any) -> str | None:
    """Normalized op name of ``node`` ("matmul", "softmax", ...) or None for non-calls."""
    if not isinstance(node, fx.Node):
        return None
    name = raw_name(node)
    if name is None:
        return None
    return _ALIASES.get(name, name)


def is_op(node: Any, *names: str) -> bool:
    return op(node) in names


# Positional order of the arguments of each normalized op, so that ``arg(node, "dim")``
# finds ``F.softmax(x, dim=-1)``, ``x.softmax(-1)`` and ``aten._softmax(x, -1, False)`` alike.
_SIGNATURES = {
    "softmax": ("input", "dim", "dtype"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    "sdpa_cpu_flash": ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"),
    "matmul": ("input", "other"),
    "baddbmm": ("input", "batch1", "batch2", "beta", "alpha"),
    "transpose": ("input", "dim0", "dim1"),
    "masked_fill": ("input", "mask", "value"),
    "where": ("condition", "input", "other"),
    "dropout": ("input", "p", "training"),
    "cat": ("tensors", "dim"),
    "expand": ("input", "size"),
    "repeat_interleave": ("input", "repeats", "dim"),
    "index_copy": ("input", "dim", "index", "source"),
    "slice": ("input", "dim", "start", "end", "step"),
    "slice_scatter": ("input", "src", "dim", "start", "end", "step"),
    "chunk": ("input", "chunks", "dim"),
    "split": ("input", "split_size", "dim"),
    "unsqueeze": ("input", "dim"),
    "outer": ("input", "vec2"),
    "mul": ("input", "other"), "div": ("input", "other"), "add": ("input", "other"),
    "sub": ("input", "other"),
}


def arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node`` by keyword or by its position in the op's signature."""
    if name in node.kwargs:
        return node.kwargs[name]
    sig = _SIGNATURES.get(op(node), ())
    if name in sig:
        i = sig.index(name)
        if i < len(node.args):
            return node.args[i]
    aliases = {"input": ("self",), "dim0": (), "other": ("mat2",)}
    for alias in aliases.get(name, ()):
        if alias in node.kwargs:
            return node.kwargs[alias]
    return default


def val(node: Any) -> Any:
    """The example value (FakeTensor, SymInt, tuple...) recorded for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    if "val" in meta:
        return meta["val"]
    return meta.get("example_value")


def tensor_val(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def rank(node: Any) -> int | None:
    t = tensor_val(node)
    return None if t is None else t.dim()


def shape(node: Any) -> tuple | None:
    t = tensor_val(node)
    return None if t is None else tuple(t.shape)


def as_int(x: Any) -> int | None:
    """A concrete int from an int, SymInt with a hint, or None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.hint) if x.node.hint is not None else None
        except Exception:  # noqa: BLE001 - unbacked symbols have no hint
            return None
    return None


def norm_dim(dim: Any, ndim: int | None) -> Any:
    """A non-negative dimension index when the rank is known."""
    if isinstance(dim, int) and ndim is not None and dim < 0:
        return dim + ndim
    return dim


def scalar(x: Any) -> float | None:
    """A Python number for a literal, or for a node whose example value is a 0-dim constant.

    Dynamo sometimes turns ``w / math.sqrt(d)`` into a ``torch.full([], ...)`` node; the
    value is read from the node's own args where it was built from literals.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.SymFloat) or isinstance(x, torch.SymInt):
        hint = x.node.hint
        return None if hint is None else float(hint)
    if isinstance(x, fx.Node):
        name = op(x)
        if name in ("full", "tensor"):
            fill = arg(x, "fill_value", x.args[1] if name == "full" and len(x.args) > 1 else None)
            if name == "tensor" and x.args:
                fill = x.args[0]
            if isinstance(fill, (int, float)) and not isinstance(fill, bool):
                return float(fill)
        if name == "cast" and x.args:
            return scalar(x.args[0])
        if name in ("sqrt", "rsqrt") and x.args:
            inner = scalar(x.args[0])
            if inner is not None and inner > 0:
                return math.sqrt(inner) if name == "sqrt" else 1 / math.sqrt(inner)
    return None


def sym_scalar(x: Any) -> tuple[fx.Node, float] | None:
    """``(node, value seen)`` for a node computing a Python number at run time.

    Dynamo lifts float module attributes (``self.scaling``) to graph inputs read with
    ``.item()`` unless floats are specialized; such a scale must stay a graph value.
    """
    if not isinstance(x, fx.Node):
        return None
    v = val(x)
    if isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool):
        hint = scalar(v)
        return None if hint is None else (x, hint)
    return None


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The object a ``get_attr`` target names (``"sub.buf"``), or None when absent."""
    obj: Any = module
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def through(node: Any, names: Iterable[str]) -> Any:
    """Walk up from ``node`` through single-input ops named in ``names`` (casts, clones...)."""
    names = set(names)
    while isinstance(node, fx.Node) and op(node) in names and node.args:
        node = node.args[0]
    return node


def down(node: fx.Node, names: Iterable[str]) -> fx.Node:
    """Walk down from ``node`` while its only user is an op named in ``names``."""
    names = set(names)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if op(user) in names and user.args and user.args[0] is node:
            node = user
        else:
            break
    return node


def is_node(x: Any) -> bool:
    return isinstance(x, fx.Node)


def module_path(node: fx.Node) -> str:
    """The innermost module path recorded by Dynamo/export (``nn_module_stack``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_path(str(path))


def _clean_path(path: str) -> str:
    # Dynamo spells "L['self'].model.layers[0].self_attn" or "L__self___model_layers_0";
    # export spells "model.layers.0.self_attn".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def layer_index(node: fx.Node) -> int | None:
    """The first integer component of the module path: the block index in every HF stack."""
    for part in module_path(node).replace("_", ".").split("."):
        if part.isdigit():
            return int(part)
    return None


def ancestors(node: fx.Node, stop: set | None = None, limit: int = 10_000) -> set[fx.Node]:
    """All nodes ``node`` depends on (bounded, for near-miss analysis and slicing)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen and (stop is None or a not in stop):
                seen.add(a)
                todo.append(a)
    return seen


def call(g: fx.Graph, made: list, target, *args) -> fx.Node:
    """``g.call_function(target, args)`` with an example value computed in the graph's fake
    mode (so later analysis and export see shapes), appended to ``made``."""
    node = g.call_function(target, args)
    _fake_value(node, target, args)
    made.append(node)
    return node


def _fake_value(node: fx.Node, target, args: tuple) -> None:
    """Record the example value of a new node the way its inputs are recorded."""
    src = next((a for a in args if isinstance(a, fx.Node)), None)
    if src is None:
        return
    key = "val" if "val" in src.meta else "example_value"
    vals = [val(a) if isinstance(a, fx.Node) else a for a in args]
    from torch._subclasses.fake_tensor import FakeTensor

    # the tensors' own mode: under a Dynamo backend the tracing context's mode can differ
    modes = {id(v.fake_mode): v.fake_mode for v in vals if isinstance(v, FakeTensor)}
    if len(modes) != 1:
        return
    try:
        with next(iter(modes.values())):
            node.meta[key] = target(*vals)
    except Exception:  # noqa: BLE001 - a missing example value only costs later shape hints
        pass
