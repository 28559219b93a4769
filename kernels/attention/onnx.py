"""ONNX translation of ``longfx::attention`` (see op.py / reference.py for its semantics).

Two lowerings, chosen by the exporter's ``target``:

* ``attention`` (target ``"opset23"``, the default): one ONNX ``Attention`` node, opset 23
  (https://onnx.ai/onnx/operators/onnx__Attention.html). 4-D inputs q [B, H, S, D],
  k/v [B, Hkv, Skv, D]; the spec takes the head counts from the shapes in 4-D (GQA when
  H > Hkv, kv head h // (H / Hkv), as the reference), ``scale``, ``softcap`` (applied to the
  scaled scores before the mask, as the reference), ``is_causal`` (upper-left aligned, as SDPA
  and the reference) and ``attn_mask`` bool (True = attend) or float (added). onnxruntime
  1.32 CPU implements it (kernel ``Attention`` 23); a fully masked row gives zeros there, as
  in the reference (tests/runtime/test_onnx_ops.py checks it).
* ``attention_decomposed`` (target ``"decomposed"``): the same math as plain MatMul / Softmax /
  Where ops, for runtimes without ``Attention``-23; also the building block of the sparse
  lowering when it needs two score matrices (sparse_attention/onnx.py).

3-D inputs ([N, S, D]: batch and heads merged) are lowered as 4-D with one head; ONNX's own
3-D form means [B, S, H*D], which is not this op's.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset23 as op

__all__ = ["attention", "attention_decomposed", "scores_and_softmax", "gqa_scores", "gqa_apply",
           "heads"]

_NEG_INF = float("-inf")


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _rank(x) -> int:
    return len(x.shape)


def _to_4d(q, k, v, mask):
    """[N, S, D] -> [N, 1, S, D] (and a 3-D mask [N, S, Skv] -> [N, 1, S, Skv])."""
    axis = _ints(1)
    q, k, v = op.Unsqueeze(q, axis), op.Unsqueeze(k, axis), op.Unsqueeze(v, axis)
    if mask is not None and _rank(mask) == 3:
        mask = op.Unsqueeze(mask, axis)
    return q, k, v, mask


def attention(q, k, v, mask=None, scale: float = 1.0, is_causal: bool = False,
              softcap: float = 0.0):
    """``longfx::attention`` -> ONNX ``Attention`` (opset 23)."""
    three_d = _rank(q) == 3
    if three_d:
        q, k, v, mask = _to_4d(q, k, v, mask)
    attrs = {"scale": float(scale), "is_causal": int(bool(is_causal))}
    if softcap:
        attrs["softcap"] = float(softcap)
    # Outputs: Y [B, H, S, Dv], present_key, present_value, qk_matmul_output (unused here).
    y, _, _, _ = op.Attention(q, k, v, mask, **attrs)
    return op.Squeeze(y, _ints(1)) if three_d else y


# ----------------------------------------------------------------------------------------------
# The decomposed form: scores, mask, softmax in float32, probabilities · v


def gqa_scores(q, k, scale: float, h: int, hkv: int):
    """q [B, H, S, D] · k [B, Hkv, Skv, D]ᵀ · scale -> [B, H, S, Skv], without repeating k:
    q is viewed as [B, Hkv, G, S, D] (head h = kv·G + g, the reference's grouping) and k as
    [B, Hkv, 1, Skv, D]; MatMul broadcasts the group axis. ``h``/``hkv``: the head counts
    (passed in: values made inside a translation carry no shapes)."""
    kt = op.Transpose(k, perm=[0, 1, 3, 2])                                   # [B, Hkv, D, Skv]
    if h == hkv:
        s = op.MatMul(q, kt)                                                  # [B, H, S, Skv]
    else:
        _check_heads(h, hkv)
        g = h // hkv
        q5 = op.Reshape(q, op.Concat(op.Shape(q, start=0, end=1), _ints(hkv, g),
                                     op.Shape(q, start=2), axis=0))           # [B, Hkv, G, S, D]
        s5 = op.MatMul(q5, op.Unsqueeze(kt, _ints(2)))                      # [B, Hkv, G, S, Skv]
        s = op.Reshape(s5, op.Concat(op.Shape(s5, start=0, end=1), _ints(h),
                                     op.Shape(s5, start=3), axis=0))          # [B, H, S, Skv]
    return op.Mul(s, op.CastLike(op.Constant(value_float=float(scale)), s))


def gqa_apply(p, v, h: int, hkv: int):
    """probabilities p [B, H, S, Skv] · v [B, Hkv, Skv, Dv] -> [B, H, S, Dv] (same grouping)."""
    if h == hkv:
        return op.MatMul(p, v)
    _check_heads(h, hkv)
    g = h // hkv
    p5 = op.Reshape(p, op.Concat(op.Shape(p, start=0, end=1), _ints(hkv, g),
                                 op.Shape(p, start=2), axis=0))               # [B, Hkv, G, S, Skv]
    y5 = op.MatMul(p5, op.Unsqueeze(v, _ints(2)))                           # [B, Hkv, G, S, Dv]
    return op.Reshape(y5, op.Concat(op.Shape(y5, start=0, end=1), _ints(h),
                                    op.Shape(y5, start=3), axis=0))           # [B, H, S, Dv]


def heads(q, k) -> tuple[int, int]:
    """(H, Hkv) from the static shapes of the op's inputs q [B, H, S, D], k [B, Hkv, Skv, D]."""
    if q.shape is None or k.shape is None:
        raise NotImplementedError("ONNX lowering of attention needs q/k of known rank")
    h, hkv = q.shape[1], k.shape[1]
    _check_heads(h, hkv)
    return h, hkv


def _check_heads(h, hkv) -> None:
    if not isinstance(h, int) or not isinstance(hkv, int):
        raise NotImplementedError(f"ONNX lowering of grouped attention needs static head counts, "
                                  f"got {h} query / {hkv} kv heads")
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")


def scores_and_softmax(scores, keep, float_mask=None, softcap: float = 0.0, out_dtype=None):
    """softmax over the last axis of ``scores`` [.., S, Skv] with softcap, an optional additive
    mask and an optional bool ``keep`` (False -> excluded); float32 softmax; rows with no kept
    key give zeros (the reference's convention). Returns probabilities cast like ``scores``."""
    if softcap:
        c = op.CastLike(op.Constant(value_float=float(softcap)), scores)
        scores = op.Mul(op.Tanh(op.Div(scores, c)), c)
    if float_mask is not None:
        scores = op.Add(scores, op.CastLike(float_mask, scores))
    like = scores
    s32 = op.Cast(scores, to=1)                                               # FLOAT
    if keep is not None:
        s32 = op.Where(keep, s32, op.Constant(value_float=_NEG_INF))
    p = op.Softmax(s32, axis=-1)
    if keep is not None:                     # masked entries (and all-masked rows' NaN) -> 0
        p = op.Where(keep, p, op.Constant(value_float=0.0))
    return op.CastLike(p, like)


def attention_decomposed(q, k, v, mask=None, scale: float = 1.0, is_causal: bool = False,
                         softcap: float = 0.0):
    """``longfx::attention`` as MatMul / Softmax / Where (same order of operations as
    reference.py)."""
    three_d = _rank(q) == 3
    if three_d:                              # [N, S, D] as [N, 1, S, D]: one head
        q, k, v, mask = _to_4d(q, k, v, mask)
        h, hkv = 1, 1
    else:
        h, hkv = heads(q, k)
    scores = gqa_scores(q, k, scale, h, hkv)                                  # [B, H, S, Skv]
    keep, float_mask = None, None
    if is_causal:                            # upper-left aligned: key j <= query i
        i = op.Range(_scalar(0), op.Gather(op.Shape(scores), _scalar(2), axis=0), _scalar(1))
        j = op.Range(_scalar(0), op.Gather(op.Shape(scores), _scalar(3), axis=0), _scalar(1))
        keep = op.LessOrEqual(op.Unsqueeze(j, _ints(0)), op.Unsqueeze(i, _ints(1)))  # [S, Skv]
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            keep = mask if keep is None else op.And(keep, mask)
        else:
            float_mask = mask
    p = scores_and_softmax(scores, keep, float_mask, softcap)
    y = gqa_apply(p, v, h, hkv)
    return op.Squeeze(y, _ints(1)) if three_d else y


def _scalar(value: int):
    return op.Constant(value_int=int(value))                                  # int64 scalar
