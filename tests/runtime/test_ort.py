"""The onnxruntime runner (runtime/ort.py), the torch-free example and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longfx.runtime.ort import ORTModel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "run_onnx_with_ort_only.py"
# Make `import torch` / `import longfx` fail in the child: it must get by without them.
BLOCK = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['longfx'] = None; "
         "sys.modules['transformers'] = None; ")


def _run_blocked(code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", BLOCK + code, *args], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_runner_module_needs_only_numpy_and_onnxruntime(zoo_export):
    """runtime/ort.py loaded as a lone file with torch and longfx blocked generates the same
    tokens as in-process (the longfx package itself imports torch; the file does not)."""
    _, exp = zoo_export("llama", "sink_window(sink=2, window=5)")
    code = ("import importlib.util as u; "
            f"spec = u.spec_from_file_location('ort_runner', {str(ROOT / 'runtime' / 'ort.py')!r}); "
            "m = u.module_from_spec(spec); sys.modules['ort_runner'] = m; spec.loader.exec_module(m); "
            "import numpy as np; "
            f"r = m.ORTModel.from_dir({str(exp.path)!r}); "
            "print(' '.join(map(str, r.generate(np.array([[5, 6, 7, 8]]), max_new_tokens=12, "
            "eos_token_id=[])[0])))")
    got = [int(t) for t in _run_blocked(code).split()]
    want = ORTModel.from_dir(exp.path).generate(np.array([[5, 6, 7, 8]]), max_new_tokens=12,
                                                eos_token_id=[])[0].tolist()
    assert got == want


def test_example_without_torch_on_a_zoo_export(zoo_export, parity):
    _, exp = zoo_export("llama", "")
    out = _run_blocked(f"sys.argv = ['{EXAMPLE.name}'] + sys.argv[1:]; "
                       f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')",
                       str(exp.path), "--prompt-ids", "5 6 7 8", "--ids",
                       "--max-new-tokens", "10")
    got = [int(t) for t in out.split()]
    ids = np.array([[5, 6, 7, 8]])
    want = parity.torch_greedy(exp, ids, np.ones_like(ids), 10)[0, 4:].tolist()
    eos = exp.meta["model"]["eos_token_id"]
    if any(t in eos for t in want):                 # the script stops at EOS
        want = want[:next(i for i, t in enumerate(want) if t in eos) + 1]
    assert got == want


def test_generate_returns_what_it_was_given(zoo_export):
    _, exp = zoo_export("llama", "")
    m = ORTModel.from_dir(exp.path)
    ids = torch.tensor([[5, 6, 7]])
    out = m.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert isinstance(out, torch.Tensor) and out.shape == (1, 7)
    assert torch.equal(out[:, :3], ids)
    out_np = m.generate(ids.numpy(), max_new_tokens=4, eos_token_id=[])
    assert isinstance(out_np, np.ndarray) and (out_np == out.numpy()).all()
    assert m.last_times.prefill_s > 0 and len(m.last_times.decode_s) == 3


def test_sampling_is_seeded_and_top_k_1_is_greedy(zoo_export):
    _, exp = zoo_export("llama", "")
    m = ORTModel.from_dir(exp.path)
    ids = np.array([[5, 6, 7]])
    a = m.generate(ids, 8, do_sample=True, seed=3, temperature=0.8, top_p=0.9, eos_token_id=[])
    b = m.generate(ids, 8, do_sample=True, seed=3, temperature=0.8, top_p=0.9, eos_token_id=[])
    assert (a == b).all()
    greedy = m.generate(ids, 8, eos_token_id=[])
    assert (m.generate(ids, 8, do_sample=True, top_k=1, seed=0, eos_token_id=[]) == greedy).all()


def test_generate_stops_at_eos_and_pads_finished_rows(zoo_export):
    _, exp = zoo_export("llama", "")
    m = ORTModel.from_dir(exp.path)
    ids = np.array([[5, 6, 7], [9, 10, 11]])
    free = m.generate(ids, 6, eos_token_id=[])
    eos = int(free[0, 4])                           # row 0's second token plays EOS
    out = m.generate(ids, 6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    row1 = free[1, 3:]
    if eos not in row1.tolist():
        assert (out[1, 3:] == row1[: out.shape[1] - 3]).all()


def test_cli_export_and_generate(tmp_path, capsys):
    from longfx.cli import main

    out = tmp_path / "llama"
    assert main(["export", "zoo:llama", "--recipe", "sliding_window(window=5)", "-o",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.onnx" in text and (out / "longfx_onnx.json").exists()
    assert main(["generate", "--onnx", str(out), "--prompt-ids", "5 6 7",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    want = ORTModel.from_dir(out).generate(np.array([[5, 6, 7]]), 5)[0, 3:].tolist()
    assert " ".join(map(str, want)) in printed


# ------------------------------------------------------------------------------------ SmolLM2

PROMPT = "Explain in two sentences why the sky is blue."


def _chat_ids(tok) -> np.ndarray:
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    return ids.numpy().astype(np.int64)


@pytest.mark.slow
def test_smollm2_greedy_within_the_window_equals_hf_generate(smollm2, smollm2_export, parity):
    """Prompt + 64 tokens fit the export's window (128): the sparse spec keeps every causal key,
    so the ONNX file must generate what HF generate does with the dense model."""
    model, tok = smollm2
    ids = _chat_ids(tok)
    assert ids.shape[1] + 64 <= parity.smol_window
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(
            torch.from_numpy(ids)), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    got = ORTModel.from_dir(smollm2_export.path).generate(ids, max_new_tokens=64,
                                                          min_new_tokens=64)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.slow
def test_smollm2_example_without_torch(smollm2, smollm2_export):
    """The example script (numpy + onnxruntime + tokenizers; torch, transformers and longfx
    blocked) writes the text HF generate writes."""
    model, tok = smollm2
    out = _run_blocked(f"sys.argv = ['{EXAMPLE.name}'] + sys.argv[1:]; "
                       f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')",
                       str(smollm2_export.path), "--prompt", "The capital of France is",
                       "--max-new-tokens", "12")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False)
    want = "The capital of France is" + tok.decode(ref[0, ids.shape[1]:],
                                                   skip_special_tokens=True)
    assert out.strip() == want.strip()


def test_cli_generate_onnx_with_tokenizer(smollm2_export, capsys):
    from longfx.cli import main

    assert main(["generate", "--onnx", str(smollm2_export.path), "--prompt", "Say hi",
                 "--max-new-tokens", "4"]) == 0
    assert "ms/token" in capsys.readouterr().out
