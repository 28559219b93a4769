"""Generate text from a longfx ONNX export with onnxruntime alone: no torch, no longfx.

    longfx export smollm2-135m --recipe "sink_window(sink=4, window=1024)" -o out/smollm2
    python examples/run_onnx_with_ort_only.py out/smollm2 --prompt "The capital of France is"

Everything the loop needs is in the folder: ``model.onnx`` (one graph for prefill and decode),
``longfx_onnx.json`` (input/output names, the KV state's per-layer shapes and dtypes, EOS id)
and ``tokenizer.json`` (read with the ``tokenizers`` package). The state stays inside
onnxruntime between steps (IO binding: each step's ``present.*`` OrtValues are bound as the
next step's ``past.*``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=None,
                   help="a folder written by `longfx export` / longfx.export_onnx")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-ids", default=None,
                   help="the prompt as space-separated token ids (no tokenizer needed)")
    p.add_argument("--ids", action="store_true",
                   help="print the generated token ids (space-separated) instead of text")
    args = p.parse_args(argv)
    if args.folder is None or not (Path(args.folder) / "longfx_onnx.json").exists():
        print("No export folder given (or it has no longfx_onnx.json). Make one first:\n"
              "    longfx export smollm2-135m --recipe \"\" -o out/smollm2\n"
              "then run:\n"
              "    python examples/run_onnx_with_ort_only.py out/smollm2 --prompt \"Hello\"")
        return 0 if args.folder is None else 2

    folder = Path(args.folder)
    meta = json.loads((folder / "longfx_onnx.json").read_text())
    session = ort.InferenceSession(str(folder / meta["model_file"]),
                                   providers=["CPUExecutionProvider"])
    tokenizer_file = folder / (meta.get("tokenizer") or "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None
    eos = set(meta["model"].get("eos_token_id") or [])

    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.split()]
    elif tokenizer is not None:
        prompt = tokenizer.encode(args.prompt).ids
    else:
        print(f"{tokenizer_file} not found: pass --prompt-ids", file=sys.stderr)
        return 2
    ids = np.array([prompt], dtype=np.int64)                                # [1, S]
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]                # [1, S]

    # Empty state (prefill is a step with no past): every named dim of each state input is 0
    # ("past" for the plain cache; "packed", "tail"... for a kv_quant state), batch is 1, and
    # fixed sizes stay (a quantized state's sink copy starts as zeros).
    state_inputs = [i["name"] for i in meta["inputs"][3:]]
    state = []
    for spec in meta["inputs"][3:]:
        shape = [1 if d == "batch" else d if isinstance(d, int) else 0 for d in spec["shape"]]
        state.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.dtype(spec["dtype"]))))
    output_names = [o["name"] for o in meta["outputs"]]

    new_tokens: list[int] = []
    t0 = time.perf_counter()
    step_ids = ids
    for _ in range(args.max_new_tokens):
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in zip(state_inputs, state):
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits, state = outputs[0].numpy(), outputs[1:]                      # [1, S, V]
        token = int(logits[0, -1].argmax())
        new_tokens.append(token)
        if token in eos:
            break
        step_ids = np.array([[token]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)    # [1, P+1]
        positions = positions[:, -1:] + 1
    dt = time.perf_counter() - t0

    if args.ids or tokenizer is None:
        print(" ".join(map(str, new_tokens)))
    else:
        print(args.prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))
        print(f"[{len(new_tokens)} tokens in {dt:.2f} s with onnxruntime "
              f"{ort.__version__}; torch imported: {'torch' in sys.modules}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # tests/test_examples.py runs every example through runpy inside pytest, whose command
    # line is not ours: there, run without arguments (which prints the how-to).
    code = main([] if "pytest" in sys.modules else sys.argv[1:])
    if code:
        sys.exit(code)
