"""Triton quantize-on-append with the clip search (``clip=True``; CUDA, or the interpreter with
TRITON_INTERPRET=1). Semantics: ``reference.append`` on a state whose ``config.clip`` is set;
the packed codes and the stored (scale, zero) are bit-identical to it (the one exception is
below).

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
keys are quantized per channel over groups of ``group`` tokens, values per token over groups
of ``group`` channels. The clip search (``reference.search_params``): each group's
(min, max) is scaled by every ratio r of ``reference.CLIP_RATIOS``, and of the stored
(scale, zero) those ranges give, the one with the lowest squared quantization error of the
group is kept (ties: the earlier ratio, the larger range). ``reference.search_params`` names
no source; docs/kv_compression.md ("2-bit within 0.15×: rotation and clipping") records it as
a per-group MSE search over (min, max) × CLIP_RATIOS. It is the clipping-ratio grid search of
weight quantizers (AWQ's ``auto_clip``, Lin et al. 2024, shrinks each group's range by a grid
of ratios and keeps the lowest error), applied to the KV cache at quantization time.

One program per (batch·kv head, group that leaves the ring in this append), as
``triton._append_quantize_kernel``; the tokens that stay in full precision go to their ring
slots with ``triton._append_ring_kernel`` (reused, not copied). The length is read on the
device (no host sync) and the grid depends on shapes only, so a CUDA graph can capture it.

Bit-exactness. Every fp32 operation of the reference is done once, in its order, with its
rounding: IEEE division (``div_rn``; Triton's ``/`` is an approximate division on NVIDIA),
no fused multiply-adds (launched with ``enable_fp_fusion=False``: the reference's
``codes·a + b − x`` rounds after each operation), the u8 format's scale read as the
reference's table holds it (``_scale_of_code``: 2^((c − 160)/8) in fp64 rounded once to fp32;
the fp64 value of every code lies more than 1e-8 relatively away from an fp32 rounding
midpoint, so an fp64 exp2 within an ulp rounds to the table's float — checked in the tests),
and ``ceil(log2(s)·8)`` with libdevice's log2 (CUDA's ``log2f``, which torch's CUDA kernels
call too; the interpreter calls numpy's).

The exception: the squared error of a group is a sum of ``group`` fp32 terms, and torch and
Triton add them in different orders (torch's CPU and CUDA reductions differ from each other
too). The terms are identical, so the sums differ by at most their rounding (a few 1e-6
relative for 64 terms), and the choice between two ratios can differ only where their
errors are that close: a near-tie, where either choice is as good. The tests require
equality under the interpreter and, on CUDA, allow such near-ties only (the two choices'
errors, summed in fp64, within 1e-5 relative; codes always those of the chosen params).
``log2`` carries the same kind of risk at ulp level (a scale within an ulp of a 1/8-octave
step) where the reference runs on another library's log2 (the CPU reference against the GPU
kernel). Neither was seen: the tests pass with equality under the interpreter and on an H100,
and a 32k-token state filled through both appends on the H100 was identical (below).

Measured on an H100 (2026-11-24, torch 2.11, Triton 3.6; B=1, 8 kv heads, D=128, bf16,
``kv_quant(bits=2, clip=true, key_bits=4)``'s state (u8, group 64, residual 128) holding 32k
tokens; benchmarks/bench_kv_quant_clip_append.py, results/kv_quant_clip_append_h100.json),
reference / this append eager / in a CUDA graph of 10, ms an append: one token 0.316 / 0.101
/ 0.0045 averaged over a 64-step group cycle (ring only 0.163 / 0.099 / 0.0042; the step that
packs a group 9.92 / 0.222 / 0.020); 1024 tokens 11.45 / 0.438 / 0.377.
"""
from __future__ import annotations

import torch

from longfx.kernels.kv_quant import reference
from longfx.kernels.kv_quant import triton as base

triton = base.triton
AVAILABLE = base.AVAILABLE

if len(reference.CLIP_RATIOS) != 5 or reference.CLIP_RATIOS[0] != 1.0:
    raise ImportError(f"_append_clip_kernel takes 5 clip ratios, the first 1.0; the reference "
                      f"has {reference.CLIP_RATIOS}")


def supports_append_clip(state: reference.QuantizedKV, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``append_clip`` takes this append: what ``triton.supports_append`` takes (a
    power-of-two group >= 32, head dim <= 256, contiguous state tensors on k's device), on a
    state with ``config.clip`` set."""
    return bool(state.config.clip) and base.supports_append(state, k, v)


if triton is not None:
    import triton.language as tl

    if base.INTERPRET:        # the interpreter has no libdevice: numpy's log2 / exp2

        @triton.jit
        def _log2(x):
            return tl.log2(x)

        @triton.jit
        def _exp2(x):
            return tl.exp2(x)

    else:                     # CUDA's log2f (as torch's kernels) and fp64 exp2, not approximations
        from triton.language.extra import libdevice

        @triton.jit
        def _log2(x):
            return libdevice.log2(x)

        @triton.jit
        def _exp2(x):
            return libdevice.exp2(x)

    @triton.jit
    def _scale_of_code(c):
        """u8 scale code c (fp32, integral, 0..255) -> 2^((c − 160) / 8) as fp32, exactly the
        reference's table (``reference.scale_of_code``: the fp64 power rounded once)."""
        e = ((c - 160.0) * 0.125).to(tl.float64)                         # exact
        return _exp2(e).to(tl.float32)

    @triton.jit
    def _params(mn, mx, QMAX: tl.constexpr, FP16: tl.constexpr):
        """fp32 group min/max -> stored (scale, zero) as ``reference.group_params`` rounds them."""
        if FP16:
            p0 = tl.math.div_rn(mx - mn, tl.full(mn.shape, QMAX, tl.float32)).to(tl.float16)
            p1 = mn.to(tl.float16)
        else:
            ZU: tl.constexpr = QMAX / 32.0                                  # exact in fp32
            s = tl.maximum(tl.math.div_rn(mx - mn, tl.full(mn.shape, QMAX - ZU, tl.float32)),
                           tl.math.div_rn(tl.abs(mn), tl.full(mn.shape, 127.0 * ZU, tl.float32)))
            s = tl.maximum(s, 9.5367431640625e-07)                          # MIN_SCALE 2^-20
            c = tl.ceil(_log2(s) * 8.0) + 160.0
            c = tl.where(_scale_of_code(tl.minimum(tl.maximum(c, 0.0), 255.0)) < s, c + 1.0, c)
            c = tl.minimum(tl.maximum(c, 0.0), 255.0)                       # never round down
            zc = tl.floor(tl.math.div_rn(mn, _scale_of_code(c) * ZU))
            zc = tl.minimum(tl.maximum(zc, -128.0), 127.0)
            p0 = c.to(tl.uint8)
            p1 = (zc + 128.0).to(tl.uint8)
        return p0, p1

    @triton.jit
    def _affine(p0, p1, QMAX: tl.constexpr, FP16: tl.constexpr):
        """Stored (scale, zero) -> fp32 (a, b), x ≈ code·a + b (``reference.affine``)."""
        if FP16:
            a = p0.to(tl.float32)
            b = p1.to(tl.float32)
        else:
            a = _scale_of_code(p0.to(tl.float32))
            b = a * ((p1.to(tl.float32) - 128.0) * (QMAX / 32.0))
        return a, b

    @triton.jit
    def _codes(x, a, b, QMAX: tl.constexpr):
        """fp32 codes floor((x − b) / a + 1/2) in 0..QMAX (``reference.quantize_codes``)."""
        safe = tl.where(a > 0, a, 1.0)
        q = tl.floor(tl.math.div_rn(x - b, safe) + 0.5)
        return tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)

    @triton.jit
    def _sq_err(x, a, b, QMAX: tl.constexpr):
        """(codes·a + b − x)² per element, each operation rounded as the reference's."""
        e = _codes(x, a, b, QMAX) * a + b - x
        return e * e

    @triton.jit
    def _key_try(x, mn, mx, r, best0, best1, best_err, QMAX: tl.constexpr, FP16: tl.constexpr):
        """Keys x [T, KDP, KPB], per-channel mn/mx [KDP, KPB]: the params of range (r·mn, r·mx)
        replace the best so far where their error over the group's tokens is lower."""
        p0, p1 = _params(mn * r, mx * r, QMAX, FP16)
        a, b = _affine(p0, p1, QMAX, FP16)
        err = tl.sum(_sq_err(x, a[None], b[None], QMAX), axis=0)            # [KDP, KPB]
        better = err < best_err
        return tl.where(better, p0, best0), tl.where(better, p1, best1), \
            tl.where(better, err, best_err)

    @triton.jit
    def _value_try(x, ing, mn, mx, r, best0, best1, best_err,
                   QMAX: tl.constexpr, FP16: tl.constexpr):
        """Values x [T, DP, PB], the channels of one value group ``ing`` [DP, PB], per-token
        mn/mx [T]: as ``_key_try``, the error summed over the group's channels only."""
        p0, p1 = _params(mn * r, mx * r, QMAX, FP16)
        a, b = _affine(p0, p1, QMAX, FP16)
        e = tl.where(ing[None], _sq_err(x, a[:, None, None], b[:, None, None], QMAX), 0.0)
        err = tl.sum(tl.sum(e, axis=2), axis=1)                             # [T]
        better = err < best_err
        return tl.where(better, p0, best0), tl.where(better, p1, best1), \
            tl.where(better, err, best_err)

    @triton.jit
    def _key_search(x, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                    QMAX: tl.constexpr, FP16: tl.constexpr):
        """``reference.search_params`` over the tokens of a key group x [T, KDP, KPB]."""
        mn = tl.min(x, axis=0)                                               # [KDP, KPB]
        mx = tl.max(x, axis=0)
        p0, p1 = _params(mn, mx, QMAX, FP16)                                # ratio 1.0
        a, b = _affine(p0, p1, QMAX, FP16)
        err = tl.sum(_sq_err(x, a[None], b[None], QMAX), axis=0)
        p0, p1, err = _key_try(x, mn, mx, R1, p0, p1, err, QMAX, FP16)
        p0, p1, err = _key_try(x, mn, mx, R2, p0, p1, err, QMAX, FP16)
        p0, p1, err = _key_try(x, mn, mx, R3, p0, p1, err, QMAX, FP16)
        p0, p1, err = _key_try(x, mn, mx, R4, p0, p1, err, QMAX, FP16)
        return p0, p1

    @triton.jit
    def _value_search(x, ing, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
                      R4: tl.constexpr, QMAX: tl.constexpr, FP16: tl.constexpr):
        """``reference.search_params`` over the channels ``ing`` of each token of x [T, DP, PB]."""
        mn = tl.min(tl.min(tl.where(ing[None], x, float("inf")), axis=2), axis=1)     # [T]
        mx = tl.max(tl.max(tl.where(ing[None], x, float("-inf")), axis=2), axis=1)
        p0, p1 = _params(mn, mx, QMAX, FP16)                                # ratio 1.0
        a, b = _affine(p0, p1, QMAX, FP16)
        e = tl.where(ing[None], _sq_err(x, a[:, None, None], b[:, None, None], QMAX), 0.0)
        err = tl.sum(tl.sum(e, axis=2), axis=1)
        p0, p1, err = _value_try(x, ing, mn, mx, R1, p0, p1, err, QMAX, FP16)
        p0, p1, err = _value_try(x, ing, mn, mx, R2, p0, p1, err, QMAX, FP16)
        p0, p1, err = _value_try(x, ing, mn, mx, R3, p0, p1, err, QMAX, FP16)
        p0, p1, err = _value_try(x, ing, mn, mx, R4, p0, p1, err, QMAX, FP16)
        return p0, p1

    @triton.jit
    def _append_clip_kernel(
            K, V, KC, KP, VC, VP, KR, VR, LEN, s_new, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, SP,
            HKV: tl.constexpr, D: tl.constexpr, BLOCK_DP: tl.constexpr, BITS: tl.constexpr,
            BLOCK_KDP: tl.constexpr, KBITS: tl.constexpr, GROUP: tl.constexpr,
            RING: tl.constexpr, JV: tl.constexpr, FP16: tl.constexpr, R1: tl.constexpr,
            R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr):
        """``triton._append_quantize_kernel`` with the clip search. BITS, BLOCK_DP: the values'
        width and byte columns; KBITS, BLOCK_KDP: the keys' (equal to them in a one-width
        state). R1..R4: ``CLIP_RATIOS[1:]`` (the first is 1.0)."""
        PB: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        KPB: tl.constexpr = 8 // KBITS
        KQMAX: tl.constexpr = (1 << KBITS) - 1
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        L = tl.load(LEN)
        start = base._n_packed(L, GROUP, RING) + tl.program_id(1) * GROUP
        live = start + GROUP <= base._n_packed(L + s_new, GROUP, RING)
        if live:
            t = start + tl.arange(0, GROUP)                                  # [T] positions
            # keys: per channel over the group's tokens
            jk = tl.arange(0, BLOCK_KDP)
            ik = tl.arange(0, KPB)
            dk = jk[:, None] * KPB + ik[None, :]                             # [KDP, KPB] channel
            dkok = dk < D
            x = base._load_group(K, KR, bh, b, h, t, L, dk, dkok, sk_b, sk_h, sk_t, D, RING)
            p0, p1 = _key_search(x, R1, R2, R3, R4, KQMAX, FP16)            # [KDP, KPB]
            a, z = _affine(p0, p1, KQMAX, FP16)
            packed = base._pack(_codes(x, a[None], z[None], KQMAX), ik, KBITS)   # [T, KDP]
            tl.store(KC + (bh * SP + t)[:, None] * (D // KPB) + jk[None, :], packed,
                     mask=(jk < D // KPB)[None, :])
            kp = KP + (bh * (SP // GROUP) + start // GROUP) * 2 * D + dk
            tl.store(kp, p0, mask=dkok)
            tl.store(kp + D, p1, mask=dkok)
            # values: per token over groups of GROUP channels (the last one may be short)
            j = tl.arange(0, BLOCK_DP)
            i = tl.arange(0, PB)
            d = j[:, None] * PB + i[None, :]                                 # [DP, PB] channel
            dok = d < D
            x = base._load_group(V, VR, bh, b, h, t, L, d, dok, sv_b, sv_h, sv_t, D, RING)
            a = tl.full([GROUP, BLOCK_DP, PB], 1.0, tl.float32)
            z = tl.zeros([GROUP, BLOCK_DP, PB], tl.float32)
            for jv in tl.static_range(JV):
                ing = ((d // GROUP) == jv) & dok                            # [DP, PB]
                q0, q1 = _value_search(x, ing, R1, R2, R3, R4, QMAX, FP16)  # [T]
                vp = VP + (bh * SP + t) * 2 * JV + jv
                tl.store(vp, q0)
                tl.store(vp + JV, q1)
                aj, zj = _affine(q0, q1, QMAX, FP16)
                a = tl.where(ing[None], aj[:, None, None], a)
                z = tl.where(ing[None], zj[:, None, None], z)
            packed = base._pack(_codes(x, a, z, QMAX), i, BITS)             # [T, DP]
            tl.store(VC + (bh * SP + t)[:, None] * (D // PB) + j[None, :], packed,
                     mask=(j < D // PB)[None, :])

    @triton.jit
    def _scale_table_kernel(OUT):
        c = tl.arange(0, 256).to(tl.float32)
        tl.store(OUT + tl.arange(0, 256), _scale_of_code(c))


def scale_table(device) -> torch.Tensor:
    """The 256 u8 scales as the kernel computes them (fp32): the tests compare them with the
    reference's table (``reference._SCALE_OF_CODE``) bit for bit."""
    base._require()
    out = torch.empty(256, dtype=torch.float32, device=device)
    _scale_table_kernel[(1,)](out)
    return out


def append_clip(state: reference.QuantizedKV, k: torch.Tensor,
                v: torch.Tensor) -> reference.QuantizedKV:
    """``reference.append`` with ``config.clip`` on the device: the clip-searching
    quantize-on-append kernel, then ``triton._append_ring_kernel``, then length += s. As
    ``triton.append``: the length is read on the device, so the capacity is not checked
    (the caller must), and nothing syncs with the host."""
    base._require()
    c = state.config
    if not supports_append_clip(state, k, v):
        raise ValueError(f"the Triton clip append does not take k {tuple(k.shape)} {k.dtype} "
                         f"for a state of {c}, ring {tuple(state.k_ring.shape)} "
                         f"{state.k_ring.dtype} (needs config.clip, a power-of-two group >= 32 "
                         f"and contiguous state tensors)")
    chunk = base.append_chunk(state, k, v)
    if chunk is None:
        return state
    k, v, kst, vst = chunk
    B, H, s, D = k.shape
    sp, R = state.k_codes.shape[2], c.ring
    kb = base.key_bits(state)
    _, r1, r2, r3, r4 = reference.CLIP_RATIOS
    _append_clip_kernel[(B * H, -(-s // c.group))](
        k, v, state.k_codes, state.k_params, state.v_codes, state.v_params, state.k_ring,
        state.v_ring, state.length, s, *kst, *vst, sp, HKV=H, D=D,
        BLOCK_DP=base._pow2(D) // c.per_byte, BITS=c.bits,
        BLOCK_KDP=base._pow2(D) // (8 // kb), KBITS=kb, GROUP=c.group, RING=R,
        JV=c.value_groups(D), FP16=c.scales == "fp16", R1=r1, R2=r2, R3=r3, R4=r4,
        num_warps=8, enable_fp_fusion=False)
    return base.append_ring(state, k, v, kst, vst)
