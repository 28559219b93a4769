"""ONNX translation of ``longfx::rope`` (semantics: reference.py): the rotation as plain ops.

The tables ``cos``/``sin`` are graph values (computed in the graph from ``inv_freq`` and the
positions, so the RoPE recipes — pi, ntk, yarn... — which rewrite that computation, export
with them). The rotation is written with the reference's formula, op for op (Slice, Neg,
Concat, Mul, Add; https://onnx.ai/onnx/operators/), so it is exact for any table.

Why not ``RotaryEmbedding`` (opset 23, https://onnx.ai/onnx/operators/onnx__RotaryEmbedding.html,
or ``com.microsoft.RotaryEmbedding``): it takes half-width caches ([.., S, D/2]) and assumes
the two halves of the model's [.., S, D] table repeat (``cat(freqs, freqs)``); the canonical op
does not promise that (a table is whatever the model computed), and onnxruntime's CPU kernel
is not faster than these element-wise ops at decode sizes. Exactness first.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset23 as op

__all__ = ["rope"]

STYLES = ("rotate_half", "interleaved", "complex")


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _slice(x, start: int, end: int, step: int = 1):
    """x[..., start:end:step] on the last axis."""
    return op.Slice(x, _ints(start), _ints(end), _ints(-1), _ints(step))


def _interleave(a, b):
    """stack((a, b), -1).flatten(-2): [..., n] x2 -> [..., 2n] (a in even, b in odd channels)."""
    last = _ints(-1)
    pairs = op.Concat(op.Unsqueeze(a, last), op.Unsqueeze(b, last), axis=-1)   # [..., n, 2]
    shape = op.Concat(op.Shape(a, start=0, end=-1), _ints(-1), axis=0)
    return op.Reshape(pairs, shape)                                           # [..., 2n]


def _rotate(x, cos, sin, style: str, d: int):
    """Rotate all of ``x`` (its last axis has ``d`` channels) by the tables."""
    if style == "rotate_half":
        # x*cos + cat(-x2, x1)*sin, halves (i, i + d/2)
        half = d // 2
        rot = op.Concat(op.Neg(_slice(x, half, d)), _slice(x, 0, half), axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rot, sin))
    if style == "interleaved":
        # x*cos + flatten(stack(-x[1::2], x[::2]))*sin, pairs (2i, 2i + 1)
        rot = _interleave(op.Neg(_slice(x, 1, d, 2)), _slice(x, 0, d, 2))
        return op.Add(op.Mul(x, cos), op.Mul(rot, sin))
    # complex: pairs (2i, 2i+1) are a + ib times cos + i·sin, in float32 (reference: complex64)
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    c, s = op.Cast(cos, to=ir.DataType.FLOAT), op.Cast(sin, to=ir.DataType.FLOAT)
    a, b = _slice(xf, 0, d, 2), _slice(xf, 1, d, 2)                          # [..., d/2]
    re = op.Sub(op.Mul(a, c), op.Mul(b, s))
    im = op.Add(op.Mul(a, s), op.Mul(b, c))
    return _interleave(re, im)                                                # [..., d] float32


def rope(x, cos, sin, style: str = "rotate_half", rotary_dim: int = 0):
    """``longfx::rope`` -> element-wise ops; the first ``rotary_dim`` channels rotate, the rest
    pass through (partial rotary)."""
    if style not in STYLES:
        raise NotImplementedError(f"longfx::rope style {style!r} has no ONNX lowering "
                                  f"(known: {STYLES})")
    d = x.shape[-1]
    if not isinstance(d, int):
        raise NotImplementedError("longfx::rope: the head dim must be static to export to ONNX")
    if rotary_dim in (0, d):
        return _rotate(x, cos, sin, style, d)
    rot = _rotate(_slice(x, 0, rotary_dim), cos, sin, style, rotary_dim)
    rest = _slice(x, rotary_dim, d)
    if style == "complex":                   # the reference returns float32 for this style
        rest = op.Cast(rest, to=ir.DataType.FLOAT)
    return op.Concat(rot, rest, axis=-1)
