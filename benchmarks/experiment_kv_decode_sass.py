"""Compile the kv_quant "asmt" decode kernel for sm_90 without a GPU (Triton's own ptxas) and
count its SASS: registers, spills, instructions in the packed-token loop by kind.

    python benchmarks/experiment_kv_decode_sass.py [--bits 4] [--set KEY=VALUE ...] [--out x.json]

The Llama-8B decode shape (G=4, S=1, D=128, group 64, block_n 64, bf16, u8 scales, 1 warp,
3 stages) unless overridden with --set (constexprs of ``_decode_tposed_kernel`` or the
options num_warps / num_stages / maxnreg). The loop is the largest backward branch's body.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longfx.kernels.kv_quant import triton as T


def build(kernel, constexprs: dict, options: dict, signature: dict):
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # what the launcher specializes at run time: 16-byte aligned pointers, ints divisible by 16
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
             if t.startswith("*") or k in ALIGNED_INTS}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v
                                                           for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(cubin: bytes) -> tuple[str, str]:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f.name], capture_output=True,
                          text=True).stdout
    res = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", f.name],
                         capture_output=True, text=True).stdout
    os.unlink(f.name)
    return sass, res


def loop_stats(sass: str) -> dict:
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2).strip()))
    addr = {a: i for i, (a, _) in enumerate(lines)}
    best = (0, 0)
    for i, (a, ins) in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        t = re.search(r"0x([0-9a-f]+)", ins) if "BRA" in ins else None
        if t:
            tgt = int(t.group(1), 16)
            if tgt < a and tgt in addr and i - addr[tgt] > best[1] - best[0]:
                best = (addr[tgt], i)
    body = [ins for _, ins in lines[best[0]:best[1] + 1]]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0]
                              for x in body)
    return dict(total=len(lines), loop=len(body), ops=dict(ops.most_common()))


ALIGNED_INTS = ("sq_b", "sq_h", "sq_s", "SP", "NSPLIT")   # at the benchmark's shapes
DEFAULTS = dict(HKV=8, G=4, S=1, D=128, BLOCK_M=8, BLOCK_N=64, BLOCK_D=128, BITS=4, GROUP=64,
                RING=128, JV=2, FP16=False, PREC="tf32", DOT_F32=False, OPERAND=3, CENTER=8,
                FUSE_RING=True, RING_N=16, NSINK=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--kernel", default="_decode_tposed_kernel")
    ap.add_argument("--out")
    ap.add_argument("--dump", help="write the SASS here")
    a = ap.parse_args()
    cx = dict(DEFAULTS, BITS=a.bits, CENTER=1 << (a.bits - 1), JV=2)
    opts = dict(num_warps=1, num_stages=3)
    for kv in a.set:
        k, v = kv.split("=")
        v = eval(v)  # noqa: S307 - developer's command line
        (opts if k in ("num_warps", "num_stages", "maxnreg") else cx)[k] = v
    if a.kernel == "_decode_tposed_kernel" and cx.get("OPERAND") == 3:
        cx["ASM"] = T._asm_planes_source(cx["BITS"], False, bool(cx.get("RAW")))
    kernel = getattr(T, a.kernel)
    for prm in kernel.params:            # constexprs left out: their defaults
        if prm.is_constexpr and prm.name not in cx and prm.default is not prm._param.empty:
            cx[prm.name] = prm.default
    sig = {n: "i32" for n in kernel.arg_names}
    for n in ("Q", "KR", "VR", "SK", "SV"):
        sig[n] = "*bf16"
    for n in ("KC", "KP", "VC", "VP"):
        sig[n] = "*u8"
    sig.update(LEN="*i64", ACC="*fp32", LSE="*fp32", qk_scale="fp32")
    for n in list(sig):
        if n in cx:
            del sig[n]
    for n in ("SK", "SV"):
        if cx.get("NSINK", 0) == 0 and n in sig:
            del sig[n]
            cx[n] = None
    extra = {k: sig.pop(k) for k in list(sig) if k not in kernel.arg_names}
    assert not extra
    k = build(kernel, cx, opts, sig)
    sass, res = sass_of(k.asm["cubin"])
    if a.dump:
        open(a.dump, "w").write(sass)
    reg = re.findall(r"REG:(\d+)", res)
    stack = re.findall(r"STACK:(\d+)", res)
    row = dict(constexprs={k: v for k, v in cx.items() if k != "ASM"},
               options=opts,
               regs=int(reg[0]) if reg else None, stack=int(stack[0]) if stack else None,
               shared=k.metadata.shared, **loop_stats(sass))
    print(json.dumps(row))
    if a.out:
        json.dump(row, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
