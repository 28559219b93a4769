"""Reference rotary position embedding: plain torch, one function per style, obviously correct.

Each style is the formula the models write, so the canonical op is exact (bit for bit on the
models in the zoo): ``cos``/``sin`` are the tables as the model computed them, already
broadcastable to the rotated channels of ``x``.

- ``rotate_half`` (GPT-NeoX / HF Llama): channel i pairs with i + d/2;
  ``x*cos + cat(-x[d/2:], x[:d/2])*sin``; tables laid out ``cat(freqs, freqs)``: [..., S, d].
- ``interleaved`` (GPT-J): channel 2i pairs with 2i+1;
  ``x*cos + flatten(stack(-x[1::2], x[::2]))*sin``; tables ``repeat_interleave(freqs, 2)``:
  [..., S, d].
- ``complex`` (Meta Llama): pairs (2i, 2i+1) are complex numbers multiplied by
  ``freqs_cis = cos + i·sin``, in float32; tables are one value per pair: [..., S, d/2].

``rotary_dim`` < x.shape[-1] rotates only the first ``rotary_dim`` channels and passes the
rest through (GPT-NeoX, Phi-3 partial rotary, GPT-J).
"""
from __future__ import annotations

import torch

STYLES = ("rotate_half", "interleaved", "complex")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: each adjacent pair (a, b) -> (-b, a)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (rotate_half(x) * sin)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (rotate_every_two(x) * sin)


def rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., d] real; cos/sin: [..., d/2] (real and imaginary parts of freqs_cis).
    Returns float32 (complex64 arithmetic) like the model; the caller casts back."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))   # [..., d/2] complex
    if cos.dtype not in (torch.float32, torch.float64):                   # no complex bf16
        cos, sin = cos.float(), sin.float()
    freqs_cis = torch.complex(cos, sin)
    return torch.view_as_real(xc * freqs_cis).flatten(-2)                 # [..., d]


_STYLE_FN = {"rotate_half": rope_rotate_half, "interleaved": rope_interleaved,
             "complex": rope_complex}


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str,
         rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` ([..., S, D]) by the tables."""
    if style not in _STYLE_FN:
        raise ValueError(f"unknown RoPE style {style!r}; expected one of {STYLES}")
    fn = _STYLE_FN[style]
    if rotary_dim == x.shape[-1]:
        return fn(x, cos, sin)
    x_rot = x[..., :rotary_dim]
    x_pass = x[..., rotary_dim:]
    return torch.cat([fn(x_rot, cos, sin), x_pass], dim=-1)
