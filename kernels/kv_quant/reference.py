"""Reference quantized KV state: plain torch, obviously correct, any device.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
keys are quantized **per channel** — a group of ``group`` consecutive tokens shares one
(scale, zero) per channel, because key outliers live in fixed channels — and values **per
token** — ``group`` consecutive channels of one token share one (scale, zero). Quantization is
asymmetric: ``x ≈ code · a + b`` with ``code`` in ``0 .. 2^bits − 1``.

The most recent tokens stay in full precision in a ring of ``R`` slots (KIVI's residual
``R``): ``R`` is ``residual`` rounded up to a multiple of ``group``, and at least one group.
When an append would leave more than ``R`` tokens in full precision, the oldest whole groups
are quantized, so with ``L`` tokens the first

    n_packed(L) = group · max(0, ceil((L − R) / group))

are packed and the last ``L − n_packed(L)`` (between ``R − group + 1`` and ``R`` once
``L > R``) sit in the ring at slot ``position % R``.

Codes are packed ``8 / bits`` to a byte along the channel axis: byte ``j`` holds channels
``per_byte·j + i`` at bits ``bits·i`` (little end first), for keys and values alike.

Scale formats (``scales``), one (scale, zero) pair per group:

* ``"fp16"`` — KIVI's: fp16 scale ``a = (max − min) / qmax`` and fp16 zero ``b = min``.
  4 bytes a group: at group=64 that is 0.5 bit per element, which puts a 4-bit state at
  0.284× bf16 and a 2-bit one at 0.160× — over the issue's 0.27× / 0.15× budget.
* ``"u8"`` (default) — 2 bytes a group: an 8-bit log scale ``a = 2^((c − 160) / 8)``
  (rounded *up*, 1/8-octave steps, ``2^-20 .. 2^11.9``) and an int8 zero ``b = a · z · qmax/32``
  (offset-by-128 in a uint8). The zero moves in steps of 1/32 of the code range, so the grid
  keeps one zero step of slack: ``a ≥ (max − min) / (qmax − qmax/32)``; a group whose
  ``|min|`` lies beyond 127 zero steps gets a larger scale. Every element of the group is
  still within ``a / 2`` of its value (error ≤ scale / 2, as with fp16).

Two options that cost no bytes (``rotate``, ``clip``; both off by default):

* ``rotate=True`` — incoherence processing (QuaRot, Ashkboos et al. 2024; QuIP#, SpinQuant):
  each head's keys and values are multiplied by a fixed orthogonal matrix ``Q = diag(s) · H``
  (``H`` the normalized Walsh–Hadamard matrix of size ``head_dim`` — block-diagonal with the
  largest power-of-two block dividing ``head_dim`` otherwise — and ``s`` a fixed ±1 sign vector
  regenerated from ``ROTATION_SEED``, stored nowhere) *before* they are quantized, and by
  ``Qᵀ`` after they are read. ``q·k`` and ``softmax·v`` are unchanged by a rotation of both
  sides, and the rotation spreads a few outlier channels over all of them, so each group's
  range is tighter. The state itself is rotation-agnostic (it holds ``x·Q``): the cache
  (``runtime/cache.py``, through the op ``longfx::kv_rotate``) and ``fake_quantize`` rotate
  around it. Attention over such a state needs no un-rotated copy: with ``Q`` orthogonal and
  applied to keys and values, ``attention(q, K, V) = attention(q·Q, K·Q, V·Q)·Qᵀ`` (QuaRot
  rotates the queries the same way), so a decode step rotates ``q``, attends over the stored
  state (``longfx::kv_quant_attention``) and un-rotates the output
  (``passes/kv_quant_decode.py``).
* ``clip=True`` — each group's (min, max) is scaled by the ratio of ``CLIP_RATIOS`` that gives
  the lowest squared error of that group (values beyond the clipped range saturate), searched
  at quantization time; the stored format is unchanged.

Key width (``key_bits``, default None = ``bits``): the keys of a state may be stored with more
(or fewer) bits than its values — KIVI's "K4V2" — so that a mixed-precision cache (KVTuner,
Li et al. 2025: a few sensitive layers get wider keys) is a per-layer choice of config. The
key codes are then ``[B, Hkv, Sp, D·key_bits/8]``; the key params keep their shape. Readers
take the key width off the tensors (``key_bits_of``: code bytes per token against the params'
head dim), as they take the ring size and the scale format, so the ops' schemas (one ``bits``,
the values') are unchanged; the Triton quantize-on-append and the default "asmt" decode take
such a state (a key width of its own, ``triton.key_bits``), the other decode variants refuse it.

State tensors (``QuantizedKV``), fixed dtypes and static shapes so that a graph can take and
return them (Sp = packed capacity, a multiple of group; Jv = ceil(D / group)):

    k_codes  uint8        [B, Hkv, Sp, D·bits/8]     packed key codes
    k_params fp16 | uint8 [B, Hkv, Sp/group, 2, D]   per (key group, channel): (scale, zero)
    v_codes  uint8        [B, Hkv, Sp, D·bits/8]     packed value codes
    v_params fp16 | uint8 [B, Hkv, Sp, 2, Jv]        per (token, channel group): (scale, zero)
    k_ring   model dtype  [B, Hkv, R, D]             full-precision recent keys
    v_ring   model dtype  [B, Hkv, R, D]
    length   int64        [1]                        tokens held (all batch rows alike)

GEAR (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM") is here as an emulation option: per group of ``group`` tokens,
the largest-magnitude entries are kept exactly (sparse), the rest is quantized, and a rank-r
SVD of what quantization lost is added back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from longfx.kernels.attention.reference import attention

BITS = (2, 4, 8)
SCALES = ("u8", "fp16")
SCALE_BIAS = 160          # u8 scale code c stands for 2^((c - SCALE_BIAS) / SCALE_STEPS)
SCALE_STEPS = 8
MIN_SCALE = 2.0 ** -20
ZERO_STEPS = 32           # u8 zero moves in steps of qmax / ZERO_STEPS scales
ROTATION_SEED = 0         # the ±1 signs of rotate=True (regenerated, never stored)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)   # clip=True: per-group range ratios searched


@dataclass(frozen=True)
class KVQuantConfig:
    """``kv_quant(bits=4, group=64, residual=128)``: see the module docstring."""
    bits: int = 4
    group: int = 64
    residual: int = 128
    scales: str = "u8"
    rotate: bool = False
    clip: bool = False
    key_bits: int | None = None     # None: the keys use ``bits`` too

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        if self.scales not in SCALES:
            raise ValueError(f"scales must be one of {SCALES}, got {self.scales!r}")
        for name in ("rotate", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.key_bits is not None and self.key_bits not in BITS:
            raise ValueError(f"key_bits must be None or one of {BITS}, got {self.key_bits!r}")

    def __str__(self):
        extra = "" if self.scales == "u8" else f", scales={self.scales!r}"
        extra += ", rotate=True" if self.rotate else ""
        extra += ", clip=True" if self.clip else ""
        extra += f", key_bits={self.key_bits}" if self.key_bits is not None else ""
        return f"kv_quant(bits={self.bits}, group={self.group}, residual={self.residual}{extra})"

    @property
    def kbits(self) -> int:
        """The keys' code width: ``key_bits`` when set, else ``bits``."""
        return self.bits if self.key_bits is None else self.key_bits

    @property
    def keys_config(self) -> "KVQuantConfig":
        """This config with ``bits`` = the keys' width (what the key functions quantize with)."""
        if self.key_bits is None or self.key_bits == self.bits:
            return self
        return dataclasses.replace(self, bits=self.key_bits, key_bits=None)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def ring(self) -> int:
        """Full-precision ring slots R: residual rounded up to whole groups, at least one."""
        return max(1, -(-self.residual // self.group)) * self.group

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.float16 if self.scales == "fp16" else torch.uint8

    def value_groups(self, head_dim: int) -> int:
        return -(-head_dim // self.group)

    def check_head_dim(self, head_dim: int) -> None:
        for bits in {self.bits, self.kbits}:
            per = 8 // bits
            if head_dim % per:
                raise ValueError(f"head_dim {head_dim} is not a multiple of {per} "
                                 f"({bits}-bit codes are packed {per} to a byte)")


def key_bits_of(k_codes: torch.Tensor, head_dim: int) -> int:
    """The key code width of a state, read off its tensors: ``k_codes`` [..., D·bits/8]."""
    width = k_codes.shape[-1]
    bits = width * 8 // head_dim if head_dim else 0
    if bits not in BITS or bits * head_dim != width * 8:
        raise ValueError(f"key codes of {width} bytes a token do not fit head_dim {head_dim} at "
                         f"any of {BITS} bits")
    return bits


def n_packed(length, config: KVQuantConfig):
    """Tokens in packed storage when ``length`` tokens are held (int or int tensor)."""
    g, r = config.group, config.ring
    if isinstance(length, torch.Tensor):
        return ((length - r + g - 1).div(g, rounding_mode="floor")).clamp(min=0) * g
    return max(0, -(-(length - r) // g)) * g


# ---------------------------------------------------------------- rotation (rotate=True)

def _signs(n: int, seed: int) -> list[float]:
    """n fixed pseudo-random ±1 (a 32-bit integer hash of (seed, i); plain Python, so that a
    traced cache builds the same constant)."""
    out = []
    for i in range(n):
        h = (i + 1) * 0x9E3779B1 + seed * 0x85EBCA77
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
        h = ((h ^ (h >> 12)) * 0x297A2D39) & 0xFFFFFFFF
        out.append(1.0 if (h ^ (h >> 15)) & 1 else -1.0)
    return out


def rotation_block(head_dim: int) -> int:
    """Size of the Hadamard blocks of ``rotation(head_dim)``: the largest power of two dividing
    head_dim (head_dim itself when it is a power of two)."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return head_dim & -head_dim


def rotation(head_dim: int, device=None, dtype: torch.dtype = torch.float32,
             seed: int = ROTATION_SEED) -> torch.Tensor:
    """The fixed orthogonal matrix Q [D, D] of ``rotate=True``: ``diag(s) · H``, H the
    normalized Walsh–Hadamard matrix (block-diagonal, blocks of ``rotation_block(D)``), s ±1
    signs regenerated from ``seed``. Rotate with ``x @ Q``, undo with ``y @ Q.T``."""
    b = rotation_block(head_dim)
    i = torch.arange(head_dim, device=device)
    ib, jb = (i % b)[:, None], (i % b)[None, :]                         # [D, 1], [1, D]
    both = ib & jb
    parity = torch.zeros_like(both)
    for shift in range(max(1, b.bit_length() - 1)):                    # popcount(i & j) mod 2
        parity = parity ^ ((both >> shift) & 1)
    h = (1 - 2 * parity).to(torch.float32) / math.sqrt(b)
    h = torch.where((i // b)[:, None] == (i // b)[None, :], h, torch.zeros_like(h))
    s = torch.tensor(_signs(head_dim, seed), dtype=torch.float32, device=device)
    return (s[:, None] * h).to(dtype)


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ Q, computed in fp32, returned in x's dtype."""
    return (x.float() @ q.float()).to(x.dtype)


def unrotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ Qᵀ (the inverse of ``rotate``), computed in fp32, in x's dtype."""
    return (x.float() @ q.float().T).to(x.dtype)


def rotate_as(x: torch.Tensor, q: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``unrotate(x, q)`` when ``inverse``, else ``rotate(x, q)``: the reference of the custom
    op ``longfx::kv_rotate`` (op.py), which the cache calls so that a graph shows a rotation as
    one node. ``q`` must be [D, D] with D = x's last dim."""
    D = x.shape[-1]
    if q.dim() != 2 or tuple(q.shape) != (D, D):
        raise ValueError(f"the rotation must be [D, D] = [{D}, {D}] for x {tuple(x.shape)}, "
                         f"got {tuple(q.shape)}")
    return unrotate(x, q) if inverse else rotate(x, q)


# ---------------------------------------------------------------- packing

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2^bits) -> uint8 [..., n·bits/8], adjacent codes to a byte."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"last dim {codes.shape[-1]} is not a multiple of {per}")
    n = codes.shape[-1]
    c = codes.to(torch.int32).unflatten(-1, (n // per, per))           # [..., n/per, per]
    # c << bits·i as c · 2^(bits·i): the same bytes, and ops every exporter has (ONNX's
    # BitShift takes unsigned types only)
    weights = torch.tensor([1 << (bits * i) for i in range(per)], dtype=torch.int32,
                           device=codes.device)
    return (c * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """uint8 [..., m] -> codes [..., m·8/bits] in ``dtype`` (inverse of ``pack``).

    Written in fp32 arithmetic, x = byte; per code c = x − 2^bits·⌊x / 2^bits⌋, then x ←
    ⌊x / 2^bits⌋: every value is an integer below 256, so each step is exact. This is the form
    onnxruntime runs fastest. The integer form ``(p // 2^(bits·i)) % 2^bits`` exports as
    floor-division ONNX (Div, Mod, sign tests, Where). That took 1.3 of the 1.6 s of a SmolLM2
    decode step at 4k tokens. A [256, per] table lookup (Gather) took 3.2 ms per 380k bytes,
    the form below 0.55 ms (docs/design-notes.md)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    per, base = 8 // bits, float(1 << bits)
    x, codes = packed.float(), []
    for _ in range(per - 1):
        high = torch.floor(x * (1.0 / base))
        codes.append(x - high * base)
        x = high
    codes.append(x)
    return torch.stack(codes, -1).flatten(-2).to(dtype)                 # [..., m, per] -> [.., m·per]


# ---------------------------------------------------------------- group quantization

# 2^((c − SCALE_BIAS) / SCALE_STEPS) for every u8 scale code, each rounded once to fp32
_SCALE_OF_CODE = [float(torch.tensor(2.0 ** ((c - SCALE_BIAS) / SCALE_STEPS), dtype=torch.float32))
                  for c in range(256)]


def scale_of_code(c: torch.Tensor) -> torch.Tensor:
    """The u8 format's scale for code c (fp32; c integer-valued, any dtype; outside 0..255 it is
    clamped, which ``group_params``' final clamp makes harmless), read from a table of the 256
    scales: a code stands for the same float wherever it sits in a tensor. (``torch.exp2``'s
    vectorized and scalar CPU paths differ in the last bit for 32 of the 256 codes, so a token's
    dequantized value moved by an ulp when the tensor around it changed shape — a packed key
    read at two lengths, or an evicting store's compacted tokens.)"""
    table = torch.tensor(_SCALE_OF_CODE, dtype=torch.float32, device=c.device)
    return table[c.long().clamp(0, 255)]


def group_params(mn: torch.Tensor, mx: torch.Tensor, bits: int, scales: str) -> torch.Tensor:
    """Per-group min/max (fp32 [...]) -> stored (scale, zero) [..., 2] (fp16 or uint8)."""
    qmax = (1 << bits) - 1
    if scales == "fp16":
        return torch.stack(((mx - mn) / qmax, mn), -1).to(torch.float16)
    z_unit = qmax / ZERO_STEPS
    s = torch.maximum((mx - mn) / (qmax - z_unit), mn.abs() / (127 * z_unit))
    s = s.clamp(min=MIN_SCALE)
    c = torch.ceil(torch.log2(s) * SCALE_STEPS) + SCALE_BIAS
    c = torch.where(scale_of_code(c) < s, c + 1, c).clamp(0, 255)     # never round down
    zc = torch.floor(mn / (scale_of_code(c) * z_unit)).clamp(-128, 127)
    return torch.stack((c, zc + 128), -1).to(torch.uint8)


def search_params(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, dim: int, bits: int,
                  scales: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``clip=True``: the stored (scale, zero) [..., 2] of each group of x (fp32, reduced over
    ``dim``; ``mn``/``mx`` its min/max with ``dim`` removed) whose clipped range
    ``(r·min, r·max)``, r in ``CLIP_RATIOS``, gives the lowest squared quantization error
    (ties: the larger range). ``valid`` masks padding out of the error."""
    best, best_err = None, None
    for r in CLIP_RATIOS:
        params = group_params(mn * r, mx * r, bits, scales)
        a, b = (t.unsqueeze(dim) for t in affine(params, bits))
        err = (quantize_codes(x, a, b, bits).float() * a + b - x).square()
        if valid is not None:
            err = torch.where(valid, err, torch.zeros_like(err))
        err = err.sum(dim)
        if best is None:
            best, best_err = params, err
        else:
            better = err < best_err
            best = torch.where(better[..., None], params, best)
            best_err = torch.where(better, err, best_err)
    return best


def affine(params: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored params [..., 2] -> fp32 (a, b) with x ≈ code · a + b."""
    if params.dtype == torch.float16:
        return params[..., 0].float(), params[..., 1].float()
    a = scale_of_code(params[..., 0])
    z_unit = ((1 << bits) - 1) / ZERO_STEPS
    return a, a * ((params[..., 1].float() - 128) * z_unit)


def quantize_codes(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 x and broadcastable (a, b) -> uint8 codes floor((x − b) / a + 1/2) in 0..qmax."""
    safe = torch.where(a > 0, a, torch.ones_like(a))
    q = torch.floor((x - b) / safe + 0.5).clamp(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def quantize_keys(k: torch.Tensor, config: KVQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (KIVI) quantization of k [B, Hkv, T, D], T a multiple of group, with the
    keys' width ``config.kbits``.

    Returns packed codes uint8 [B, Hkv, T, D·kbits/8] and params [B, Hkv, T/group, 2, D]."""
    B, H, T, D = k.shape
    config = config.keys_config
    g = config.group
    if T % g:
        raise ValueError(f"{T} key tokens are not whole groups of {g}")
    config.check_head_dim(D)
    x = k.float().view(B, H, T // g, g, D)                              # [B, Hkv, T/g, g, D]
    if config.clip:
        params = search_params(x, x.amin(3), x.amax(3), 3, config.bits, config.scales)
    else:
        params = group_params(x.amin(3), x.amax(3), config.bits, config.scales)  # [.., T/g, D, 2]
    a, b = affine(params, config.bits)                                 # [B, Hkv, T/g, D]
    codes = quantize_codes(x, a[:, :, :, None], b[:, :, :, None], config.bits)
    return pack(codes.view(B, H, T, D), config.bits), params.transpose(-1, -2).contiguous()


def quantize_values(v: torch.Tensor, config: KVQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (KIVI) quantization of v [B, Hkv, T, D] in groups of ``group`` channels (the
    last group is short when group does not divide D).

    Returns packed codes uint8 [B, Hkv, T, D·bits/8] and params [B, Hkv, T, 2, Jv]."""
    B, H, T, D = v.shape
    g = config.group
    config.check_head_dim(D)
    jv = config.value_groups(D)
    x = torch.nn.functional.pad(v.float(), (0, jv * g - D), value=float("nan"))
    x = x.view(B, H, T, jv, g)                                          # [B, Hkv, T, Jv, g]
    pad = x.isnan()
    mn = torch.where(pad, float("inf"), x).amin(-1)
    mx = torch.where(pad, float("-inf"), x).amax(-1)
    if config.clip:
        params = search_params(x.nan_to_num(0.0), mn, mx, -1, config.bits, config.scales, ~pad)
    else:
        params = group_params(mn, mx, config.bits, config.scales)       # [B, Hkv, T, Jv, 2]
    a, b = affine(params, config.bits)
    codes = quantize_codes(x.nan_to_num(0.0), a[..., None], b[..., None], config.bits)
    codes = codes.view(B, H, T, jv * g)[..., :D]
    return pack(codes, config.bits), params.transpose(-1, -2).contiguous()


def dequantize_keys(packed: torch.Tensor, params: torch.Tensor,
                    config: KVQuantConfig) -> torch.Tensor:
    """Packed keys [B, Hkv, T, D·kbits/8] + params [B, Hkv, T/group, 2, D] -> fp32 [B, Hkv, T, D].
    The key width is read off the tensors (``key_bits_of``), not from ``config``: the read op
    is given one ``bits`` (the values'), and a ``key_bits`` state's keys are wider."""
    bits = key_bits_of(packed, params.shape[-1])
    codes = unpack(packed, bits, torch.float32)
    B, H, T, D = codes.shape
    g = config.group
    a, b = affine(params.transpose(-1, -2), bits)                      # [B, Hkv, T/g, D]
    x = codes.view(B, H, T // g, g, D) * a[:, :, :, None] + b[:, :, :, None]
    return x.view(B, H, T, D)


def dequantize_values(packed: torch.Tensor, params: torch.Tensor,
                      config: KVQuantConfig) -> torch.Tensor:
    """Packed values [B, Hkv, T, D·bits/8] + params [B, Hkv, T, 2, Jv] -> fp32 [B, Hkv, T, D]."""
    codes = unpack(packed, config.bits, torch.float32)
    B, H, T, D = codes.shape
    g = config.group
    a, b = affine(params.transpose(-1, -2), config.bits)               # [B, Hkv, T, Jv]
    jv = a.shape[-1]
    if jv * g == D:                       # whole groups: broadcast (a, b) over each group
        x = codes.view(B, H, T, jv, g) * a[..., None] + b[..., None]            # [B, Hkv, T, Jv, g]
        return x.view(B, H, T, D)
    # a last, partial group: each group's (a, b) over its g channels, cut to D. An expand, not
    # repeat_interleave, whose ONNX form reshapes with a -1 that onnxruntime cannot resolve for
    # an empty T
    a = a[..., None].expand(B, H, T, jv, g).reshape(B, H, T, jv * g)[..., :D]   # [B, Hkv, T, D]
    b = b[..., None].expand(B, H, T, jv, g).reshape(B, H, T, jv * g)[..., :D]
    return codes * a + b


def roundtrip_keys(k: torch.Tensor, config: KVQuantConfig) -> torch.Tensor:
    """quantize -> dequantize of whole key groups, in k's dtype."""
    return dequantize_keys(*quantize_keys(k, config), config).to(k.dtype)


def roundtrip_values(v: torch.Tensor, config: KVQuantConfig) -> torch.Tensor:
    return dequantize_values(*quantize_values(v, config), config).to(v.dtype)


def step_size(params: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantization step a (fp32) of each group: errors are at most a / 2."""
    return affine(params, bits)[0]


# ---------------------------------------------------------------- GEAR (emulation only)

@dataclass(frozen=True)
class Gear:
    """GEAR's error correction (Kang et al. 2024): ``outliers`` — fraction of entries of each
    [group, D] block kept exactly (largest magnitudes, a sparse matrix S); ``rank`` — rank of the
    SVD approximation L of the residual X − S − Q(X − S). Reconstruction: Q(X − S) + L + S."""
    rank: int = 4
    outliers: float = 0.01

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.outliers < 1.0:
            raise ValueError(f"outliers must be a fraction in [0, 1), got {self.outliers}")


def gear_roundtrip(x: torch.Tensor, kind: str, config: KVQuantConfig, gear: Gear) -> torch.Tensor:
    """GEAR-corrected quantize -> dequantize of x [B, Hkv, T, D] (T whole groups); ``kind`` is
    "keys" (per-channel) or "values" (per-token). Each group of ``group`` tokens is compressed
    on its own, as a streaming state would (GEAR's buffered strategy)."""
    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    B, H, T, D = x.shape
    g = config.group
    if T % g:
        raise ValueError(f"{T} tokens are not whole groups of {g}")
    xf = x.float()
    blocks = xf.view(B, H, T // g, g * D)                              # [B, Hkv, T/g, g·D]
    sparse = torch.zeros_like(blocks)
    n_out = math.ceil(gear.outliers * g * D)
    if n_out:
        idx = blocks.abs().topk(n_out, dim=-1).indices
        sparse.scatter_(-1, idx, blocks.gather(-1, idx))
    sparse = sparse.view(B, H, T, D)
    rt = roundtrip_keys if kind == "keys" else roundtrip_values
    dense = rt(xf - sparse, config)
    out = dense + sparse
    if gear.rank:
        err = (xf - out).view(B, H, T // g, g, D)                      # [B, Hkv, T/g, g, D]
        u, s, vh = torch.linalg.svd(err, full_matrices=False)
        r = min(gear.rank, s.shape[-1])
        low = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
        out = out + low.reshape(B, H, T, D)
    return out.to(x.dtype)


# ---------------------------------------------------------------- emulation (fake quantization)

def _roundtrip_groups(x: torch.Tensor, kind: str, config: KVQuantConfig, gear: Gear | None):
    """x with its whole groups of tokens replaced by their quantize -> dequantize."""
    full = x.shape[2] // config.group * config.group
    if full == 0:
        return x
    head = x[:, :, :full]
    q = rotation(x.shape[-1], x.device) if config.rotate else None
    if q is not None:
        head = rotate(head, q)
    if gear is not None:
        rt = gear_roundtrip(head, kind, config, gear)
    elif kind == "keys":
        rt = roundtrip_keys(head, config)
    else:
        rt = roundtrip_values(head, config)
    if q is not None:
        rt = unrotate(rt, q)
    return torch.cat((rt, x[:, :, full:]), dim=2)


def fake_quantize(k: torch.Tensor, v: torch.Tensor, config: KVQuantConfig,
                  gear: Gear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a state holding k, v [B, Hkv, T, D] gives back: the first n_packed(T) tokens
    quantized -> dequantized (with GEAR's correction when given; rotated before and back after
    with ``config.rotate``), the rest unchanged."""
    n = n_packed(k.shape[2], config)
    kq = _roundtrip_groups(k[:, :, :n], "keys", config, gear)
    vq = _roundtrip_groups(v[:, :, :n], "values", config, gear)
    return torch.cat((kq, k[:, :, n:]), 2), torch.cat((vq, v[:, :, n:]), 2)


def attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVQuantConfig,
                       scale: float | None = None, gear: Gear | None = None,
                       chunk: int = 1024) -> torch.Tensor:
    """Causal attention as token-by-token decoding over a quantized state would compute it, in
    one pass (for perplexity): query i, at position p = Skv − S + i, sees keys j <= p, read
    quantized -> dequantized when j < n_packed(p + 1) and exact otherwise.

    q [B, H, S, D]; k, v [B, Hkv, Skv, D]. Queries are processed ``chunk`` at a time."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H, S, D] and k, v [B, Hkv, Skv, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    S, Skv = q.shape[2], k.shape[2]
    if S > Skv:
        raise ValueError(f"{S} queries but only {Skv} keys")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    kq = _roundtrip_groups(k, "keys", config, gear)
    vq = _roundtrip_groups(v, "values", config, gear)
    groups = q.shape[1] // k.shape[1]
    k, v, kq, vq = (t.repeat_interleave(groups, 1) for t in (k, v, kq, vq))
    kpos = torch.arange(Skv, device=q.device)
    outs = []
    for c0 in range(0, S, chunk):
        qc = q[:, :, c0:c0 + chunk]
        p = torch.arange(Skv - S + c0, Skv - S + c0 + qc.shape[2], device=q.device)
        quant = kpos[None, :] < n_packed(p + 1, config)[:, None]          # [s, Skv]
        seen = kpos[None, :] <= p[:, None]
        scores = torch.where(quant, qc @ kq.transpose(-1, -2), qc @ k.transpose(-1, -2))
        scores = (scores * scale).float().masked_fill(~seen, float("-inf"))
        probs = torch.softmax(scores, -1)                               # [B, H, s, Skv]
        pq = probs.masked_fill(~quant, 0.0).to(v.dtype)
        pf = probs.masked_fill(quant, 0.0).to(v.dtype)
        outs.append(pq @ vq + pf @ v)
    return torch.cat(outs, 2)


# ---------------------------------------------------------------- the state

@dataclass
class QuantizedKV:
    """One layer's quantized KV state (layout: module docstring). Mutated in place by ``append``."""
    k_codes: torch.Tensor
    k_params: torch.Tensor
    v_codes: torch.Tensor
    v_params: torch.Tensor
    k_ring: torch.Tensor
    v_ring: torch.Tensor
    length: torch.Tensor
    config: KVQuantConfig

    NAMES = ("k_codes", "k_params", "v_codes", "v_params", "k_ring", "v_ring", "length")

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, capacity: int,
              config: KVQuantConfig = KVQuantConfig(), dtype: torch.dtype = torch.bfloat16,
              device=None) -> "QuantizedKV":
        """A state for up to ``capacity`` tokens (device="meta" sizes it without memory)."""
        config.check_head_dim(head_dim)
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        sp, r, g = n_packed(capacity, config), config.ring, config.group
        dp, jv, pd = head_dim // config.per_byte, config.value_groups(head_dim), config.params_dtype
        dk = head_dim * config.kbits // 8                                   # key code bytes
        B, H = batch, kv_heads
        return cls(
            k_codes=torch.zeros(B, H, sp, dk, dtype=torch.uint8, device=device),
            k_params=torch.zeros(B, H, sp // g, 2, head_dim, dtype=pd, device=device),
            v_codes=torch.zeros(B, H, sp, dp, dtype=torch.uint8, device=device),
            v_params=torch.zeros(B, H, sp, 2, jv, dtype=pd, device=device),
            k_ring=torch.zeros(B, H, r, head_dim, dtype=dtype, device=device),
            v_ring=torch.zeros(B, H, r, head_dim, dtype=dtype, device=device),
            length=torch.zeros(1, dtype=torch.int64, device=device),
            config=config)

    @classmethod
    def from_tensors(cls, tensors, bits: int, group: int) -> "QuantizedKV":
        """Rebuild the state from its seven tensors (the custom ops' arguments)."""
        t = dict(zip(cls.NAMES, tensors))
        scales = "fp16" if t["k_params"].dtype == torch.float16 else "u8"
        kb = key_bits_of(t["k_codes"], t["k_ring"].shape[-1])             # read off the tensors
        state = cls(**t, config=KVQuantConfig(bits, group, t["k_ring"].shape[2], scales,
                                              key_bits=None if kb == bits else kb))
        state.validate()
        return state

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.NAMES)

    @property
    def head_dim(self) -> int:
        return self.k_ring.shape[-1]

    @property
    def capacity(self) -> int:
        """Most tokens the state can hold."""
        return self.k_codes.shape[2] + self.k_ring.shape[2]

    def validate(self) -> None:
        c, (B, H, R, D) = self.config, self.k_ring.shape
        c.check_head_dim(D)
        sp = self.k_codes.shape[2]
        want = {"k_codes": ((B, H, sp, D * c.kbits // 8), torch.uint8),
                "k_params": ((B, H, sp // c.group, 2, D), c.params_dtype),
                "v_codes": ((B, H, sp, D // c.per_byte), torch.uint8),
                "v_params": ((B, H, sp, 2, c.value_groups(D)), c.params_dtype),
                "v_ring": ((B, H, R, D), self.k_ring.dtype),
                "length": ((1,), torch.int64)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                                 f"{shape} for {c} with ring {tuple(self.k_ring.shape)}")
        if sp % c.group or R != c.ring:
            raise ValueError(f"packed capacity {sp} / ring {R} do not fit {c} (ring {c.ring})")


def append(state: QuantizedKV, k: torch.Tensor, v: torch.Tensor,
           length: int | None = None) -> QuantizedKV:
    """Append k, v [B, Hkv, s, D] in place: whole groups that leave the ring are quantized
    (keys per channel, values per token; ``state.config.clip`` searched) into packed storage,
    the rest goes to the ring. ``length``: the tokens held, when the caller knows it as a Python
    int (a traced cache; otherwise it is read from ``state.length``). The state holds what it
    is given: rotation (``rotate``) is the caller's."""
    c = state.config
    if k.shape != v.shape or k.dim() != 4 or k.shape[:2] != state.k_ring.shape[:2] \
            or k.shape[-1] != state.head_dim:
        raise ValueError(f"k, v must both be [B, Hkv, s, D] = {tuple(state.k_ring.shape[:2])} + "
                         f"(s, {state.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != state.k_ring.dtype or v.dtype != state.k_ring.dtype:
        raise ValueError(f"k, v are {k.dtype}/{v.dtype}, the state holds {state.k_ring.dtype}")
    L, s, R = int(state.length) if length is None else length, k.shape[2], c.ring
    if L + s > state.capacity:
        raise ValueError(f"appending {s} tokens to {L} exceeds the capacity {state.capacity}")
    n0, n1 = n_packed(L, c), n_packed(L + s, c)
    if n1 > n0:
        old = torch.arange(n0, min(n1, L), device=k.device)              # ring tokens packed now
        fresh = max(0, n1 - L)                                            # new tokens packed now
        xk = torch.cat((state.k_ring[:, :, old % R], k[:, :, :fresh]), 2)   # [B, Hkv, n1 - n0, D]
        xv = torch.cat((state.v_ring[:, :, old % R], v[:, :, :fresh]), 2)
        kc, kp = quantize_keys(xk, c)
        vc, vp = quantize_values(xv, c)
        state.k_codes[:, :, n0:n1] = kc
        state.k_params[:, :, n0 // c.group:n1 // c.group] = kp
        state.v_codes[:, :, n0:n1] = vc
        state.v_params[:, :, n0:n1] = vp
    keep = torch.arange(max(L, n1), L + s, device=k.device)               # positions to the ring
    state.k_ring[:, :, keep % R] = k[:, :, keep - L]
    state.v_ring[:, :, keep % R] = v[:, :, keep - L]
    state.length += s
    return state


def dequantize_state(state: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """All held keys and values, [B, Hkv, L, D] in the ring's dtype (quantized ones round-tripped)."""
    c, L = state.config, int(state.length)
    n = n_packed(L, c)
    k = dequantize_keys(state.k_codes[:, :, :n], state.k_params[:, :, :n // c.group], c)
    v = dequantize_values(state.v_codes[:, :, :n], state.v_params[:, :, :n], c)
    slots = torch.arange(n, L, device=k.device) % c.ring
    dt = state.k_ring.dtype
    return (torch.cat((k.to(dt), state.k_ring[:, :, slots]), 2),
            torch.cat((v.to(dt), state.v_ring[:, :, slots]), 2))


def check_query(q: torch.Tensor, kv_heads: int, head_dim: int, length: int | None) -> None:
    if q.dim() != 4 or q.shape[-1] != head_dim or q.shape[1] % kv_heads:
        raise ValueError(f"q must be [B, H, S, {head_dim}] with H a multiple of {kv_heads} "
                         f"kv heads, got {tuple(q.shape)}")
    if length is not None and q.shape[2] > length:
        raise ValueError(f"{q.shape[2]} queries but only {length} tokens in the state: queries "
                         f"are the last positions of the state (append them first)")


def check_sinks(sink_k: torch.Tensor | None, sink_v: torch.Tensor | None,
                state: QuantizedKV) -> None:
    """The exact sink copy beside a state: both or neither, [B, Hkv, n, D] in the ring's dtype."""
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sink_k and sink_v come together (both or neither)")
    if sink_k is None:
        return
    want = (*state.k_ring.shape[:2], state.head_dim)
    for name, t in (("sink_k", sink_k), ("sink_v", sink_v)):
        if t.dim() != 4 or (*t.shape[:2], t.shape[3]) != want or t.shape != sink_k.shape:
            raise ValueError(f"{name} must be [B, Hkv, n, D] with (B, Hkv, D) = {want}, "
                             f"got {tuple(t.shape)} (sink_k {tuple(sink_k.shape)})")
        if t.dtype != state.k_ring.dtype:
            raise ValueError(f"{name} is {t.dtype}, the state holds {state.k_ring.dtype}")


def with_sinks(k: torch.Tensor, v: torch.Tensor, sink_k: torch.Tensor | None,
               sink_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, Hkv, L, D] with their first min(n, L) positions replaced by the exact copy
    ``sink_k``, ``sink_v`` [B, Hkv, n, D] (StreamingLLM's attention sinks, Xiao et al. 2023,
    kept beside the packed state: ``runtime/cache.py``)."""
    if sink_k is None:
        return k, v
    n = min(sink_k.shape[2], k.shape[2])
    return (torch.cat((sink_k[:, :, :n].to(k.dtype), k[:, :, n:]), 2),
            torch.cat((sink_v[:, :, :n].to(v.dtype), v[:, :, n:]), 2))


def check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an integer >= 0 (0: no window), got {window!r}")


def decode_mask(S: int, L: int, window: int = 0, device=None) -> torch.Tensor:
    """[S, L] bool: which of the L held keys each of the last S positions of a state sees —
    bottom-right causal (query i sits at held index L − S + i, keys j <= L − S + i), and with
    ``window`` > 0 only the ``window`` most recent of them (j >= L − S + i − window + 1; HF's
    sliding mask, ``kv > q − window``, on held indices)."""
    check_window(window)
    keep = torch.ones(S, L, dtype=torch.bool, device=device).tril(L - S)     # [S, L]
    if window:
        keep &= ~torch.ones(S, L, dtype=torch.bool, device=device).tril(L - S - window)
    return keep


def attention_decode(q: torch.Tensor, state: QuantizedKV, scale: float | None = None,
                     sink_k: torch.Tensor | None = None,
                     sink_v: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Attention of q [B, H, S, D] — the last S positions of the state, bottom-right causal —
    over everything the state holds, dequantized (GQA: head h reads kv head h // (H / Hkv)).
    With ``sink_k``, ``sink_v`` [B, Hkv, n, D] (an exact copy of the first n tokens, the ring's
    dtype), positions < min(n, L) read the copy instead of their stored form (quantized).
    ``window`` > 0 (a sliding-window layer, its cache trimmed to whole groups: it holds more
    than the window): each query sees only the ``window`` most recent held keys up to its own
    position (``decode_mask``), sink positions included."""
    L = int(state.length)
    check_query(q, state.k_ring.shape[1], state.head_dim, L)
    check_sinks(sink_k, sink_v, state)
    k, v = with_sinks(*dequantize_state(state), sink_k, sink_v)
    mask = decode_mask(q.shape[2], L, window, q.device)                  # [S, L]
    return attention(q, k.to(q.dtype), v.to(q.dtype), mask, scale)


# ---------------------------------------------------------------- memory

def nbytes(state: QuantizedKV) -> int:
    """Bytes of every tensor of the state, scales, zeros, ring and length included."""
    return sum(t.numel() * t.element_size() for t in state.tensors())


def state_bytes(capacity: int, kv_heads: int, head_dim: int, config: KVQuantConfig,
                batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """``nbytes`` of an empty state of that capacity, computed without allocating."""
    return nbytes(QuantizedKV.empty(batch, kv_heads, head_dim, capacity, config, dtype, "meta"))


def memory_ratio(capacity: int, kv_heads: int, head_dim: int, config: KVQuantConfig,
                 dtype: torch.dtype = torch.bfloat16) -> float:
    """State bytes over a plain K + V cache of the same capacity in ``dtype``."""
    plain = 2 * capacity * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return state_bytes(capacity, kv_heads, head_dim, config, 1, dtype) / plain
