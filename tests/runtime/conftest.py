"""Shared exports for the ONNX tests: each (model, recipe) is exported once per test session.

Exports are slow on a shared 2-core CPU (a tiny zoo model 15-40 s, SmolLM2-135M several
minutes), so test_onnx_export.py and test_ort.py draw on the same folders.
"""
from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# One SmolLM2 export serves every SmolLM2 test (an export takes minutes here): while prompt +
# generated tokens fit the window it must equal the dense model exactly (HF generate); past
# the window it must equal the rewritten torch graph.
SMOL_RECIPE = "sink_window(sink=4, window=128)"
SMOL_WINDOW = 128


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on a shared 2-core CPU "
                                       "(still run by default)")

_EXPORTS: dict = {}


def _export(tmp_path_factory, model, key, recipe, **kw):
    from longfx.runtime.onnx_export import export_onnx

    if key not in _EXPORTS:
        folder = tmp_path_factory.mktemp("onnx") / "export"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _EXPORTS[key] = export_onnx(model, folder, recipe, **kw)
    return _EXPORTS[key]


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """``zoo_export(name, recipe, attn="sdpa", target="opset23") -> (model, OnnxExport)``."""
    from longfx.rewrite.testing import zoo

    models: dict = {}

    def get(name: str, recipe: str = "", attn: str = "sdpa", target: str = "opset23"):
        if (name, attn) not in models:
            models[name, attn] = zoo.build(name, attn)[0]
        model = models[name, attn]
        return model, _export(tmp_path_factory, model, (name, attn, recipe, target), recipe,
                              target=target)

    return get


@pytest.fixture(scope="session")
def smollm2():
    import longfx

    return longfx.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_export(smollm2, tmp_path_factory):
    model, tok = smollm2
    return _export(tmp_path_factory, model, ("smollm2", SMOL_RECIPE), SMOL_RECIPE, tokenizer=tok)


# ----------------------------------------------------------------------------------------------
# The torch side of the parity checks: the rewritten graph driven by the same loop as ORT


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, -1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def torch_state(export, batch: int) -> list[torch.Tensor]:
    from longfx.runtime.onnx_export import empty_state

    return empty_state(export.meta, batch)


@contextlib.contextmanager
def _one_torch_thread():
    """The torch side of the parity checks runs on one thread: on these shared 2-core machines
    two OpenMP threads wait on each other (a decode step of the rewritten SmolLM2 graph took
    5 s with 2 threads under load, ~0.1 s with 1). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def torch_step(export, ids, mask, pos, state):
    with _one_torch_thread():
        return _torch_step(export, ids, mask, pos, state)


def _torch_step(export, ids, mask, pos, state):
    out = export.run_torch(torch.from_numpy(np.ascontiguousarray(ids)),
                           torch.from_numpy(np.ascontiguousarray(mask)),
                           torch.from_numpy(np.ascontiguousarray(pos)), *state)
    return out[0].numpy(), list(out[1:])


def torch_greedy(export, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens through the rewritten torch graph (no EOS stop): [B, S + n]."""
    state = torch_state(export, ids.shape[0])
    out, step, pos = ids, ids, positions(mask)
    for _ in range(n):
        logits, state = torch_step(export, step, mask, pos, state)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        out = np.concatenate([out, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
        step, pos = nxt[:, None], positions(mask)[:, -1:]
    return out


def compare_steps(export, ort_model, ids: np.ndarray, mask: np.ndarray, chunk: int = 3,
                  decode: int = 4) -> float:
    """Prefill ``ids`` (empty past), then a chunk of ``chunk`` tokens, then ``decode`` single
    tokens, in ORT and in the rewritten torch graph, each side carrying its own state.
    Returns the largest relative error of the logits and of the final state.

    Padding positions (mask 0) are left out: their query rows attend to nothing, and what
    that gives is a convention (zeros in the references and in onnxruntime's Attention;
    uniform weights under an HF float mask of finfo.min, e.g. Gemma 2 eager). No real token
    reads them: their keys are masked for every query."""
    b = ids.shape[0]
    vocab = int(export.meta["model"]["vocab_size"])
    rng = np.random.default_rng(1)
    t_state, o_state = torch_state(export, b), ort_model.empty_state(b)
    worst, step = 0.0, ids
    for n in [None, chunk] + [1] * decode:
        if n is not None:
            step = rng.integers(0, vocab, (b, n), dtype=np.int64)
            mask = np.concatenate([mask, np.ones((b, n), np.int64)], 1)
        pos = positions(mask)[:, -step.shape[1]:]
        t_logits, t_state = torch_step(export, step, mask, pos, t_state)
        o_logits, o_state = ort_model.step(step, mask, pos, o_state)
        real = mask[:, -step.shape[1]:] == 1                              # [B, S]
        worst = max(worst, rel(o_logits[real], t_logits[real]))
    real = mask == 1                                                      # [B, P+S]
    for t, o in zip(t_state, o_state):       # the state the next step would read
        a, b_ = o.numpy().transpose(0, 2, 1, 3), t.numpy().transpose(0, 2, 1, 3)
        held = real[:, real.shape[1] - a.shape[1]:]     # a sliding layer holds the last tokens
        worst = max(worst, rel(a[held], b_[held]))                        # [n, Hkv, D]
    return worst


@pytest.fixture(scope="session")
def parity():
    return SimpleNamespace(rel=rel, positions=positions, torch_state=torch_state,
                           torch_step=torch_step, torch_greedy=torch_greedy,
                           compare_steps=compare_steps, smol_window=SMOL_WINDOW)
