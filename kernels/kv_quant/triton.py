"""Triton kernels for the quantized KV state (CUDA; the interpreter runs them with
TRITON_INTERPRET=1). Semantics and layout: reference.py; these must agree with it.

* Quantize-on-append (KIVI, Liu et al. 2024): one program per (batch·kv head, group that
  leaves the ring in this append). It reads the group's tokens from the ring or from the new
  k/v, takes per-channel (keys) / per-token-per-channel-group (values) min and max, writes
  packed codes and (scale, zero), then a second kernel writes the new tokens that stay in full
  precision to their ring slots. ``length`` is read on the device: no host sync.
* Split-KV decode attention (Flash-Decoding, Dao et al. 2023): programs split the packed
  tokens of each kv head into chunks; each loads packed uint8 codes of a tile of tokens,
  unpacks and dequantizes keys and values in registers (no dequantized copy in memory),
  and runs an online softmax for all the G·S query rows of that kv head (GQA: the G query
  heads that share it, S ≤ 16 queries each) with tensor-core dots; one more program per kv
  head covers the full-precision ring; a combine kernel merges the partial results by their
  log-sum-exp.

The keys' per-channel (scale, zero) is constant over a tile (tiles never straddle a key group),
so it is folded into the query: q·(c·a + b) = (q∘a)·c + q·b and the key codes go to the dot
as plain integers. The Triton path takes power-of-two groups >= 32 (16-token tiles of 4/2-bit
codes decoded wrongly in 16-bit dtypes on an H100 with Triton 3.6 — right in fp32 and in the
interpreter; cause not isolated); other groups use the
reference.

Measured on an H100 (Triton 3.6, CUDA graphs, Llama-8B shape 32q/8kv heads, D=128, S=1,
benchmarks/bench_kv_quant_decode.py): 4-bit over 128k at B=1 0.253 ms vs bf16 SDPA 0.220 ms;
B=8 over 32k 0.520 vs 0.424 ms — *slower* than SDPA, far from the issue's 3x target. 8-bit
(no unpacking) runs at nearly the same speed as 2- and 4-bit: the kernel is bound by per-token
work (uint8 -> float conversion, staging the dequantized tiles for the tensor-core dots,
softmax), not by the bytes it reads (~0.56 TB/s of packed state at 4 bits). Getting to 3x
needs the dequantization done in the dot operand registers (e.g. inline-PTX prmt/lop3 on
4 packed bytes at a time, as int4 GEMM kernels do): "asm" below does that.

Two packed-token kernels, ``attention_decode(variant=...)``: "joined" (``_decode_packed_kernel``,
codes unpacked to [N, D] with join/reshape) and "planes" (``_decode_planes_kernel``: the
per_byte bit planes stay apart as [N, D/per_byte] dot operands, value groups are carried by
repeated query rows instead of per-element selects; see its docstring). Measured on an H100
(2026-11-23, torch 2.11, Triton 3.6, bf16, u8 scales, group 64, CUDA graphs;
``python benchmarks/bench_kv_quant_decode.py``, best point of each over its default sweep),
planes / joined / bf16 SDPA in ms: 4-bit 128k B=1 0.188 / 0.183 / 0.220; 2-bit 128k
0.200 / 0.167 / 0.219; 4-bit 32k B=8 0.367 / 0.344 / 0.421; 2-bit 32k B=8 0.386 / 0.319 /
0.422. The tile knobs matter more than the variant: joined's best is 1 warp, block_n 32,
64-128 splits, 2-3 stages (the defaults, 8 warps / 4 stages / block_n 64, give 0.25 ms at
4-bit 128k); planes' best is 1-2 warps, block_n 64. Planes removes the joined kernel's
shared-memory stalls (ncu at 4 warps, 4-bit 128k: short-scoreboard + MIO-throttle stalls
3.9 -> 0.5 cycles an issued instruction) but holds 214 registers a thread there, and at its
best it is no faster: both read the state at ~0.4-0.8 TB/s, 1.1-1.3x SDPA, far from 3x.

Three more operand modes of the planes kernel (``_plane_operand``'s OPERAND, 2026-11-24):
"magic" builds each code straight into a 16-bit float (c OR-ed into the mantissa of bf16
128.0 / fp16 1024.0, minus 128 + 2^(bits-1) in that dtype: exact, no I2F/F2F at all);
"asm" does the same with inline PTX on 4 packed bytes at a time (``_asm_planes``: 2 prmt, then
per plane one shift, one lop3 and one packed bf16x2 sub give two operands); "tf32" keeps fp32
magic operands and tf32 dots (no F2F either; slower, 0.187 ms at 4-bit 128k, and less exact:
tf32 truncates its operands, 4.9e-2). "magic" and "asm" centre the codes (c - 2^(bits-1);
the zero term gets + 2^(bits-1)·a): without it the fold's bf16-rounded (q∘a) and (p∘a) lost
accuracy on the long sums (max rel. error vs the reference 9.9e-3 -> 3.3e-3 at 4-bit 128k,
same speed). The split that holds the full-precision ring is folded into the planes kernel
(program NSPLIT, ``fuse_ring``): one launch less, 0.152 -> 0.142 ms at 4-bit 128k.

"asmt" (``_decode_tposed_kernel``, the default) is "asm" transposed: tokens are the dots' M
side and the query rows (G·S, repeated once per value group) their N side, which Triton lets
be 8 wide, so the 8 rows of Llama-8B (G=4, two value groups of 64 channels) no longer pad a
16-row MMA tile: query planes, accumulators, scores and softmax are half the size. On the
H100 it holds 255 registers with no spills (asm: 255 plus 100-400 bytes of spills).

Measured on an H100 (2026-11-24, torch 2.11, Triton 3.6, bf16, u8 scales, group 64, 32q/8kv
heads, D=128, S=1, CUDA graphs; that run's JSON is benchmarks/results/kv_quant_decode_h100.json
at commit e7149a7; all in one run, each the best point of its sweep over block_n 32/64 x
stages 2/3 x splits heuristic/64/128 at 1 warp; the best point and SDPA then re-timed in 3
alternating rounds, medians), joined / planes / magic / asm / asmt / bf16 SDPA in ms:
4-bit 128k B=1 0.184 / 0.199 / 0.168 / 0.140 / 0.102 / 0.184 (asmt 1.81x SDPA, 1.40 TB/s of
state); 2-bit 128k 0.175 / 0.227 / 0.162 / 0.121 / 0.085 / 0.185 (2.19x); 4-bit 32k B=8
0.352 / 0.384 / 0.294 / 0.284 / 0.201 / 0.355 (1.77x, 1.44 TB/s); 2-bit 32k B=8 0.330 /
0.404 / 0.313 / 0.244 / 0.178 / 0.360 (2.02x). Max rel. error vs the reference (dequantize
+ fp32 attention): asmt 3.2e-3 - 3.8e-3, joined 2.9e-3 - 3.9e-3. Best knobs for asmt: 1 warp,
block_n 64, 3 stages, 128 splits (128k) / 64 (32k B=8): the defaults. An earlier run of the
benchmark gave asmt 2.09x / 2.08x: it timed SDPA with the dequantized reference copy
(another bf16 K + V) still allocated, and SDPA is 4-11% slower then
(benchmarks/experiment_kv_decode_sdpa_ab.py, alternating rounds:
benchmarks/results/debug/kv_quant_decode_sdpa_ab_h100.json, asmt 1.81x / 1.68x with the copy
freed, 1.91x / 1.87x with it alive); the benchmark now frees it and alternates rounds.

What bounded asmt then (4-bit 128k B=1, breakdown5): the packed kernel is 93 µs of the 110 µs
step (combine 3.9 µs, launch gaps ~13 µs); in the kernel the state streams at 1.5 TB/s, half
the H100's ~3. All 255 registers a thread (1 warp) leave an SM 8 one-warp programs, 2 warps a
scheduler, to hide the latency of the per-tile chain (cp.async tile -> shared -> dot-operand
registers -> PTX unpack -> HMMA -> softmax -> HMMA). A 64-token tile is ~2400 SASS
instructions (Triton 3.9 build for sm_90, about the same for asm; unpacking a third, the
q∘a, Σq·z', value-scale and softmax work most of the rest), ~38 µs at full issue rate.
Capping registers (maxnreg 168) spills and is slower; 2 warps a program split the softmax
over warps and are slower; 256 splits make the combine kernel slow (51 µs).

Exact sinks and split tile waits (2026-11-24; H100, torch 2.11, Triton 3.6; 4-bit unless
said, CUDA-graph step / packed-kernel µs from the torch profiler, one run each:
benchmarks/experiment_kv_decode_options.py, results/debug/kv_quant_decode_options1_h100.json
and options2[_2bit]). "asmt" reads an exact copy of the first n tokens (``sink_k``,
``sink_v``): packed tiles that start below n mask those tokens under a scalar branch on the
tile start, the ring skips them, and program NSPLIT adds the copy with the ring's code. That
branch made the kernel *faster* (options1: 128k B=1 93.0 -> 81.8 µs, 32k B=8 211.8 -> 185.5;
the same mask on every tile, no branch: 93.9 / 208.1). Cause, from the TTGIR (Triton 3.9,
sm_90 build here, benchmarks/experiment_kv_decode_sass.py): without it the software pipeliner
puts one async wait for the key *and* value tiles of a step at the top of the loop; the
region op between the key and value parts keeps the two waits apart, so the value tile's
copy overlaps the key half of the step. The branch is now always there (``nsink`` a run-time
0 without sinks; ``_ASMT["wait_split"]`` turns it off for experiments). options2, same run,
old (no branch, combine as before) / new: 4-bit 128k B=1 step 107.8 / 95.4 µs, kernel 92.8 /
79.7; 4-bit 32k B=8 223.6 / 191.2, kernel 211.2 / 179.2; 2-bit 128k 88.0 / 79.3, kernel 75.5
/ 66.7; max rel. error vs the reference unchanged (3.82e-3, 3.36e-3, 3.17e-3). With n = 4
sinks (options2): 97.6 µs at 128k (kernel 81.7, +2.5%) and 198.0 at 32k B=8 (186.4, +4%),
error vs ``reference.with_sinks`` 4.6e-3 / 3.0e-3.

The combine kernel now splits the channels over programs when [splits, channels] exceeds
8192 values (``_COMBINE_TILE``): 4.0 -> 2.4 µs at 128k B=1 (129 splits), 5.3 -> 4.9 at 32k
B=8. Even so, more splits lose (options1, 128k B=1, kernel µs: 128 splits 92.9, 192 117.4,
256 99.2; with maxnreg 168 for 12 one-warp programs an SM: 126.0 / 117.7; 32k B=8 worse too).

Tried and not adopted (options1/2): (1) "raw" operands, ``_ASMT["raw"]`` (off; the switch
stays for experiments, tested under the interpreter and on the H100): the
PTX leaves the magic offset in the codes (magic + c, no packed sub: -256 HADD2 a 64-token
tile; +56 FMUL, +24 FADD, +24 FFMA for the corrections; 2441 -> 2377 SASS in the loop, sm_90
build here) and (magic + centre)·Σ of the *rounded* (q∘a) / (p∘a) is taken off after the
dots. Exact in math, but less exact on the H100 (the dots' fp32 sums of the large offset
terms, presumably; not isolated): max rel. error 3.82e-3
-> 5.89e-3 (4-bit 128k), 3.36e-3 -> 4.38e-3 (4-bit 32k B=8), 3.17e-3 -> 1.06e-2 (2-bit
128k). Faster at 4 bits (kernel 79.7 -> 77.7 µs at 128k, 179.2 -> 174.7 at 32k B=8), slower
at 2 bits (66.7 -> 75.8). (2) One PTX call a bit plane (so that a plane's dot could run
before the next is unpacked): ptxas held as many registers (238 vs 240 here), kernel 92.5 vs 93.0
µs at 128k; removed. (3) The combine launched as a programmatic dependent (griddepcontrol,
the decode kernel triggering after its stores): step 107.2 vs 106.3 µs at 128k, 216.1 vs
216.8 at 32k B=8, no gain; removed. Not tried: folding the combine into the decode kernel
(the last program of a head merging 129 partials x 4 rows x 128 channels, 264 KB, in one
warp: too slow next to a 2.4 µs combine kernel by estimate, not measured).

Now (benchmarks/results/kv_quant_decode_h100.json, 2026-11-24, asmt swept over block_n 32/64
x splits heuristic/64/96/128 at 1 warp, 3 stages — the defaults won — then the best point and
SDPA in 3 alternating rounds, medians): 4-bit 128k B=1 0.0893 ms vs bf16 SDPA 0.1870 (2.09x,
1.60 TB/s of state); 2-bit 128k 0.0752 vs 0.1878 (2.50x); 4-bit 32k B=8 0.183 vs 0.360
(1.97x, 1.58 TB/s); 2-bit 32k B=8 0.166 vs 0.368 (2.23x); max rel. error 3.2e-3 - 3.8e-3.
An earlier run at the defaults only, before the options not kept were taken out of the code
(the same SASS in an sm_90 build here; debug/kv_quant_decode_defaults_run2_h100.json):
2.11x / 2.52x / 1.89x / 2.11x. The issue's 3x is not reached. What is left: the per-tile
instruction count (unpacking ~1/3; the value tile's byte-wise transposed shared loads ~10%,
128 LDS.U8 + PRMTs a tile, Triton's i8 dot-operand path for an operand whose K (tokens) is
not its contiguous axis; the key-group (a, z) computed in two layouts), and 8 warps an SM.

Key width (2026-11-24): a state whose keys are stored wider or narrower than its values
(``key_bits``, KIVI's "K4V2"; reference.py "Key width", read off ``k_codes`` by ``key_bits``)
runs the append (constexprs ``KBITS``, ``BLOCK_KDP``) and "asmt" (``KBITS``, ``KCENTER``,
``KASM``: the query planes, key tiles and the ring's key loads follow the keys' planes, the
accumulators, value tiles and the ring's value loads the values'), for any pair of 2/4/8 bits
(an 8-bit side takes the exact fp32-magic operand instead of the PTX); the other variants
refuse it (``supports_attention(..., variant=...)``, ``_widths_ok``). One width launches
none of these constexprs: the sm_90 TTGIR and PTX built here (Triton 3.9) of the one-width
append (2/4/8-bit) and "asmt" (2/4-bit, bf16/fp16, with and without sinks) are the same as
before the change, debug locations aside. Measured on an H100 (torch 2.11.0+cu130, Triton
3.6.0, bf16, 32q/8kv heads, D=128, S=1, group 64, u8 scales, CUDA graphs; "asmt" over
block_n 32/64 x splits heuristic/64/128 at 1 warp, 3 stages, then the best point and SDPA in
3 alternating rounds, medians; benchmarks/results/kv_quant_decode_key_bits_h100.json), 4-bit /
2-bit / K4V2 in ms: 128k B=1 0.0891 / 0.0746 / 0.0777 vs bf16 SDPA 0.1875 / 0.1866 / 0.1837
(2.10x / 2.50x / 2.36x; K4V2 1.41 TB/s of state); 32k B=8 0.1820 / 0.1568 / 0.1619 vs
0.3622 / 0.3567 / 0.3560 (1.99x / 2.28x / 2.20x): K4V2 decodes 3-4% slower than 2-bit and
13% / 11% faster than 4-bit. Max rel. error vs the reference 4.7e-3 (128k) / 3.3e-3 (32k B=8)
for K4V2 (4-bit 3.8e-3 / 3.5e-3). A one-token append, K4V2: 0.0153 / 0.0105 ms (4-bit 0.0166 /
0.0176). tests/kernels/kv_quant/test_triton_key_bits.py passed on that H100 (28 tests,
compiled kernels with the PTX planes; bf16/fp16/fp32, block_n 32 and 64).

Sliding window (``attention_decode(..., window=W)``, 2026-11-24): a query at held index p
sees held keys p − W + 1 .. p (a Gemma-3 local layer, whose trimmed cache holds up to W − 1 +
group − 1 + ring tokens). "asmt" only (one run-time int, ``wnd``; 2^30 without a window):
the programs split the packed tokens from the tile holding L − S − W + 1 on, computed from the
length on the device (no host sync), the partial tile is masked in the sinks' scalar branch,
the ring and the sink copy are masked per query; the default splits follow min(capacity, W +
S − 1 + block_n) (one split at W = 512). Measured on an H100 (torch 2.11, Triton 3.6, bf16,
4-bit, u8 scales, group 64, 32/8 heads, D 128, B=1, a 128k-token state, CUDA-graph replays of
50 calls, medians of 3): W = 512 0.0209 ms against 0.0826 ms for the whole state (1, 2, 4, 8,
16 splits: 0.0209 / 0.0212 / 0.0212 / 0.0219 / 0.0221); max rel. error vs the reference
3.7e-3. The full-state decode with the window code in: 0.0826 / 0.0825 ms against the kernel
before it 0.0819 / 0.0821 (two rounds each, +0.5–0.9%). A one-off script (not kept); the
compiled test_triton_window.py was not run on CUDA (the run's pytest picked up the source
tree's ``longfx`` folder instead of the installed package and stopped at collection).
"""
from __future__ import annotations

import os

import torch

from longfx.kernels.kv_quant import reference

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no Triton here
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AVAILABLE = triton is not None and (torch.cuda.is_available() or INTERPRET)
LOG2E = 1.4426950408889634
MAX_ROWS = 128        # G·S query rows one program holds
MAX_HEAD_DIM = 256


def _asm_planes_source(bits: int, fp16: bool, raw: bool = False) -> str:
    """PTX for ``_asm_planes``: 4 packed bytes ($in, pack=4) -> per bit plane i, 4 codes as
    two 16-bit-float pairs, centred: (c - 2^(bits-1)). prmt spreads bytes (0, 1) and (2, 3)
    into the low bytes of the two halves of a word; per plane one shift, one lop3
    ((t >> bits·i) & mask | magic: the code in the mantissa of bf16 128 / fp16 1024, whose ulp
    is 1) and one packed sub of (magic + centre) give two exact operands at once. ``raw``: no
    sub, the operands are magic + c (exact; "asmt"'s RAW removes the offset after the dots)."""
    pb, qmax = 8 // bits, (1 << bits) - 1
    magic, off = (0x6400, 0x6400 + (1 << (bits - 1))) if fp16 else (0x4300, 0x4300 + (1 << (bits - 1)))
    sub = "sub.rn.f16x2" if fp16 else "sub.rn.bf16x2"
    src = ["{", ".reg .b32 t<2>, s<2>, u<2>, k;", f"prmt.b32 t0, ${2 * pb}, 0, 0x4140;",
           f"prmt.b32 t1, ${2 * pb}, 0, 0x4342;", f"mov.b32 k, {off * 0x10001:#010x};"]
    for i in range(pb):
        a, b = ("t0", "t1") if i == 0 else ("s0", "s1")
        if i:
            src += [f"shr.b32 s0, t0, {bits * i};", f"shr.b32 s1, t1, {bits * i};"]
        if raw:
            m, mg = f"{qmax * 0x10001:#010x}", f"{magic * 0x10001:#010x}"
            src += [f"lop3.b32 ${2 * i}, {a}, {m}, {mg}, 0xEA;",
                    f"lop3.b32 ${2 * i + 1}, {b}, {m}, {mg}, 0xEA;"]
        else:
            src += [f"lop3.b32 u0, {a}, {qmax * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xEA;",
                    f"lop3.b32 u1, {b}, {qmax * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xEA;",
                    f"{sub} ${2 * i}, u0, k;", f"{sub} ${2 * i + 1}, u1, k;"]
    return "\n".join(src + ["}"])


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _group_ok(group: int) -> bool:
    # 16-token tiles of 4/2-bit codes gave wrong bf16/fp16 decodes on an H100 (Triton 3.6)
    return group >= 32 and group & (group - 1) == 0


def key_bits(state: reference.QuantizedKV) -> int:
    """The keys' code width, read off the tensors as the reference reads it
    (``reference.key_bits_of``): the ops' schemas carry one ``bits``, the values'."""
    return reference.key_bits_of(state.k_codes, state.head_dim)


def _state_ok(state: reference.QuantizedKV) -> bool:
    # any key width (``key_bits``: the append and "asmt" take keys wider or narrower than
    # the values, see _widths_ok for the decode variants)
    return (all(t.is_contiguous() for t in state.tensors())
            and _group_ok(state.config.group) and state.head_dim <= MAX_HEAD_DIM
            and len({t.device for t in state.tensors()}) == 1)


def supports_append(state: reference.QuantizedKV, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (AVAILABLE and _state_ok(state) and k.shape == v.shape and k.dim() == 4
            and k.dtype == v.dtype == state.k_ring.dtype and k.device == state.k_ring.device)


def supports_attention(q: torch.Tensor, state: reference.QuantizedKV, sinks: bool = False,
                       variant: str | None = None, window: int = 0) -> bool:
    """Whether ``attention_decode(q, state, variant=variant)`` takes q over this state
    (variant None: DEFAULT_VARIANT). ``sinks``: with an exact sink copy, and ``window`` > 0:
    a sliding window, which only "asmt" reads (2- and 4-bit codes, and two-width states;
    shapes that ``planes_ok``; one width of 8 bits and the other variants take neither). A
    state whose keys are wider or narrower than its values (``key_bits``) is taken by "asmt"
    only, over ``planes_ok`` shapes (``_widths_ok``); the other variants refuse it."""
    variant = DEFAULT_VARIANT if variant is None else variant
    ok = _query_ok(q, state) and _widths_ok(q, state, variant)
    if ok and (sinks or window):
        return _runs_asmt(q, state, variant)
    return ok


def _query_ok(q: torch.Tensor, state: reference.QuantizedKV) -> bool:
    # what every variant needs: the state's tensors, q's dtype and device, G·S <= MAX_ROWS
    if not (AVAILABLE and _state_ok(state) and q.dim() == 4 and q.dtype == state.k_ring.dtype):
        return False
    hkv = state.k_ring.shape[1]
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[1] % hkv == 0 and q.shape[1] // hkv * q.shape[2] <= MAX_ROWS
            and q.device == state.k_ring.device)


def _widths_ok(q: torch.Tensor, state: reference.QuantizedKV, variant: str) -> bool:
    # one width: every variant; keys of another width than the values: "asmt" only, over
    # planes_ok shapes (attention_decode runs "joined" otherwise, which assumes one width)
    return key_bits(state) == state.config.bits or (variant == "asmt" and planes_ok(q, state))


def _runs_asmt(q: torch.Tensor, state: reference.QuantizedKV, variant: str) -> bool:
    # whether attention_decode runs "asmt", the one kernel with sinks and windows: "asmt"
    # over planes_ok shapes, with codes < 8 bits or two widths (one width of 8 bits runs
    # "asm", which takes neither)
    one_8bit = state.config.bits == 8 and key_bits(state) == 8
    return variant == "asmt" and not one_8bit and planes_ok(q, state)


if triton is not None:

    _ASM = {(bits, fp16): tl.constexpr(_asm_planes_source(bits, fp16))
            for bits in (2, 4) for fp16 in (False, True)}
    _ASM_4_BF16 = _ASM[4, False]
    _ASM_4_FP16 = _ASM[4, True]
    _ASM_2_BF16 = _ASM[2, False]
    _ASM_2_FP16 = _ASM[2, True]

    @triton.jit
    def _asm_planes(x, BITS: tl.constexpr, MAGIC_FP16: tl.constexpr):
        """Packed bytes x (uint8, any shape) -> the PB bit planes, centred codes c - 2^(BITS-1)
        as bf16 (fp16 when MAGIC_FP16), 4 bytes an inline-PTX call (``_asm_planes_source``).
        CUDA only; the interpreter runs OPERAND 1, the same values in pure Triton."""
        if BITS == 4:
            if MAGIC_FP16:
                out = tl.inline_asm_elementwise(_ASM_4_FP16, "=r,=r,=r,=r,r", [x],
                                                dtype=(tl.float16, tl.float16), is_pure=True,
                                                pack=4)
            else:
                out = tl.inline_asm_elementwise(_ASM_4_BF16, "=r,=r,=r,=r,r", [x],
                                                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                                pack=4)
        else:
            if MAGIC_FP16:
                out = tl.inline_asm_elementwise(_ASM_2_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                dtype=(tl.float16, tl.float16, tl.float16,
                                                       tl.float16), is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise(_ASM_2_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                                       tl.bfloat16), is_pure=True, pack=4)
        return out

    @triton.jit
    def _n_packed(length, GROUP: tl.constexpr, RING: tl.constexpr):
        # GROUP · max(0, ceil((length − RING) / GROUP)); clamp first: // truncates toward 0
        return tl.maximum(length - RING + GROUP - 1, 0) // GROUP * GROUP

    @triton.jit
    def _affine(p0, p1, QMAX: tl.constexpr, FP16: tl.constexpr):
        """Stored (scale, zero) -> fp32 (a, b) with x ≈ code · a + b (reference.affine)."""
        if FP16:
            a = p0.to(tl.float32)
            b = p1.to(tl.float32)
        else:
            a = tl.exp2((p0.to(tl.float32) - 160.0) * 0.125)
            b = a * ((p1.to(tl.float32) - 128.0) * (QMAX / 32.0))
        return a, b

    @triton.jit
    def _group_params(mn, mx, QMAX: tl.constexpr, FP16: tl.constexpr):
        """Group min/max (fp32) -> stored (scale, zero) (reference.group_params)."""
        if FP16:
            p0 = ((mx - mn) / QMAX).to(tl.float16)
            p1 = mn.to(tl.float16)
        else:
            s = tl.maximum((mx - mn) / (QMAX - QMAX / 32.0), tl.abs(mn) / (127.0 * QMAX / 32.0))
            s = tl.maximum(s, 9.5367431640625e-07)                          # 2^-20
            c = tl.ceil(tl.log2(s) * 8.0) + 160.0
            c = tl.where(tl.exp2((c - 160.0) * 0.125) < s, c + 1.0, c)      # never round down
            c = tl.minimum(tl.maximum(c, 0.0), 255.0)
            zc = tl.floor(mn / (tl.exp2((c - 160.0) * 0.125) * (QMAX / 32.0)))
            zc = tl.minimum(tl.maximum(zc, -128.0), 127.0)
            p0 = c.to(tl.uint8)
            p1 = (zc + 128.0).to(tl.uint8)
        return p0, p1

    @triton.jit
    def _codes(x, a, b, QMAX: tl.constexpr):
        safe = tl.where(a > 0, a, 1.0)
        q = tl.floor((x - b) / safe + 0.5)
        return tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)

    @triton.jit
    def _pack(codes, i, BITS: tl.constexpr):
        # codes [T, DP, PB] (fp32 integral), i = arange(PB) -> uint8 [T, DP]
        return tl.sum(codes.to(tl.int32) << (i * BITS)[None, None, :], axis=2).to(tl.uint8)

    @triton.jit
    def _unpack(x, BITS: tl.constexpr, N: tl.constexpr, W: tl.constexpr):
        # uint8 [N, W / per_byte] -> codes [N, W]: channel per_byte·j + i sits at bits BITS·i
        if BITS == 8:
            out = x
        elif BITS == 4:
            out = tl.reshape(tl.join(x & 15, x >> 4), [N, W])
        else:
            c0 = x & 3
            c1 = (x >> 2) & 3
            c2 = (x >> 4) & 3
            c3 = x >> 6
            out = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [N, W])  # [N, W/4, 2, 2]
        return out

    @triton.jit
    def _load_group(NEW, RINGT, bh, b, h, t, L, d, dok, sn_b, sn_h, sn_t,
                    D: tl.constexpr, RING: tl.constexpr):
        """fp32 [T, DP, PB]: tokens t from the ring (t < L) or from the new k/v (t >= L)."""
        old = (t < L)[:, None, None]
        ok = dok[None]
        ring = tl.load(RINGT + (bh * RING + t % RING)[:, None, None] * D + d[None],
                       mask=ok & old, other=0.0)
        new = tl.load(NEW + b * sn_b + h * sn_h + (t - L)[:, None, None] * sn_t + d[None],
                      mask=ok & ~old, other=0.0)
        return tl.where(old, ring, new).to(tl.float32)

    @triton.jit
    def _append_quantize_kernel(
            K, V, KC, KP, VC, VP, KR, VR, LEN, s_new, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, SP,
            HKV: tl.constexpr, D: tl.constexpr, BLOCK_DP: tl.constexpr, BITS: tl.constexpr,
            GROUP: tl.constexpr, RING: tl.constexpr, JV: tl.constexpr, FP16: tl.constexpr,
            KBITS: tl.constexpr = 0, BLOCK_KDP: tl.constexpr = 0):
        """BITS: the values' code width; KBITS, BLOCK_KDP: the keys' width and byte columns
        (reference "Key width"; 0: the keys use BITS and BLOCK_DP, the same code as before
        keys could be wider)."""
        PB: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        KB: tl.constexpr = BITS if KBITS == 0 else KBITS                    # the keys' width
        KPB: tl.constexpr = 8 // KB
        KQMAX: tl.constexpr = (1 << KB) - 1
        KDP: tl.constexpr = BLOCK_DP if BLOCK_KDP == 0 else BLOCK_KDP
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        L = tl.load(LEN)
        start = _n_packed(L, GROUP, RING) + tl.program_id(1) * GROUP
        live = start + GROUP <= _n_packed(L + s_new, GROUP, RING)
        if live:
            t = start + tl.arange(0, GROUP)                                  # [T] positions
            j = tl.arange(0, BLOCK_DP)
            i = tl.arange(0, PB)
            d = j[:, None] * PB + i[None, :]                                 # [DP, PB] channel
            dok = d < D
            jok = j < D // PB
            jk = tl.arange(0, KDP)                                           # the keys' bytes
            ik = tl.arange(0, KPB)
            dk = jk[:, None] * KPB + ik[None, :]                             # [KDP, KPB] channel
            dkok = dk < D
            jkok = jk < D // KPB
            # keys: per channel over the group's tokens
            x = _load_group(K, KR, bh, b, h, t, L, dk, dkok, sk_b, sk_h, sk_t, D, RING)
            p0, p1 = _group_params(tl.min(x, axis=0), tl.max(x, axis=0), KQMAX, FP16)  # [KDP, KPB]
            a, z = _affine(p0, p1, KQMAX, FP16)
            packed = _pack(_codes(x, a[None], z[None], KQMAX), ik, KB)      # [T, KDP]
            tl.store(KC + (bh * SP + t)[:, None] * (D // KPB) + jk[None, :], packed,
                     mask=jkok[None, :])
            kp = KP + (bh * (SP // GROUP) + start // GROUP) * 2 * D + dk
            tl.store(kp, p0, mask=dkok)
            tl.store(kp + D, p1, mask=dkok)
            # values: per token over groups of GROUP channels (the last one may be short)
            x = _load_group(V, VR, bh, b, h, t, L, d, dok, sv_b, sv_h, sv_t, D, RING)
            a = tl.full([GROUP, BLOCK_DP, PB], 1.0, tl.float32)
            z = tl.zeros([GROUP, BLOCK_DP, PB], tl.float32)
            for jv in tl.static_range(JV):
                ing = ((d // GROUP) == jv) & dok                            # [DP, PB]
                mn = tl.min(tl.min(tl.where(ing[None], x, float("inf")), axis=2), axis=1)
                mx = tl.max(tl.max(tl.where(ing[None], x, float("-inf")), axis=2), axis=1)
                q0, q1 = _group_params(mn, mx, QMAX, FP16)                  # [T]
                vp = VP + (bh * SP + t) * 2 * JV + jv
                tl.store(vp, q0)
                tl.store(vp + JV, q1)
                aj, zj = _affine(q0, q1, QMAX, FP16)
                a = tl.where(ing[None], aj[:, None, None], a)
                z = tl.where(ing[None], zj[:, None, None], z)
            packed = _pack(_codes(x, a, z, QMAX), i, BITS)
            tl.store(VC + (bh * SP + t)[:, None] * (D // PB) + j[None, :], packed,
                     mask=jok[None, :])

    @triton.jit
    def _append_ring_kernel(K, V, KR, VR, LEN, s_new, t0, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                            HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr, GROUP: tl.constexpr, RING: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        L = tl.load(LEN)
        t = t0 + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)        # index in the new
        p = L + t
        ok = (t < s_new) & (p >= _n_packed(L + s_new, GROUP, RING))
        dd = tl.arange(0, BLOCK_D)
        m = ok[:, None] & (dd < D)[None, :]
        dst = (bh * RING + p % RING)[:, None] * D + dd[None, :]
        x = tl.load(K + b * sk_b + h * sk_h + t[:, None] * sk_t + dd[None, :], mask=m)
        tl.store(KR + dst, x, mask=m)
        x = tl.load(V + b * sv_b + h * sv_h + t[:, None] * sv_t + dd[None, :], mask=m)
        tl.store(VR + dst, x, mask=m)

    @triton.jit
    def _load_q(Q, b, h, sq_b, sq_h, sq_s, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        m = tl.arange(0, BLOCK_M)                 # row m = query head h·G + m // S, query m % S
        dd = tl.arange(0, BLOCK_D)
        ptr = Q + b * sq_b + (h * G + m // S)[:, None] * sq_h + (m % S)[:, None] * sq_s
        return tl.load(ptr + dd[None, :], mask=(m < G * S)[:, None] & (dd < D)[None, :],
                       other=0.0)

    @triton.jit
    def _online_softmax(scores, m_i, l_i):
        """-> new running max, new running sum, the rescale factor of old sums, exp2 scores."""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), alpha, p

    @triton.jit
    def _store_partial(ACC, LSE, bh, split, NS, m_i, l_i, acc, M: tl.constexpr,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        m = tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        base = (bh * NS + split) * M
        full = l_i > 0
        out = acc / tl.where(full, l_i, 1.0)[:, None]
        tl.store(ACC + (base + m)[:, None] * D + dd[None, :], out,
                 mask=(m < M)[:, None] & (dd < D)[None, :])
        tl.store(LSE + base + m, tl.where(full, m_i + tl.log2(tl.where(full, l_i, 1.0)),
                                          float("-inf")), mask=m < M)

    @triton.jit
    def _decode_packed_kernel(
            Q, KC, KP, VC, VP, LEN, ACC, LSE, qk_scale, sq_b, sq_h, sq_s, SP, NSPLIT,
            HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BITS: tl.constexpr, GROUP: tl.constexpr, RING: tl.constexpr, JV: tl.constexpr,
            FP16: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        PB: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        bh = tl.program_id(0)
        split = tl.program_id(1)
        q = _load_q(Q, bh // HKV, bh % HKV, sq_b, sq_h, sq_s, G, S, D, BLOCK_M, BLOCK_D)
        if DOT_F32:
            q = q.to(tl.float32)
        dt = q.dtype
        qf = q.to(tl.float32)
        L = tl.load(LEN).to(tl.int32)
        n = _n_packed(L, GROUP, RING)
        chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N                # BLOCK_N | GROUP
        start = split * chunk
        end = tl.minimum(start + chunk, n)
        qpos = L - S + tl.arange(0, BLOCK_M) % S                             # [M] positions
        dd = tl.arange(0, BLOCK_D)
        dok = dd < D
        jb = tl.arange(0, BLOCK_D // PB)
        jok = (jb < D // PB)[None, :]
        vgrp = (dd // GROUP)[None, :]
        # per-program bases in 64 bits, offsets inside a head's rows in 32 bits
        bh64 = bh.to(tl.int64)
        kc = KC + bh64 * SP * (D // PB)
        vc = VC + bh64 * SP * (D // PB)
        kpar = KP + bh64 * (SP // GROUP) * 2 * D
        vpar = VP + bh64 * SP * 2 * JV
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            # keys: one (a, b) per channel for the whole tile (it lies in one group), folded
            # into the query: q·(c·a + b) = (q∘a)·c + q·b — the codes go to the dot as they are
            codes = _unpack(tl.load(kc + t[:, None] * (D // PB) + jb[None, :], mask=jok, other=0),
                            BITS, BLOCK_N, BLOCK_D)
            kp = kpar + (n0 // GROUP) * 2 * D + dd
            a, z = _affine(tl.load(kp, mask=dok, other=0), tl.load(kp + D, mask=dok, other=0),
                           QMAX, FP16)
            qa = (qf * a[None, :]).to(dt)
            scores = tl.dot(qa, tl.trans(codes.to(dt)), input_precision=PREC)
            scores = (scores + tl.sum(qf * z[None, :], 1)[:, None]) * qk_scale
            if S > 1:
                scores = tl.where(t[None, :] <= qpos[:, None], scores, float("-inf"))
            m_i, l_i, alpha, p = _online_softmax(scores, m_i, l_i)
            # values: (a, b) per token and channel group
            codes = _unpack(tl.load(vc + t[:, None] * (D // PB) + jb[None, :], mask=jok, other=0),
                            BITS, BLOCK_N, BLOCK_D)
            vp = vpar + t * (2 * JV)
            if JV == 1:   # fold a into the probabilities: Σ p·(c·a + b) = (p∘a)·c + Σ p·b
                a, z = _affine(tl.load(vp), tl.load(vp + 1), QMAX, FP16)        # [N]
                acc = acc * alpha[:, None] + tl.sum(p * z[None, :], 1)[:, None]
                acc += tl.dot((p * a[None, :]).to(dt), codes.to(dt), input_precision=PREC)
            else:
                a = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                z = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                for jv in tl.static_range(JV):
                    aj, zj = _affine(tl.load(vp + jv), tl.load(vp + JV + jv), QMAX, FP16)
                    a = tl.where(vgrp == jv, aj[:, None], a)
                    z = tl.where(vgrp == jv, zj[:, None], z)
                v = (codes.to(tl.float32) * a + z).to(dt)                       # [N, D]
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC)
        _store_partial(ACC, LSE, bh, split, NSPLIT + 1, m_i, l_i, acc, G * S, D, BLOCK_M, BLOCK_D)

    @triton.jit
    def _plane(x, i: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr):
        """Codes of bit plane i of packed bytes x (any shape): the channels per_byte·j + i."""
        if BITS == 8:
            out = x
        else:
            out = (x >> (BITS * i)) & QMAX
        return out

    @triton.jit
    def _load_q_plane(Q, b, h, sq_b, sq_h, sq_s, i: tl.constexpr, G: tl.constexpr,
                      S: tl.constexpr, D: tl.constexpr, PB: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_M: tl.constexpr, DP: tl.constexpr):
        # row r holds query row r % (G·S) (query head h·G + m // S, query m % S), for
        # r < ROWS; plane i's column j is channel PB·j + i
        r = tl.arange(0, BLOCK_M)
        m = r % (G * S)
        j = tl.arange(0, DP)
        ptr = Q + b * sq_b + (h * G + m // S)[:, None] * sq_h + (m % S)[:, None] * sq_s
        return tl.load(ptr + (PB * j + i)[None, :],
                       mask=(r < ROWS)[:, None] & (j < D // PB)[None, :], other=0.0)

    @triton.jit
    def _plane_operand(x, i: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                       dt: tl.constexpr, OPERAND: tl.constexpr, MAGIC_FP16: tl.constexpr,
                       CENTER: tl.constexpr):
        """Plane i of packed bytes x as a dot operand of dtype dt, without an int -> float
        conversion instruction (I2F, quarter rate on Hopper).

        OPERAND 0 ("planes") and 2 ("tf32"): the code is OR-ed into the mantissa of 2^23 and
        2^23 subtracted in fp32 (exact; the "magic number" trick of int4 GEMM kernels, e.g.
        FasterTransformer's fast int -> half), then converted to dt (an F2F when dt is 16-bit;
        none for "tf32", whose dots take fp32 operands). OPERAND 1 ("magic", codes of < 8
        bits): the code is OR-ed into the mantissa of a 16-bit float directly — bf16 128.0
        (0x4300) or fp16 1024.0 (0x6400), whose ulp is 1 — and the offset subtracted in that
        dtype (exact: 128 + c - 128 = c), so no conversion instruction at all (ptxas packs the
        subtractions two to a HADD2). Leaving the offset in the operand and subtracting it
        after the dot saved 4% on an H100 but cost accuracy (the offset cancels in fp32 over
        long sums), so it is not done. Mode 1 subtracts CENTER more (2^(bits-1), exact too):
        the operand is c - CENTER, centred on 0, and the caller adds CENTER·a to the zero
        term; the dot's sums are then smaller, and so is the error of its bf16-rounded
        (q∘a) and (p∘a). Under the interpreter (dt = fp32) mode 1 builds the same 16-bit bits
        and subtracts in fp32: the same exact codes."""
        if OPERAND == 3 and BITS < 8:     # x: the planes from _asm_planes
            out = x[i].to(dt)
        elif OPERAND == 1 and BITS < 8:
            c = _plane(x, i, BITS, QMAX)
            if MAGIC_FP16:
                m = (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)      # 1024 + c
                off: tl.constexpr = 1024.0 + CENTER
            else:
                m = (c.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)     # 128 + c
                off: tl.constexpr = 128.0 + CENTER
            if dt == tl.float32:
                out = m.to(tl.float32) - off
            else:
                out = (m - off).to(dt)
        else:
            c = _plane(x, i, BITS, QMAX)
            out = ((c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
                   - 8388608.0).to(dt)
        return out

    @triton.jit
    def _key_plane_scores(acc, qf, xt, kp, i: tl.constexpr, dt: tl.constexpr, BITS: tl.constexpr,
                          QMAX: tl.constexpr, D: tl.constexpr, PB: tl.constexpr,
                          DP: tl.constexpr, FP16: tl.constexpr, PREC: tl.constexpr,
                          OPERAND: tl.constexpr, MAGIC_FP16: tl.constexpr, CENTER: tl.constexpr):
        """acc + (q∘a)·c over plane i's channels, and Σ q·z over them: qf fp32 [M, DP], xt
        the tile's packed key bytes transposed [DP, N], kp the tile's key-group params."""
        j = tl.arange(0, DP)
        ok = j < D // PB
        ch = PB * j + i
        a, z = _affine(tl.load(kp + ch, mask=ok, other=0), tl.load(kp + D + ch, mask=ok, other=0),
                       QMAX, FP16)                                           # [DP]
        qa = (qf * a[None, :]).to(dt)
        s = tl.dot(qa, _plane_operand(xt, i, BITS, QMAX, dt, OPERAND, MAGIC_FP16, CENTER),
                   acc, input_precision=PREC)                                # [M, N]
        return s, tl.sum(qf * (z + CENTER * a)[None, :], 1)

    @triton.jit
    def _value_plane(acc, alpha, pa, xv, i: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                     dt: tl.constexpr, PREC: tl.constexpr, OPERAND: tl.constexpr,
                     MAGIC_FP16: tl.constexpr, CENTER: tl.constexpr):
        # acc [M, DP] of plane i: rescale, add (p∘a) · (codes - CENTER) [N, DP]
        return tl.dot(pa, _plane_operand(xv, i, BITS, QMAX, dt, OPERAND, MAGIC_FP16, CENTER),
                      acc * alpha[:, None], input_precision=PREC)

    @triton.jit
    def _ring_plane_scores(qf, kr, slot, tok, i: tl.constexpr, dt: tl.constexpr, D: tl.constexpr,
                           PB: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
        """q_i · k_iᵀ over plane i's channels of full-precision ring keys (slots ``slot``)."""
        j = tl.arange(0, DP)
        ok = (j < D // PB)[:, None] & tok[None, :]
        k = tl.load(kr + slot[None, :] * D + (PB * j + i)[:, None], mask=ok, other=0.0)
        return tl.dot(qf.to(dt), k.to(dt), input_precision=PREC)                  # [M, N]

    @triton.jit
    def _ring_value_plane(acc, alpha, p, vr, slot, tok, i: tl.constexpr, dt: tl.constexpr,
                          D: tl.constexpr, PB: tl.constexpr, DP: tl.constexpr,
                          PREC: tl.constexpr):
        j = tl.arange(0, DP)
        ok = tok[:, None] & (j < D // PB)[None, :]
        v = tl.load(vr + slot[:, None] * D + (PB * j + i)[None, :], mask=ok, other=0.0)
        return acc * alpha[:, None] + tl.dot(p, v.to(dt), input_precision=PREC)

    @triton.jit
    def _store_plane(ACC, base, acc, i: tl.constexpr, M: tl.constexpr, ROWS: tl.constexpr,
                     D: tl.constexpr, PB: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, DP: tl.constexpr):
        # row r carries value group r // M (see _decode_planes_kernel): it owns the columns
        # of that group, channel PB·j + i lies in group (PB·j) // GROUP = j // (GROUP / PB)
        r = tl.arange(0, BLOCK_M)
        j = tl.arange(0, DP)
        own = (j // (GROUP // PB))[None, :] == (r // M)[:, None]
        ok = own & (r < ROWS)[:, None] & (j < D // PB)[None, :]
        tl.store(ACC + (base + r % M)[:, None] * D + (PB * j + i)[None, :], acc, mask=ok)

    @triton.jit
    def _decode_planes_kernel(
            Q, KC, KP, VC, VP, LEN, ACC, LSE, qk_scale, sq_b, sq_h, sq_s, SP, NSPLIT, KR, VR,
            HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BITS: tl.constexpr, GROUP: tl.constexpr, RING: tl.constexpr, JV: tl.constexpr,
            FP16: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
            OPERAND: tl.constexpr = 0, CENTER: tl.constexpr = 0, FUSE_RING: tl.constexpr = False,
            RING_N: tl.constexpr = 16):
        """``_decode_packed_kernel`` without unpacking to [N, D]: the PB = 8 / BITS bit planes
        of the packed bytes stay apart (plane i of byte column j is channel PB·j + i, so a
        plane is a plain [N, D / PB] operand: shift and mask, no join/reshape, no layout
        shuffle). Keys: scores = Σ_i (q_i∘a_i)·c_iᵀ + Σ_i q_i·z_i, q_i the query's plane-i
        channels. Values: one accumulator per plane. The value groups (JV per token) are
        carried by the rows, not by per-element selects: the G·S query rows are repeated JV
        times (rows fill the 16-row MMA tile anyway), row block g scales the probabilities by
        group g's per-token scale, (p∘a_g)·c_i + Σ p·z_g, and at the end owns only the
        columns of group g — the same fold as KIVI's group-wise dequant-GEMV, done as one dot.
        """
        PB: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        M: tl.constexpr = G * S
        ROWS: tl.constexpr = JV * M
        DP: tl.constexpr = BLOCK_D // PB
        EVEN: tl.constexpr = D // PB == DP
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        q0 = _load_q_plane(Q, b, h, sq_b, sq_h, sq_s, 0, G, S, D, PB, ROWS, BLOCK_M, DP)
        MAGIC_FP16: tl.constexpr = q0.dtype == tl.float16
        dt = q0.dtype
        if DOT_F32 or OPERAND == 2:
            dt = tl.float32
        q0 = q0.to(tl.float32)
        q1 = q0
        q2 = q0
        q3 = q0
        if PB >= 2:
            q1 = _load_q_plane(Q, b, h, sq_b, sq_h, sq_s, 1, G, S, D, PB, ROWS, BLOCK_M, DP)
            q1 = q1.to(tl.float32)
        if PB == 4:
            q2 = _load_q_plane(Q, b, h, sq_b, sq_h, sq_s, 2, G, S, D, PB, ROWS, BLOCK_M, DP)
            q3 = _load_q_plane(Q, b, h, sq_b, sq_h, sq_s, 3, G, S, D, PB, ROWS, BLOCK_M, DP)
            q2 = q2.to(tl.float32)
            q3 = q3.to(tl.float32)
        L = tl.load(LEN).to(tl.int32)
        n = _n_packed(L, GROUP, RING)
        chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N                # BLOCK_N | GROUP
        start = split * chunk
        end = tl.minimum(start + chunk, n)
        r = tl.arange(0, BLOCK_M)
        qpos = L - S + (r % M) % S                                           # [M] positions
        rg = (r // M)[:, None]                                               # row's value group
        j = tl.arange(0, DP)
        jok = j < D // PB
        nn = tl.arange(0, BLOCK_N)
        bh64 = bh.to(tl.int64)
        kc = KC + bh64 * SP * (D // PB)
        vc = VC + bh64 * SP * (D // PB)
        kpar = KP + bh64 * (SP // GROUP) * 2 * D
        vpar = VP + bh64 * SP * 2 * JV
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_z = tl.zeros([BLOCK_M], tl.float32)                              # Σ p·z (all planes)
        acc0 = tl.zeros([BLOCK_M, DP], tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for n0 in range(start, end, BLOCK_N):
            t = n0 + nn
            # keys: packed bytes transposed [DP, N]; the tile lies in one key group
            kptr = kc + t[None, :] * (D // PB) + j[:, None]
            if EVEN:
                xk = tl.load(kptr)
            else:
                xk = tl.load(kptr, mask=jok[:, None], other=0)
            if OPERAND == 3 and BITS < 8:
                xk = _asm_planes(xk, BITS, MAGIC_FP16)
            kp = kpar + (n0 // GROUP) * 2 * D
            scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            scores, qz = _key_plane_scores(scores, q0, xk, kp, 0, dt, BITS, QMAX, D, PB, DP, FP16, PREC,
                                         OPERAND, MAGIC_FP16, CENTER)
            if PB >= 2:
                scores, z1 = _key_plane_scores(scores, q1, xk, kp, 1, dt, BITS, QMAX, D, PB, DP, FP16, PREC,
                                         OPERAND, MAGIC_FP16, CENTER)
                qz += z1
            if PB == 4:
                scores, z2 = _key_plane_scores(scores, q2, xk, kp, 2, dt, BITS, QMAX, D, PB, DP, FP16, PREC,
                                         OPERAND, MAGIC_FP16, CENTER)
                scores, z3 = _key_plane_scores(scores, q3, xk, kp, 3, dt, BITS, QMAX, D, PB, DP, FP16, PREC,
                                         OPERAND, MAGIC_FP16, CENTER)
                qz += z2 + z3
            scores = (scores + qz[:, None]) * qk_scale
            if S > 1:
                scores = tl.where(t[None, :] <= qpos[:, None], scores, float("-inf"))
            m_i, l_i, alpha, p = _online_softmax(scores, m_i, l_i)
            # values: per-token (a, z) of the row's group, folded into the probabilities
            vp = vpar + t * (2 * JV)
            if JV == 1:
                a, z = _affine(tl.load(vp), tl.load(vp + 1), QMAX, FP16)         # [N]
                pa = p * a[None, :]
                pz = p * (z + CENTER * a)[None, :]
            else:
                a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                z = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for jv in tl.static_range(JV):
                    aj, zj = _affine(tl.load(vp + jv), tl.load(vp + JV + jv), QMAX, FP16)
                    a = tl.where(rg == jv, aj[None, :], a)
                    z = tl.where(rg == jv, (zj + CENTER * aj)[None, :], z)
                pa = p * a
                pz = p * z
            pa = pa.to(dt)
            acc_z = acc_z * alpha + tl.sum(pz, 1)
            vptr = vc + t[:, None] * (D // PB) + j[None, :]
            if EVEN:
                xv = tl.load(vptr)
            else:
                xv = tl.load(vptr, mask=jok[None, :], other=0)
            if OPERAND == 3 and BITS < 8:
                xv = _asm_planes(xv, BITS, MAGIC_FP16)
            acc0 = _value_plane(acc0, alpha, pa, xv, 0, BITS, QMAX, dt, PREC, OPERAND,
                                    MAGIC_FP16, CENTER)
            if PB >= 2:
                acc1 = _value_plane(acc1, alpha, pa, xv, 1, BITS, QMAX, dt, PREC, OPERAND,
                                    MAGIC_FP16, CENTER)
            if PB == 4:
                acc2 = _value_plane(acc2, alpha, pa, xv, 2, BITS, QMAX, dt, PREC, OPERAND,
                                    MAGIC_FP16, CENTER)
                acc3 = _value_plane(acc3, alpha, pa, xv, 3, BITS, QMAX, dt, PREC, OPERAND,
                                    MAGIC_FP16, CENTER)
        if FUSE_RING:   # program NSPLIT: the full-precision ring, tokens [n, L), same planes
            kr = KR + bh64 * RING * D
            vr = VR + bh64 * RING * D
            nr = tl.arange(0, RING_N)
            for n0 in range(tl.where(split == NSPLIT, n, L), L, RING_N):
                t = n0 + nr
                tok = t < L
                slot = t % RING
                scores = _ring_plane_scores(q0, kr, slot, tok, 0, dt, D, PB, DP, PREC)
                if PB >= 2:
                    scores += _ring_plane_scores(q1, kr, slot, tok, 1, dt, D, PB, DP, PREC)
                if PB == 4:
                    scores += _ring_plane_scores(q2, kr, slot, tok, 2, dt, D, PB, DP, PREC)
                    scores += _ring_plane_scores(q3, kr, slot, tok, 3, dt, D, PB, DP, PREC)
                scores = tl.where(tok[None, :] & (t[None, :] <= qpos[:, None]),
                                  scores * qk_scale, float("-inf"))
                m_i, l_i, alpha, p = _online_softmax(scores, m_i, l_i)
                acc_z = acc_z * alpha
                p = p.to(dt)
                acc0 = _ring_value_plane(acc0, alpha, p, vr, slot, tok, 0, dt, D, PB, DP, PREC)
                if PB >= 2:
                    acc1 = _ring_value_plane(acc1, alpha, p, vr, slot, tok, 1, dt, D, PB, DP,
                                             PREC)
                if PB == 4:
                    acc2 = _ring_value_plane(acc2, alpha, p, vr, slot, tok, 2, dt, D, PB, DP,
                                             PREC)
                    acc3 = _ring_value_plane(acc3, alpha, p, vr, slot, tok, 3, dt, D, PB, DP,
                                             PREC)
        base = (bh * (NSPLIT + 1) + split) * M
        full = l_i > 0
        inv = 1.0 / tl.where(full, l_i, 1.0)
        _store_plane(ACC, base, (acc0 + acc_z[:, None]) * inv[:, None], 0, M, ROWS, D, PB, GROUP,
                     BLOCK_M, DP)
        if PB >= 2:
            _store_plane(ACC, base, (acc1 + acc_z[:, None]) * inv[:, None], 1, M, ROWS, D, PB,
                         GROUP, BLOCK_M, DP)
        if PB == 4:
            _store_plane(ACC, base, (acc2 + acc_z[:, None]) * inv[:, None], 2, M, ROWS, D, PB,
                         GROUP, BLOCK_M, DP)
            _store_plane(ACC, base, (acc3 + acc_z[:, None]) * inv[:, None], 3, M, ROWS, D, PB,
                         GROUP, BLOCK_M, DP)
        tl.store(LSE + base + r, tl.where(full, m_i + tl.log2(tl.where(full, l_i, 1.0)),
                                          float("-inf")), mask=r < M)

    @triton.jit
    def _load_qt_plane(Q, b, h, sq_b, sq_h, sq_s, i: tl.constexpr, G: tl.constexpr,
                       S: tl.constexpr, D: tl.constexpr, PB: tl.constexpr, COLS: tl.constexpr,
                       BLOCK_C: tl.constexpr, DP: tl.constexpr):
        # [DP, BLOCK_C]: column c holds query row c % (G·S) for c < COLS; row j is channel PB·j + i
        c = tl.arange(0, BLOCK_C)
        m = c % (G * S)
        j = tl.arange(0, DP)
        ptr = Q + b * sq_b + (h * G + m // S)[None, :] * sq_h + (m % S)[None, :] * sq_s
        return tl.load(ptr + (PB * j + i)[:, None],
                       mask=(c < COLS)[None, :] & (j < D // PB)[:, None], other=0.0)

    @triton.jit
    def _key_plane_scores_t(acc, qt, xk, kp, i: tl.constexpr, dt: tl.constexpr,
                            BITS: tl.constexpr, QMAX: tl.constexpr, D: tl.constexpr,
                            PB: tl.constexpr, DP: tl.constexpr, FP16: tl.constexpr,
                            PREC: tl.constexpr, OPERAND: tl.constexpr, MAGIC_FP16: tl.constexpr,
                            CENTER: tl.constexpr, RAW: tl.constexpr = False):
        """acc + c·(q∘a)ᵀ [N, C] over plane i's channels and Σ q·z' [C]: qt fp32 [DP, C], xk
        the tile's packed key bytes [N, DP] (or their planes), kp the key-group params. RAW:
        the operand is magic + c, and Σ q·z' less (magic + CENTER)·Σ (q∘a) — the rounded
        (q∘a) the dot took, so that the offset cancels to the fp32 sums' rounding."""
        j = tl.arange(0, DP)
        ok = j < D // PB
        ch = PB * j + i
        a, z = _affine(tl.load(kp + ch, mask=ok, other=0), tl.load(kp + D + ch, mask=ok, other=0),
                       QMAX, FP16)                                           # [DP]
        qa = (qt * a[:, None]).to(dt)
        s = tl.dot(_t_operand(xk, i, BITS, QMAX, dt, OPERAND, MAGIC_FP16, CENTER, RAW), qa,
                   acc, input_precision=PREC)                                # [N, C]
        zt = qt * (z + CENTER * a)[:, None]
        if RAW:
            if MAGIC_FP16:
                zt -= (1024.0 + CENTER) * qa.to(tl.float32)
            else:
                zt -= (128.0 + CENTER) * qa.to(tl.float32)
        return s, tl.sum(zt, 0)

    @triton.jit
    def _ring_plane_scores_t(acc, qt, kr, slot, tok, i: tl.constexpr, dt: tl.constexpr,
                             D: tl.constexpr, PB: tl.constexpr, DP: tl.constexpr,
                             PREC: tl.constexpr):
        j = tl.arange(0, DP)
        k = tl.load(kr + slot[:, None] * D + (PB * j + i)[None, :],
                    mask=tok[:, None] & (j < D // PB)[None, :], other=0.0)   # [N, DP]
        return tl.dot(k.to(dt), qt.to(dt), acc, input_precision=PREC)        # [N, C]

    @triton.jit
    def _ring_value_plane_t(acc, p, vr, slot, tok, i: tl.constexpr, dt: tl.constexpr,
                            D: tl.constexpr, PB: tl.constexpr, DP: tl.constexpr,
                            PREC: tl.constexpr):
        j = tl.arange(0, DP)
        v = tl.load(vr + slot[None, :] * D + (PB * j + i)[:, None],
                    mask=tok[None, :] & (j < D // PB)[:, None], other=0.0)   # [DP, N]
        return tl.dot(v.to(dt), p, acc, input_precision=PREC)                # [DP, C]

    @triton.jit
    def _store_plane_t(ACC, base, acc, i: tl.constexpr, M: tl.constexpr, COLS: tl.constexpr,
                       D: tl.constexpr, PB: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_C: tl.constexpr, DP: tl.constexpr):
        # acc [DP, C]: column c carries value group c // M and owns that group's channels
        c = tl.arange(0, BLOCK_C)
        j = tl.arange(0, DP)
        own = (j // (GROUP // PB))[:, None] == (c // M)[None, :]
        ok = own & (c < COLS)[None, :] & (j < D // PB)[:, None]
        tl.store(ACC + (base + c % M)[None, :] * D + (PB * j + i)[:, None], acc, mask=ok)

    @triton.jit
    def _asm_run(x, SRC: tl.constexpr, NOUT: tl.constexpr, MAGIC_FP16: tl.constexpr):
        """``_asm_planes`` with the PTX ``SRC`` given (``_asm_planes_source``): NOUT planes."""
        if MAGIC_FP16:
            if NOUT == 2:
                out = tl.inline_asm_elementwise(SRC, "=r,=r,=r,=r,r", [x],
                                                dtype=(tl.float16, tl.float16), is_pure=True,
                                                pack=4)
            else:
                out = tl.inline_asm_elementwise(SRC, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                dtype=(tl.float16, tl.float16, tl.float16,
                                                       tl.float16), is_pure=True, pack=4)
        else:
            if NOUT == 2:
                out = tl.inline_asm_elementwise(SRC, "=r,=r,=r,=r,r", [x],
                                                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                                pack=4)
            else:
                out = tl.inline_asm_elementwise(SRC, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16,
                                                       tl.bfloat16), is_pure=True, pack=4)
        return out

    @triton.jit
    def _t_unpack(x, PB: tl.constexpr, OPERAND: tl.constexpr, MAGIC_FP16: tl.constexpr,
                  ASM: tl.constexpr):
        # "asmt": the bit planes of packed bytes x by the inline PTX ASM (OPERAND 3)
        if OPERAND == 3:
            out = _asm_run(x, ASM, PB, MAGIC_FP16)
        else:
            out = x
        return out

    @triton.jit
    def _t_operand(x, i: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                   dt: tl.constexpr, OPERAND: tl.constexpr, MAGIC_FP16: tl.constexpr,
                   CENTER: tl.constexpr, RAW: tl.constexpr):
        """Plane i as a dot operand for ``_decode_tposed_kernel``: ``_plane_operand``'s modes 3
        (x: the planes of ``_t_unpack``) and 1; with RAW (mode 1: here; mode 3: the PTX) the
        operand keeps the magic offset (magic + c, exact: bf16 128 + c / fp16 1024 + c) and
        the caller removes (magic + CENTER)·Σ of the other operand after the dot."""
        if OPERAND == 3:
            out = x[i].to(dt)
        elif RAW:
            c = _plane(x, i, BITS, QMAX)
            if MAGIC_FP16:
                m = (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)      # 1024 + c
            else:
                m = (c.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)     # 128 + c
            out = m.to(dt)
        else:
            out = _plane_operand(x, i, BITS, QMAX, dt, OPERAND, MAGIC_FP16, CENTER)
        return out

    @triton.jit
    def _exact_tile_t(m_i, l_i, acc_z, acc0, acc1, acc2, acc3, q0, q1, q2, q3, kr, vr, slot, t,
                      tok, qpos, qlo, qk_scale, dt: tl.constexpr, D: tl.constexpr,
                      PB: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
                      RING_N: tl.constexpr, BLOCK_C: tl.constexpr, KPB: tl.constexpr,
                      KDP: tl.constexpr):
        """One online-softmax step of ``_decode_tposed_kernel`` over RING_N full-precision
        tokens (positions t, rows ``slot`` of kr / vr, [rows, D]; ``tok`` the live ones): the
        ring, and the exact sink copy. Column c sees positions qlo[c] <= t <= qpos[c] (qlo: its
        window's first key). The query planes q0..q3 [KDP, C] are the keys' (KPB planes), the
        accumulators acc0..acc3 [DP, C] the values' (PB planes)."""
        scores = tl.zeros([RING_N, BLOCK_C], tl.float32)
        scores = _ring_plane_scores_t(scores, q0, kr, slot, tok, 0, dt, D, KPB, KDP, PREC)
        if KPB >= 2:
            scores = _ring_plane_scores_t(scores, q1, kr, slot, tok, 1, dt, D, KPB, KDP, PREC)
        if KPB == 4:
            scores = _ring_plane_scores_t(scores, q2, kr, slot, tok, 2, dt, D, KPB, KDP, PREC)
            scores = _ring_plane_scores_t(scores, q3, kr, slot, tok, 3, dt, D, KPB, KDP, PREC)
        seen = (t[:, None] <= qpos[None, :]) & (t[:, None] >= qlo[None, :])   # [N, C]
        scores = tl.where(tok[:, None] & seen, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc_z = acc_z * alpha
        p = p.to(dt)
        acc0 = _ring_value_plane_t(acc0 * alpha[None, :], p, vr, slot, tok, 0, dt, D, PB, DP,
                                   PREC)
        if PB >= 2:
            acc1 = _ring_value_plane_t(acc1 * alpha[None, :], p, vr, slot, tok, 1, dt, D, PB,
                                       DP, PREC)
        if PB == 4:
            acc2 = _ring_value_plane_t(acc2 * alpha[None, :], p, vr, slot, tok, 2, dt, D, PB,
                                       DP, PREC)
            acc3 = _ring_value_plane_t(acc3 * alpha[None, :], p, vr, slot, tok, 3, dt, D, PB,
                                       DP, PREC)
        return m_new, l_i, acc_z, acc0, acc1, acc2, acc3

    @triton.jit
    def _decode_tposed_kernel(
            Q, KC, KP, VC, VP, LEN, ACC, LSE, qk_scale, sq_b, sq_h, sq_s, SP, NSPLIT, KR, VR,
            HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BITS: tl.constexpr, GROUP: tl.constexpr, RING: tl.constexpr, JV: tl.constexpr,
            FP16: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
            OPERAND: tl.constexpr = 3, CENTER: tl.constexpr = 0, FUSE_RING: tl.constexpr = True,
            RING_N: tl.constexpr = 16, SK=None, SV=None, NSINK: tl.constexpr = 0,
            RAW: tl.constexpr = False, ASM: tl.constexpr = "", nsink=0,
            WAIT_SPLIT: tl.constexpr = True, KBITS: tl.constexpr = 0, KCENTER: tl.constexpr = 0,
            KASM: tl.constexpr = "", wnd=1 << 30):
        """``_decode_planes_kernel`` transposed ("asmt"): the tokens are the dots' M side and
        the query rows (repeated once per value group, as there) their N side, which may be 8
        wide: scoresᵀ [N, C] = Σ_i c_i [N, DP] · (q_i∘a_i)ᵀ [DP, C], accᵀ_i [DP, C] +=
        c_iᵀ [DP, N] · (p∘a)ᵀ [N, C]. With G·S·JV = 8 rows (Llama-8B: G=4, two value groups)
        the 16-row MMA tile of the planes kernel carried 8 rows of padding; here C = 8, so the
        query planes, accumulators, scores and softmax hold half as many registers and do half
        the work. BLOCK_M is the column count C (>= 8).

        Exact sinks (NSINK > 0: SK, SV [B, Hkv, NSINK, D], contiguous, the ring's dtype):
        positions t < min(NSINK, L) read the copy instead of their stored form. Packed tiles
        that start below NSINK mask those tokens out (a scalar branch: other tiles pay
        nothing), the ring skips them, and program NSPLIT adds them from the copy after the
        ring (``_exact_tile_t``, the ring's code).

        Key width (reference "Key width"): BITS, CENTER and ASM are the values'; KBITS,
        KCENTER and KASM the keys' when they are stored wider or narrower (KBITS 0: the keys
        use BITS, CENTER and ASM — the single-width kernel, unchanged). The query planes, the
        key tiles and the ring's key loads follow the keys' KPB = 8 / KBITS planes; the
        accumulators, the value tiles and the ring's value loads the values' PB.

        Sliding window (``wnd``, a run-time int; 2^30 = none, which no held length reaches):
        column c, at position qpos[c], sees positions >= qlo[c] = qpos[c] − wnd + 1 only (the
        same lower bound for the ring and the sinks). The packed tokens the programs split
        start at the tile that holds lo = max(0, L − S − wnd + 1), the first position any
        query sees (computed from the length on the device): the tiles before it are not
        visited, so the work follows the window, not the held length. Tiles that start below
        max(nsink, L − wnd) (the last query's bound) take the mask under the scalar branch
        that sinks use; the ring starts at lo too."""
        PB: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        KB: tl.constexpr = BITS if KBITS == 0 else KBITS                    # the keys' width
        KPB: tl.constexpr = 8 // KB
        KQMAX: tl.constexpr = (1 << KB) - 1
        KCTR: tl.constexpr = CENTER if KBITS == 0 else KCENTER
        KSRC: tl.constexpr = ASM if KBITS == 0 else KASM
        # an 8-bit side (two widths only; one width of 8 bits runs "asm") takes the exact
        # fp32 magic operand (mode 0) and no raw offset; 2/4-bit sides keep OPERAND and RAW
        KOP: tl.constexpr = OPERAND if KB < 8 else 0
        KRAW: tl.constexpr = RAW and KB < 8
        VOP: tl.constexpr = OPERAND if BITS < 8 else 0
        VRAW: tl.constexpr = RAW and BITS < 8
        M: tl.constexpr = G * S
        COLS: tl.constexpr = JV * M
        BLOCK_C: tl.constexpr = BLOCK_M
        DP: tl.constexpr = BLOCK_D // PB
        EVEN: tl.constexpr = D // PB == DP
        KDP: tl.constexpr = BLOCK_D // KPB
        KEVEN: tl.constexpr = D // KPB == KDP
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        q0 = _load_qt_plane(Q, b, h, sq_b, sq_h, sq_s, 0, G, S, D, KPB, COLS, BLOCK_C, KDP)
        MAGIC_FP16: tl.constexpr = q0.dtype == tl.float16
        dt = q0.dtype
        if DOT_F32:
            dt = tl.float32
        q0 = q0.to(tl.float32)                                              # [KDP, C]
        q1 = q0
        q2 = q0
        q3 = q0
        if KPB >= 2:
            q1 = _load_qt_plane(Q, b, h, sq_b, sq_h, sq_s, 1, G, S, D, KPB, COLS, BLOCK_C,
                                KDP).to(tl.float32)
        if KPB == 4:
            q2 = _load_qt_plane(Q, b, h, sq_b, sq_h, sq_s, 2, G, S, D, KPB, COLS, BLOCK_C,
                                KDP).to(tl.float32)
            q3 = _load_qt_plane(Q, b, h, sq_b, sq_h, sq_s, 3, G, S, D, KPB, COLS, BLOCK_C,
                                KDP).to(tl.float32)
        L = tl.load(LEN).to(tl.int32)
        n = _n_packed(L, GROUP, RING)
        lo = tl.maximum(L - S - wnd + 1, 0)                  # first position any query sees
        plo = tl.minimum(lo // BLOCK_N * BLOCK_N, n)         # its packed tile (BLOCK_N | GROUP)
        chunk = tl.cdiv(tl.cdiv(n - plo, NSPLIT), BLOCK_N) * BLOCK_N
        start = plo + split * chunk
        end = tl.minimum(start + chunk, n)
        mlo = tl.maximum(nsink, L - wnd)                     # tiles below it take the mask
        c = tl.arange(0, BLOCK_C)
        qpos = L - S + (c % M) % S                                           # [C] positions
        cg = (c // M)[None, :]                                               # column's v group
        j = tl.arange(0, DP)
        jok = j < D // PB
        jk = tl.arange(0, KDP)                                               # the keys' bytes
        jkok = jk < D // KPB
        nn = tl.arange(0, BLOCK_N)
        bh64 = bh.to(tl.int64)
        kc = KC + bh64 * SP * (D // KPB)
        vc = VC + bh64 * SP * (D // PB)
        kpar = KP + bh64 * (SP // GROUP) * 2 * D
        vpar = VP + bh64 * SP * 2 * JV
        m_i = tl.full([BLOCK_C], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_C], tl.float32)
        acc_z = tl.zeros([BLOCK_C], tl.float32)
        acc0 = tl.zeros([DP, BLOCK_C], tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for n0 in range(start, end, BLOCK_N):
            t = n0 + nn
            kptr = kc + t[:, None] * (D // KPB) + jk[None, :]                # [N, KDP]
            if KEVEN:
                xk = tl.load(kptr)
            else:
                xk = tl.load(kptr, mask=jkok[None, :], other=0)
            xk = _t_unpack(xk, KPB, KOP, MAGIC_FP16, KSRC)
            kp = kpar + (n0 // GROUP) * 2 * D
            scores = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            scores, qz = _key_plane_scores_t(scores, q0, xk, kp, 0, dt, KB, KQMAX, D, KPB, KDP,
                                             FP16, PREC, KOP, MAGIC_FP16, KCTR, KRAW)
            if KPB >= 2:
                scores, z1 = _key_plane_scores_t(scores, q1, xk, kp, 1, dt, KB, KQMAX, D, KPB,
                                                 KDP, FP16, PREC, KOP, MAGIC_FP16, KCTR,
                                                 KRAW)
                qz += z1
            if KPB == 4:
                scores, z2 = _key_plane_scores_t(scores, q2, xk, kp, 2, dt, KB, KQMAX, D, KPB,
                                                 KDP, FP16, PREC, KOP, MAGIC_FP16, KCTR,
                                                 KRAW)
                scores, z3 = _key_plane_scores_t(scores, q3, xk, kp, 3, dt, KB, KQMAX, D, KPB,
                                                 KDP, FP16, PREC, KOP, MAGIC_FP16, KCTR,
                                                 KRAW)
                qz += z2 + z3
            scores = (scores + qz[None, :]) * qk_scale
            if S > 1:
                scores = tl.where(t[:, None] <= qpos[None, :], scores, float("-inf"))
            if WAIT_SPLIT or NSINK > 0:
                # sink positions read the exact copy instead (program NSPLIT), and positions
                # before a column's window are not seen. A scalar branch on the tile start:
                # other tiles pay nothing. Without sinks or a window mlo is <= 0 and the branch
                # stays: it keeps Triton from merging the wait for the value tile into the key
                # tile's at the top of the loop (see the docstring)
                if n0 < mlo:
                    tlo = tl.maximum(qpos - wnd + 1, nsink)                  # [C]
                    scores = tl.where(t[:, None] >= tlo[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[None, :])                            # [N, C]
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
            vp = vpar + t * (2 * JV)
            if JV == 1:
                a, z = _affine(tl.load(vp), tl.load(vp + 1), QMAX, FP16)         # [N]
                pa = p * a[:, None]
                pz = p * (z + CENTER * a)[:, None]
            else:
                a = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
                z = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
                for jv in tl.static_range(JV):
                    aj, zj = _affine(tl.load(vp + jv), tl.load(vp + JV + jv), QMAX, FP16)
                    a = tl.where(cg == jv, aj[:, None], a)
                    z = tl.where(cg == jv, (zj + CENTER * aj)[:, None], z)
                pa = p * a
                pz = p * z
            pa = pa.to(dt)
            if VRAW:    # the operands are magic + c: remove (magic + CENTER)·Σ (p∘a)
                if MAGIC_FP16:
                    pz -= (1024.0 + CENTER) * pa.to(tl.float32)
                else:
                    pz -= (128.0 + CENTER) * pa.to(tl.float32)
            acc_z = acc_z * alpha + tl.sum(pz, 0)
            vptr = vc + t[None, :] * (D // PB) + j[:, None]                  # [DP, N]
            if EVEN:
                xv = tl.load(vptr)
            else:
                xv = tl.load(vptr, mask=jok[:, None], other=0)
            xv = _t_unpack(xv, PB, VOP, MAGIC_FP16, ASM)
            acc0 = tl.dot(_t_operand(xv, 0, BITS, QMAX, dt, VOP, MAGIC_FP16, CENTER, VRAW),
                          pa, acc0 * alpha[None, :], input_precision=PREC)
            if PB >= 2:
                acc1 = tl.dot(_t_operand(xv, 1, BITS, QMAX, dt, VOP, MAGIC_FP16, CENTER,
                                         VRAW), pa, acc1 * alpha[None, :], input_precision=PREC)
            if PB == 4:
                acc2 = tl.dot(_t_operand(xv, 2, BITS, QMAX, dt, VOP, MAGIC_FP16, CENTER,
                                         VRAW), pa, acc2 * alpha[None, :], input_precision=PREC)
                acc3 = tl.dot(_t_operand(xv, 3, BITS, QMAX, dt, VOP, MAGIC_FP16, CENTER,
                                         VRAW), pa, acc3 * alpha[None, :], input_precision=PREC)
        if FUSE_RING:   # program NSPLIT: the full-precision ring, tokens [n, L), and the sinks
            kr = KR + bh64 * RING * D
            vr = VR + bh64 * RING * D
            nr = tl.arange(0, RING_N)
            qlo = qpos - wnd + 1                                             # [C] window start
            for n0 in range(tl.where(split == NSPLIT, tl.maximum(n, lo), L), L, RING_N):
                t = n0 + nr
                tok = (t < L) & (t >= NSINK)        # positions < NSINK: the sink copy below
                m_i, l_i, acc_z, acc0, acc1, acc2, acc3 = _exact_tile_t(
                    m_i, l_i, acc_z, acc0, acc1, acc2, acc3, q0, q1, q2, q3, kr, vr, t % RING,
                    t, tok, qpos, qlo, qk_scale, dt, D, PB, DP, PREC, RING_N, BLOCK_C, KPB,
                    KDP)
            if NSINK > 0:   # the exact sink copy [B, Hkv, NSINK, D]: positions < min(NSINK, L)
                sk = SK + bh64 * NSINK * D
                sv = SV + bh64 * NSINK * D
                ns = tl.minimum(L, NSINK)
                for n0 in range(0, tl.where(split == NSPLIT, ns, 0), RING_N):
                    t = n0 + nr
                    m_i, l_i, acc_z, acc0, acc1, acc2, acc3 = _exact_tile_t(
                        m_i, l_i, acc_z, acc0, acc1, acc2, acc3, q0, q1, q2, q3, sk, sv, t,
                        t, t < ns, qpos, qlo, qk_scale, dt, D, PB, DP, PREC, RING_N, BLOCK_C,
                        KPB, KDP)
        base = (bh * (NSPLIT + 1) + split) * M
        full = l_i > 0
        inv = 1.0 / tl.where(full, l_i, 1.0)
        _store_plane_t(ACC, base, (acc0 + acc_z[None, :]) * inv[None, :], 0, M, COLS, D, PB,
                       GROUP, BLOCK_C, DP)
        if PB >= 2:
            _store_plane_t(ACC, base, (acc1 + acc_z[None, :]) * inv[None, :], 1, M, COLS, D,
                           PB, GROUP, BLOCK_C, DP)
        if PB == 4:
            _store_plane_t(ACC, base, (acc2 + acc_z[None, :]) * inv[None, :], 2, M, COLS, D,
                           PB, GROUP, BLOCK_C, DP)
            _store_plane_t(ACC, base, (acc3 + acc_z[None, :]) * inv[None, :], 3, M, COLS, D,
                           PB, GROUP, BLOCK_C, DP)
        tl.store(LSE + base + c, tl.where(full, m_i + tl.log2(tl.where(full, l_i, 1.0)),
                                          float("-inf")), mask=c < M)

    @triton.jit
    def _decode_ring_kernel(
            Q, KR, VR, LEN, ACC, LSE, qk_scale, sq_b, sq_h, sq_s, NSPLIT,
            HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            GROUP: tl.constexpr, RING: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        bh = tl.program_id(0)
        q = _load_q(Q, bh // HKV, bh % HKV, sq_b, sq_h, sq_s, G, S, D, BLOCK_M, BLOCK_D)
        if DOT_F32:
            q = q.to(tl.float32)
        L = tl.load(LEN)
        qpos = L - S + tl.arange(0, BLOCK_M) % S
        dd = tl.arange(0, BLOCK_D)
        dok = dd < D
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(_n_packed(L, GROUP, RING), L, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            tok = t < L
            ptr = (bh * RING + t % RING)[:, None] * D + dd[None, :]
            m = tok[:, None] & dok[None, :]
            k = tl.load(KR + ptr, mask=m, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            scores = tl.where(tok[None, :] & (t[None, :] <= qpos[:, None]), scores, float("-inf"))
            m_i, l_i, alpha, p = _online_softmax(scores, m_i, l_i)
            acc = acc * alpha[:, None]
            v = tl.load(VR + ptr, mask=m, other=0.0).to(q.dtype)
            acc += tl.dot(p.to(q.dtype), v, input_precision=PREC)
        _store_partial(ACC, LSE, bh, NSPLIT, NSPLIT + 1, m_i, l_i, acc, G * S, D, BLOCK_M, BLOCK_D)

    @triton.jit
    def _combine_kernel(ACC, LSE, OUT, so_b, so_h, so_s, NS,
                        HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Merge the NS partial results of one (batch·kv head, query row) by their
        log-sum-exp; program axis 2 takes BLOCK_D channels (``_combine_block_d``)."""
        bh = tl.program_id(0)
        m = tl.program_id(1)
        M: tl.constexpr = G * S
        sp = tl.arange(0, BLOCK_S)
        sok = sp < NS
        dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        dok = dd < D
        lse = tl.load(LSE + (bh * NS + sp) * M + m, mask=sok, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))          # empty splits: 0
        part = tl.load(ACC + ((bh * NS + sp) * M + m)[:, None] * D + dd[None, :],
                       mask=sok[:, None] & dok[None, :], other=0.0)
        den = tl.sum(w, 0)
        out = tl.sum(w[:, None] * part, 0) / tl.where(den > 0, den, 1.0)
        h = (bh % HKV) * G + m // S
        ptr = OUT + (bh // HKV) * so_b + h * so_h + (m % S) * so_s + dd
        tl.store(ptr, out.to(OUT.dtype.element_ty), mask=dok)


def _combine_block_d(block_s: int, block_d: int) -> int:
    """Channels a combine program takes: the whole head when the [splits, channels] tile is
    small, else fewer (at most _COMBINE_TILE partial values a program: 256 splits of 128
    channels in one program took 51 µs on an H100, debug/kv_quant_decode_breakdown5)."""
    return max(16, min(block_d, _COMBINE_TILE // block_s))


def _require():
    if not AVAILABLE:
        raise RuntimeError("the kv_quant Triton kernels need triton and CUDA (or TRITON_INTERPRET=1)")


def append(state: reference.QuantizedKV, k: torch.Tensor, v: torch.Tensor) -> reference.QuantizedKV:
    """``reference.append`` on the device: quantize-on-append kernels, then length += s.
    Reads the length on the device, so it does not check the capacity (the caller must)."""
    _require()
    c = state.config
    if not supports_append(state, k, v):
        raise ValueError(f"the Triton append does not take k {tuple(k.shape)} {k.dtype} for a "
                         f"state of {c}, ring {tuple(state.k_ring.shape)} {state.k_ring.dtype} "
                         f"(needs a power-of-two group >= 32 and contiguous state tensors)")
    chunk = append_chunk(state, k, v)
    if chunk is None:
        return state
    k, v, kst, vst = chunk
    B, H, s, D = k.shape
    sp, R = state.k_codes.shape[2], c.ring
    kb = key_bits(state)
    # keys of another width: their own constexprs (one width launches as before they existed)
    keys = {} if kb == c.bits else dict(KBITS=kb, BLOCK_KDP=_pow2(D) // (8 // kb))
    _append_quantize_kernel[(B * H, -(-s // c.group))](
        k, v, state.k_codes, state.k_params, state.v_codes, state.v_params, state.k_ring,
        state.v_ring, state.length, s, *kst, *vst, sp, HKV=H, D=D,
        BLOCK_DP=_pow2(D) // c.per_byte, BITS=c.bits, GROUP=c.group, RING=R,
        JV=c.value_groups(D), FP16=c.scales == "fp16", num_warps=8, **keys)
    return append_ring(state, k, v, kst, vst)


def append_chunk(state: reference.QuantizedKV, k: torch.Tensor, v: torch.Tensor):
    """What both quantize-on-append launches (``append``, ``triton_clip.append_clip``) check
    and pass: k, v [B, Hkv, s, D] against the state, made last-dim contiguous, with their
    (batch, head, token) strides; None for an empty chunk."""
    B, H, s, D = k.shape
    if (B, H) != tuple(state.k_ring.shape[:2]) or D != state.head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match the state {tuple(state.k_ring.shape)}")
    if s == 0:
        return None
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    kst, vst = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
    return k, v, kst, vst


def append_ring(state: reference.QuantizedKV, k: torch.Tensor, v: torch.Tensor,
                kst: tuple, vst: tuple) -> reference.QuantizedKV:
    """The last step of an append, after the packing launch: the chunk's newest tokens into
    the full-precision ring (``_append_ring_kernel``), then length += s on the device."""
    B, H, s, D = k.shape
    R = state.config.ring
    t0 = max(0, s - R)                       # older new tokens cannot stay in the ring
    block_t = min(64, _pow2(s - t0))
    _append_ring_kernel[(B * H, -(-(s - t0) // block_t))](
        k, v, state.k_ring, state.v_ring, state.length, s, t0, *kst, *vst, HKV=H, D=D,
        BLOCK_T=block_t, BLOCK_D=_pow2(D), GROUP=state.config.group, RING=R)
    state.length += s
    return state


def _num_splits(rows: int, packed: int, block_n: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-4 * sms // rows), packed // block_n))


VARIANTS = ("planes", "joined", "magic", "tf32", "asm", "asmt")
_OPERAND = {"planes": 0, "magic": 1, "tf32": 2, "asm": 3, "asmt": 3}   # _plane_operand's modes
_MIN_COLS = 8         # "asmt": the dots' N side (query rows), at least this (Triton: >= 8)
_CENTER = True        # experiments: False turns the centring of "magic" off
DEFAULT_VARIANT = "asmt"      # measured fastest at both shapes: see the module docstring
# "asmt" options (the module docstring has what each measured): raw — the operands keep the
# magic offset (no subtraction; removed after the dots): faster at 4 bits, less exact, off;
# wait_split — the run-time sink branch that splits the key / value tile waits: on
_ASMT = dict(raw=False, wait_split=True)
_COMBINE_TILE = 8192          # [splits, channels] values a combine program takes at most
_NO_WINDOW = 1 << 30          # "asmt"'s wnd without a window: more than any held length


def planes_ok(q: torch.Tensor, state: reference.QuantizedKV) -> bool:
    """Whether the "planes" decode takes this shape: every query row repeated once per value
    group must fit one program (JV·G·S <= MAX_ROWS), and a plane — of the values and of the
    keys, whose width may differ (``key_bits``) — must be a dot operand of at least 16
    columns (pow2(D) / per_byte >= 16)."""
    c = state.config
    D = state.head_dim
    rows = q.shape[1] // state.k_ring.shape[1] * q.shape[2] * c.value_groups(D)
    return (rows <= MAX_ROWS and max(16, _pow2(D)) // c.per_byte >= 16
            and max(16, _pow2(D)) // (8 // key_bits(state)) >= 16)


def _small_tile_splits(packed: int) -> int:
    """Splits for a decode tile of at most 16 rows: one per 512 packed tokens, at most 128 —
    the best of the H100 sweep at both measured shapes (128k B=1: 128; 32k B=8: 64)."""
    return max(1, min(128, packed // 512))


def attention_decode(q: torch.Tensor, state: reference.QuantizedKV, scale: float | None = None,
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, variant: str | None = None,
                     block_n: int | None = None, maxnreg: int | None = None,
                     fuse_ring: bool = True, sink_k: torch.Tensor | None = None,
                     sink_v: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """``reference.attention_decode`` reading the packed state: q [B, H, S, D] (S ≤ 16 or so:
    G·S ≤ 128 rows per kv head) -> [B, H, S, D] in q's dtype.

    ``variant``: "asmt" (``_decode_tposed_kernel``: tokens on the dots' M side, inline-PTX
    operands; 8-bit codes run "asm"), "asm", "magic", "tf32", "planes" (``_decode_planes_kernel``
    with the operand modes of ``_plane_operand``; shapes these do not take, see ``planes_ok``,
    run "joined") or "joined" (``_decode_packed_kernel``); None: DEFAULT_VARIANT. Under the
    interpreter "asm"/"asmt" build their operands in pure Triton (the "magic" mode, the same
    values): inline PTX does not run there. ``fuse_ring``: the planes kernels run the
    full-precision ring as one more split instead of a separate kernel ("asmt" always does).
    Tile knobs: ``block_n`` packed tokens a tile (a power of two in 16..group, default
    min(64, group)), ``num_splits`` programs per kv head over the packed tokens (default: a
    heuristic, about 4 programs per SM), ``num_warps``, ``num_stages``, ``maxnreg`` (a cap on
    the packed-token kernel's registers a thread, for occupancy; None: the compiler's).
    ``sink_k``, ``sink_v`` [B, Hkv, n, D] (the ring's dtype): the exact copy of the first n
    tokens (``reference.with_sinks``), read by "asmt" only (``supports_attention(q, state,
    sinks=True)``; other variants and one width of 8 bits raise). Keys wider or narrower than
    the values (``key_bits``, read off ``k_codes``: ``key_bits``): "asmt" only, any pair of
    2/4/8 bits (an 8-bit side takes exact fp32-magic operands instead of the PTX); the other
    variants, and shapes that are not ``planes_ok``, raise. ``window`` > 0: each query sees
    only the ``window`` most recent held keys up to its own position
    (``reference.decode_mask``), sink positions included; "asmt" only, like the sinks (the
    others raise; ``supports_attention(q, state, window=w)`` says which). The packed tiles
    before the window are skipped on the device (``_decode_tposed_kernel``), and the default
    splits follow the window, not the capacity.
    Defaults for tiles of at most 16 rows (G·S ≤ 16: one query token with GQA groups up to 16,
    the decode case): 1 warp, 3 stages, block_n 64 (32 for "joined"), ``_small_tile_splits``
    — the fastest setting of the H100 sweeps (2026-11-23/24); larger tiles: 8 warps, 4
    stages, block_n 64, the SM heuristic."""
    _require()
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    c = state.config
    kb = key_bits(state)
    if not _query_ok(q, state):
        raise ValueError(f"the Triton decode does not take q {tuple(q.shape)} {q.dtype} for a "
                         f"state of {state.config}, ring {tuple(state.k_ring.shape)} "
                         f"{state.k_ring.dtype} (G·S must be <= {MAX_ROWS})")
    if not _widths_ok(q, state, variant):
        raise ValueError(f'{kb}-bit keys over {c.bits}-bit values: only variant "asmt" reads '
                         f'two widths, over planes_ok shapes (got {variant!r}, planes_ok '
                         f'{planes_ok(q, state)})')
    reference.check_query(q, state.k_ring.shape[1], state.head_dim, None)
    reference.check_sinks(sink_k, sink_v, state)
    reference.check_window(window)
    if window and not _runs_asmt(q, state, variant):
        raise ValueError(f'only variant "asmt" with 2/4-bit codes (or two widths) over planes_ok '
                         f'shapes applies a window (got {variant!r}, {kb}-bit keys, {c.bits}-bit '
                         f'values, planes_ok {planes_ok(q, state)}; supports_attention(..., '
                         f'window=w) says which)')
    if sink_k is not None and sink_k.shape[2] == 0:
        sink_k = sink_v = None
    if sink_k is not None:
        if not _runs_asmt(q, state, variant):
            raise ValueError(f'only variant "asmt" with 2/4-bit codes (or two widths) reads an '
                             f'exact sink copy (got {variant!r}, {kb}-bit keys, {c.bits}-bit '
                             f'values; supports_attention(..., sinks=True) says which)')
        sink_k, sink_v = sink_k.contiguous(), sink_v.contiguous()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    small = q.shape[1] // state.k_ring.shape[1] * q.shape[2] <= 16      # G·S rows a tile
    if variant in _OPERAND and not planes_ok(q, state):
        variant = "joined"
    if variant == "asmt" and c.bits == 8 and kb == 8:
        variant = "asm"
    if block_n is None:
        block_n = min(64 if variant in _OPERAND or not small else 32, c.group)
    num_warps = (1 if small else 8) if num_warps is None else num_warps
    num_stages = (3 if small else 4) if num_stages is None else num_stages
    if block_n < 16 or block_n & (block_n - 1) or c.group % block_n:
        raise ValueError(f"block_n must be a power of two >= 16 dividing the group {c.group}, "
                         f"got {block_n}")
    if block_n < 32 and min(c.bits, kb) < 8 and not INTERPRET:   # see _group_ok: wrong on an H100
        raise ValueError(f"block_n {block_n}: 16-token tiles of {min(c.bits, kb)}-bit codes decoded "
                         f"wrongly on CUDA (H100, Triton 3.6); use 32 or more")
    B, H, S, D = q.shape
    hkv = state.k_ring.shape[1]
    G = H // hkv
    M = G * S
    jv = c.value_groups(D)
    sp = state.k_codes.shape[2]
    block_d = max(16, _pow2(D))
    block_m = max(16, _pow2(M * jv if variant in _OPERAND else M))
    if variant == "asmt":
        block_m = max(_MIN_COLS, _pow2(M * jv))
    # packed tokens a step may visit: all of them, or with a window at most the window, the
    # queries' spread and the partial tile before (the kernel skips the rest)
    visit = sp if not window else min(sp, window + S - 1 + block_n)
    splits = num_splits or (_small_tile_splits(visit) if small else
                            _num_splits(B * hkv, visit, block_n, q.device))
    acc = torch.empty(B * hkv, splits + 1, M, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * hkv, splits + 1, M, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, S, D, device=q.device, dtype=q.dtype)
    # the interpreter's bf16 tl.dot returns garbage (triton 3.9): dot in fp32 there
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 or dot_f32 else "tf32"
    if q.stride(-1) != 1:
        q = q.contiguous()
    qs = (q.stride(0), q.stride(1), q.stride(2))
    common = dict(HKV=hkv, G=G, S=S, D=D, BLOCK_D=block_d, GROUP=c.group, RING=c.ring,
                  PREC=prec, DOT_F32=dot_f32)
    kernel = (_decode_tposed_kernel if variant == "asmt" else
              _decode_planes_kernel if variant in _OPERAND else _decode_packed_kernel)
    fuse = variant in _OPERAND and fuse_ring
    if variant in _OPERAND:
        operand = _OPERAND[variant]
        if operand == 3 and INTERPRET:      # no inline PTX there: the same codes in Triton
            operand = 1
        center = 1 << (c.bits - 1) if operand in (1, 3) and c.bits < 8 else 0
        if operand == 1 and not _CENTER:
            center = 0
        common_main = dict(common, OPERAND=operand, CENTER=center, FUSE_RING=fuse)
        if variant == "asmt" and not fuse:
            raise ValueError('variant "asmt" always folds the ring in (fuse_ring=True)')
        ring_args = (state.k_ring, state.v_ring)
        if variant == "asmt" and sink_k is not None:
            common_main.update(SK=sink_k, SV=sink_v, NSINK=sink_k.shape[2])
        if variant == "asmt":
            raw = bool(_ASMT["raw"])
            # the window's mask lives in the wait-split branch: a window keeps it
            common_main.update(RAW=raw, WAIT_SPLIT=bool(_ASMT["wait_split"]) or window > 0,
                               nsink=0 if sink_k is None else sink_k.shape[2],
                               wnd=window or _NO_WINDOW)
            fp16 = q.dtype == torch.float16
            if operand == 3 and c.bits < 8:
                common_main["ASM"] = _asm_planes_source(c.bits, fp16, raw)
            if kb != c.bits:    # keys of another width: their own constexprs (else none)
                kcenter = 1 << (kb - 1) if operand in (1, 3) and kb < 8 else 0
                if operand == 1 and not _CENTER:
                    kcenter = 0
                common_main.update(KBITS=kb, KCENTER=kcenter)
                if operand == 3 and kb < 8:
                    common_main["KASM"] = _asm_planes_source(kb, fp16, raw)
    else:
        common_main, ring_args = common, ()
    kernel[(B * hkv, splits + fuse)](
        q, state.k_codes, state.k_params, state.v_codes, state.v_params, state.length, acc, lse,
        scale * LOG2E, *qs, sp, splits, *ring_args, BLOCK_M=block_m, BLOCK_N=block_n,
        BITS=c.bits, JV=jv, FP16=c.scales == "fp16", num_warps=num_warps, num_stages=num_stages, **common_main,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    if not fuse:
        _decode_ring_kernel[(B * hkv,)](
            q, state.k_ring, state.v_ring, state.length, acc, lse, scale * LOG2E, *qs, splits,
            BLOCK_M=max(16, _pow2(M)), BLOCK_N=min(64, c.group), **common)
    block_s = _pow2(splits + 1)
    block_dc = _combine_block_d(block_s, block_d)
    _combine_kernel[(B * hkv, M, block_d // block_dc)](
        acc, lse, out, out.stride(0), out.stride(1), out.stride(2), splits + 1, HKV=hkv, G=G,
        S=S, D=D, BLOCK_S=block_s, BLOCK_D=block_dc)
    return out


def packed_bytes_read(state: reference.QuantizedKV, length: int) -> int:
    """Bytes the decode reads from the state at ``length`` tokens (codes, params, ring part)."""
    c = state.config
    n = reference.n_packed(length, c)
    B, H, _, D = state.k_ring.shape
    kcode = D * key_bits(state) // 8                      # key code bytes a token (key_bits)
    per_tok = kcode + D // c.per_byte + 2 * c.value_groups(D) * state.v_params.element_size()
    kp = 2 * D * state.k_params.element_size() * (n // c.group)
    ring = 2 * (length - n) * D * state.k_ring.element_size()
    return B * H * (n * per_tok + kp + ring)
