"""The ONNX translations of the longfx ops (kernels/*/onnx.py) against their references.

Each case exports a tiny module that calls one op, with dynamic query / key lengths, and runs
the file in onnxruntime at several lengths (prefill, chunked prefill, decode) against
reference.py on the same inputs.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch

from longfx.kernels.attention import reference as attention_ref
from longfx.kernels.attention.op import OP as ATTENTION  # noqa: F401 - registers the op
from longfx.kernels.rope import reference as rope_ref
from longfx.kernels.rope.op import OP as ROPE  # noqa: F401
from longfx.kernels.sparse_attention import reference as sparse_ref
from longfx.kernels.sparse_attention.op import OP as SPARSE  # noqa: F401
from longfx.runtime.onnx_export import translation_table

B, H, HKV, D = 2, 4, 2, 16
LENGTHS = [(5, 5), (3, 9), (1, 9), (1, 1)]       # (S, Skv): prefill, chunk, decode, first token


def _session(module, args, dynamic_shapes, target="opset23"):
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    module.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=23,
                                 dynamic_shapes=dynamic_shapes,
                                 custom_translation_table=translation_table(target))
    return ort.InferenceSession(prog.model_proto.SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _run(sess, **xs):
    """Feed the inputs the file has (by the forward's argument names)."""
    feeds = {i.name: xs[i.name].numpy() for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, feeds)[0])


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _qkv(s, skv, seed=0, dv=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, s, D, generator=g), torch.randn(B, HKV, skv, D, generator=g),
            torch.randn(B, HKV, skv, dv, generator=g))


# ---------------------------------------------------------------------------------- attention


class _Attention(torch.nn.Module):
    def __init__(self, scale, is_causal, softcap, with_mask):
        super().__init__()
        self.scale, self.is_causal, self.softcap, self.with_mask = scale, is_causal, softcap, \
            with_mask

    def forward(self, q, k, v, mask):
        return torch.ops.longfx.attention(q, k, v, mask if self.with_mask else None, self.scale,
                                          self.is_causal, self.softcap)


def _dims():
    Dim = torch.export.Dim
    return Dim("s", min=1), Dim("skv", min=1)


@pytest.mark.parametrize("target", ["opset23", "decomposed"])
@pytest.mark.parametrize("mask_kind,is_causal,softcap", [
    ("bool", False, 0.0), ("float", False, 0.0), ("none", True, 0.0), ("bool", False, 5.0),
    ("none", False, 0.0),
])
def test_attention_matches_reference(target, mask_kind, is_causal, softcap):
    s_dim, skv_dim = _dims()
    q, k, v = _qkv(3, 7)
    mask = torch.ones(B, 1, 3, 7, dtype=torch.bool) if mask_kind == "bool" else \
        torch.zeros(B, 1, 3, 7)
    mod = _Attention(0.3, is_causal, softcap, mask_kind != "none")
    shapes = ({2: s_dim}, {2: skv_dim}, {2: skv_dim}, {2: s_dim, 3: skv_dim})
    sess = _session(mod, (q, k, v, mask), shapes, target)
    for i, (s, skv) in enumerate(LENGTHS):
        q, k, v = _qkv(s, skv, seed=i)
        g = torch.Generator().manual_seed(10 + i)
        if mask_kind == "bool":
            mask = torch.rand(B, 1, s, skv, generator=g) > 0.3
            mask[0, 0, -1] = False                     # a fully masked row: zeros, as SDPA
        else:
            mask = torch.randn(B, 1, s, skv, generator=g)
        ref = attention_ref.attention(q, k, v, mask if mod.with_mask else None, 0.3, is_causal,
                                      softcap)
        got = _run(sess, q=q, k=k, v=v, mask=mask)
        assert _rel(got, ref) <= 1e-5, (s, skv)
        assert torch.isfinite(got).all()


def test_attention_three_d_inputs():
    q, k, v = torch.randn(6, 3, 8), torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    mod = _Attention(0.5, True, 0.0, False)
    sess = _session(mod, (q, k, v, torch.zeros(1)), None)
    ref = attention_ref.attention(q, k, v, None, 0.5, True, 0.0)
    assert _rel(_run(sess, q=q, k=k, v=v, mask=torch.zeros(1)), ref) <= 1e-5


# ---------------------------------------------------------------------------- sparse attention


class _Sparse(torch.nn.Module):
    def __init__(self, sink, window, cap=0, softcap=0.0, style="rotate_half", padded=True):
        super().__init__()
        self.sink, self.window, self.cap, self.softcap, self.style, self.padded = \
            sink, window, cap, softcap, style, padded
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, D, 2).float() / D))

    def forward(self, q, k, v, key_keep):
        return torch.ops.longfx.sparse_attention(
            q, k, v, key_keep if self.padded else None, 0.25, self.softcap, self.sink,
            self.window, self.cap, self.inv_freq if self.cap else None, self.style)


@pytest.mark.parametrize("target", ["opset23", "decomposed"])
@pytest.mark.parametrize("sink,window,cap,softcap,style,padded", [
    (0, 0, 0, 0.0, "rotate_half", True),           # causal + padding
    (0, 3, 0, 0.0, "rotate_half", True),           # sliding window
    (2, 3, 0, 0.0, "rotate_half", True),           # sinks + window
    (2, 4, 0, 4.0, "rotate_half", False),          # softcap, no padding vector
    (2, 3, 4, 0.0, "rotate_half", True),           # LM-Infinite cap (decomposed lowering)
    (1, 2, 3, 0.0, "interleaved", False),
])
def test_sparse_attention_matches_reference(target, sink, window, cap, softcap, style, padded):
    s_dim, skv_dim = _dims()
    q, k, v = _qkv(3, 7)
    keep = torch.ones(B, 7, dtype=torch.bool)
    mod = _Sparse(sink, window, cap, softcap, style, padded)
    shapes = ({2: s_dim}, {2: skv_dim}, {2: skv_dim}, {1: skv_dim})
    sess = _session(mod, (q, k, v, keep), shapes, target)
    for i, (s, skv) in enumerate(LENGTHS + [(4, 12), (1, 12)]):
        q, k, v = _qkv(s, skv, seed=i)
        keep = torch.ones(B, skv, dtype=torch.bool)
        keep[1, : min(2, skv - 1)] = False              # row 1 left-padded by 2
        ref = sparse_ref.sparse_attention(q, k, v, keep if padded else None, 0.25, softcap,
                                          sink, window, cap,
                                          mod.inv_freq if cap else None, style)
        got = _run(sess, q=q, k=k, v=v, key_keep=keep)
        assert _rel(got, ref) <= 1e-5, (s, skv)


# ---------------------------------------------------------------------------------------- rope


class _Rope(torch.nn.Module):
    def __init__(self, style, rotary_dim):
        super().__init__()
        self.style, self.rotary_dim = style, rotary_dim

    def forward(self, x, cos, sin):
        return torch.ops.longfx.rope(x, cos, sin, self.style, self.rotary_dim)


def _tables(style, s, rot):
    pos = torch.arange(s, dtype=torch.float32)
    inv = 10000.0 ** (-torch.arange(0, rot, 2).float() / rot)
    f = pos[:, None] * inv[None]                                              # [S, rot/2]
    if style == "rotate_half":
        f = torch.cat((f, f), -1)
    elif style == "interleaved":
        f = f.repeat_interleave(2, -1)
    return f.cos()[None, None], f.sin()[None, None]                           # [1, 1, S, *]


@pytest.mark.parametrize("style", ["rotate_half", "interleaved", "complex"])
@pytest.mark.parametrize("rotary_dim", [D, D // 2])
def test_rope_matches_reference(style, rotary_dim):
    s_dim = torch.export.Dim("s", min=1)
    x = torch.randn(B, H, 5, D)
    cos, sin = _tables(style, 5, rotary_dim)
    sess = _session(_Rope(style, rotary_dim), (x, cos, sin),
                    ({2: s_dim}, {2: s_dim}, {2: s_dim}))
    for s in (7, 1):
        x = torch.randn(B, H, s, D)
        cos, sin = _tables(style, s, rotary_dim)
        ref = rope_ref.rope(x, cos, sin, style, rotary_dim)
        assert _rel(_run(sess, x=x, cos=cos, sin=sin), ref) <= 1e-6
