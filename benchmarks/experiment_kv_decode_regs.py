"""Registers / stack / shared memory of the compiled kv_quant decode kernels in the Triton
cache (cuobjdump --dump-resource-usage), with the launch options recorded beside each cubin.

    python benchmarks/experiment_kv_decode_regs.py [--out regs.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess

import triton


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--cache", default=os.path.expanduser("~/.triton/cache"))
    a = ap.parse_args()
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    rows = []
    for cubin in glob.glob(os.path.join(a.cache, "*", "_decode_*_kernel.cubin")):
        meta = json.load(open(cubin[:-len(".cubin")] + ".json"))
        out = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                             text=True).stdout
        reg = re.findall(r"REG:(\d+)", out)
        stack = re.findall(r"STACK:(\d+)", out)
        row = dict(kernel=meta.get("name"), num_warps=meta.get("num_warps"),
                   num_stages=meta.get("num_stages"), maxnreg=meta.get("maxnreg"),
                   shared=meta.get("shared"), regs=int(reg[0]) if reg else None,
                   stack=int(stack[0]) if stack else None, hash=meta.get("hash", "")[:12])
        rows.append(row)
        print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
