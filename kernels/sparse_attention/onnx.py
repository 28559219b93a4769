"""ONNX translation of ``longfx::sparse_attention`` (semantics: reference.py).

The mask spec becomes ops on the *run-time* lengths (S = q.shape[2], Skv = k.shape[2]), so one
graph serves prefill, chunked prefill and decode at any past length:

    qp = Range(Skv - S, Skv)          # query positions [S] (KV-cache, bottom-right aligned)
    kp = Range(0, Skv)                # key positions [Skv]
    d  = qp[:, None] - kp[None, :]    # [S, Skv]
    keep = d >= 0  and  (window <= 0  or  kp < sink  or  d < window)  [and key_keep[b, j]]

and ``keep`` feeds one ONNX ``Attention`` node (opset 23,
https://onnx.ai/onnx/operators/onnx__Attention.html) as its bool ``attn_mask`` [1|B, 1, S, Skv].

``cap`` > 0 with sinks (LM-Infinite's distance ceiling) needs two score matrices — sink keys
are scored against the query rotated back by δ = max(0, p − cap) — which one ``Attention``
node cannot take; that case (and target ``"decomposed"``) is lowered as MatMul / Softmax /
Where (kernels/attention/onnx.py), in the reference's order of operations.

Not used: ``com.microsoft.GroupQueryAttention``'s ``local_window_size``
(https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.GroupQueryAttention).
That op owns the KV cache itself (past_key/past_value in, present out, ``seqlens_k`` for
right padding only) and takes packed [B, S, H·D] q/k/v of the *new* tokens, while this op sees
the keys after the graph's own ``cat(past, new)`` and a per-key padding vector (left padding
included). Lowering to it would mean re-deriving the cache append from the graph; the mask
above is exact for every spec and every padding.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset23 as op

from longfx.kernels.attention.onnx import gqa_apply, gqa_scores, heads, scores_and_softmax

__all__ = ["sparse_attention", "sparse_attention_decomposed", "spec_keep"]

PAIRINGS = ("rotate_half", "interleaved", "complex")


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _scalar(value: int):
    return op.Constant(value_int=int(value))                                  # int64 scalar


def _positions(q, k):
    """Query positions [S] = Range(Skv - S, Skv) and key positions [Skv] = Range(0, Skv)."""
    s = op.Gather(op.Shape(q), _scalar(2), axis=0)
    skv = op.Gather(op.Shape(k), _scalar(2), axis=0)
    qp = op.Range(op.Sub(skv, s), skv, _scalar(1))
    kp = op.Range(_scalar(0), skv, _scalar(1))
    return qp, kp


def spec_keep(qp, kp, sink: int, window: int, key_keep=None):
    """The keep-matrix of the spec: [S, Skv], or [B, 1, S, Skv] with ``key_keep`` [B, Skv]."""
    d = op.Sub(op.Unsqueeze(qp, _ints(1)), op.Unsqueeze(kp, _ints(0)))        # [S, Skv]
    keep = op.GreaterOrEqual(d, _scalar(0))
    if window > 0:
        near = op.Less(d, _scalar(window))
        if sink > 0:
            near = op.Or(op.Unsqueeze(op.Less(kp, _scalar(sink)), _ints(0)), near)
        keep = op.And(keep, near)
    if key_keep is not None:
        kk = op.Cast(key_keep, to=ir.DataType.BOOL)
        keep = op.And(op.Unsqueeze(keep, _ints(0, 1)),                         # [1, 1, S, Skv]
                      op.Unsqueeze(kk, _ints(1, 2)))                           # [B, 1, 1, Skv]
    return keep


def sparse_attention(q, k, v, key_keep=None, scale: float = 1.0, softcap: float = 0.0,
                     sink: int = 0, window: int = 0, cap: int = 0, inv_freq=None,
                     rope_style: str = "rotate_half"):
    """``longfx::sparse_attention`` -> the spec's mask + ONNX ``Attention`` (opset 23)."""
    if cap > 0 and sink > 0:
        return sparse_attention_decomposed(q, k, v, key_keep, scale, softcap, sink, window, cap,
                                           inv_freq, rope_style)
    qp, kp = _positions(q, k)
    keep = spec_keep(qp, kp, sink, window, key_keep)
    attrs = {"scale": float(scale)}
    if softcap:
        attrs["softcap"] = float(softcap)
    y, _, _, _ = op.Attention(q, k, v, keep, **attrs)                        # [B, H, S, Dv]
    return y


def _rotate_back(q, delta, inv_freq, rope_style: str):
    """q [B, H, S, D] rotated by −delta[S] positions on its first 2·len(inv_freq) channels
    (reference.rotate_back: angles in float64, cos/sin cast to q's dtype)."""
    if rope_style not in PAIRINGS:
        raise ValueError(f"rope_style must be one of {PAIRINGS}, got {rope_style!r}")
    half = inv_freq.shape[0]
    d = q.shape[-1]
    if not isinstance(half, int) or not isinstance(d, int):
        raise NotImplementedError("sparse_attention cap: inv_freq and the head dim must be static")
    f64 = ir.DataType.DOUBLE
    angle = op.Mul(op.Neg(op.Unsqueeze(op.Cast(delta, to=f64), _ints(1))),     # [S, 1]
                   op.Unsqueeze(op.Cast(inv_freq, to=f64), _ints(0)))          # [1, R/2] -> [S, R/2]
    cos, sin = op.CastLike(op.Cos(angle), q), op.CastLike(op.Sin(angle), q)
    rot = op.Slice(q, _ints(0), _ints(2 * half), _ints(-1))
    rest = op.Slice(q, _ints(2 * half), _ints(d), _ints(-1))
    if rope_style == "rotate_half":
        x1 = op.Slice(rot, _ints(0), _ints(half), _ints(-1))
        x2 = op.Slice(rot, _ints(half), _ints(2 * half), _ints(-1))
        out = op.Concat(op.Sub(op.Mul(x1, cos), op.Mul(x2, sin)),
                        op.Add(op.Mul(x2, cos), op.Mul(x1, sin)), axis=-1)
    else:
        x1 = op.Slice(rot, _ints(0), _ints(2 * half), _ints(-1), _ints(2))
        x2 = op.Slice(rot, _ints(1), _ints(2 * half), _ints(-1), _ints(2))
        a = op.Sub(op.Mul(x1, cos), op.Mul(x2, sin))
        b = op.Add(op.Mul(x2, cos), op.Mul(x1, sin))
        pairs = op.Concat(op.Unsqueeze(a, _ints(-1)), op.Unsqueeze(b, _ints(-1)), axis=-1)
        out = op.Reshape(pairs, op.Concat(op.Shape(a, start=0, end=-1), _ints(-1), axis=0))
    return op.Concat(out, rest, axis=-1)


def sparse_attention_decomposed(q, k, v, key_keep=None, scale: float = 1.0, softcap: float = 0.0,
                                sink: int = 0, window: int = 0, cap: int = 0, inv_freq=None,
                                rope_style: str = "rotate_half"):
    """``longfx::sparse_attention`` as MatMul / Softmax / Where (the reference, op for op)."""
    qp, kp = _positions(q, k)
    h, hkv = heads(q, k)
    scores = gqa_scores(q, k, scale, h, hkv)                                  # [B, H, S, Skv]
    if cap > 0 and sink > 0:
        if inv_freq is None:
            raise ValueError("sparse_attention: cap > 0 needs inv_freq")
        delta = op.Max(op.Sub(qp, _scalar(cap)), _scalar(0))                  # [S]
        capped = gqa_scores(_rotate_back(q, delta, inv_freq, rope_style), k, scale, h, hkv)
        is_sink = op.And(op.Unsqueeze(op.Less(kp, _scalar(sink)), _ints(0)),   # [1, Skv]
                         op.Unsqueeze(op.Greater(delta, _scalar(0)), _ints(1)))  # [S, 1]
        scores = op.Where(is_sink, capped, scores)
    keep = spec_keep(qp, kp, sink, window, key_keep)
    p = scores_and_softmax(scores, keep, None, softcap)
    return gqa_apply(p, v, h, hkv)
