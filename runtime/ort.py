"""Run an exported longfx decoder (runtime/onnx_export.py) in onnxruntime, like an HF model.

    from longfx.runtime.ort import ORTModel
    m = ORTModel.from_dir("out/smollm2")                 # model.onnx + longfx_onnx.json
    ids = m.generate(input_ids, max_new_tokens=64)       # greedy; [B, S + new], like HF

Only numpy and onnxruntime are imported here (no torch, no longfx rewrite machinery): a
deployment needs the folder, these two packages and a tokenizer. The KV state stays in
onnxruntime between steps: each step binds the previous step's ``present.*`` OrtValues as the
next ``past.*`` inputs through IO binding (no copy to numpy; on a GPU provider they would stay
on the device), and only the logits are read back.

The decode loop follows transformers' ``generate``: ``position_ids = cumsum(mask) - 1`` (1 at
padded positions), the mask grows by one column of ones per step, finished rows get
``pad_token_id``, and generation stops when every row has produced an EOS token.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

META_FILE = "longfx_onnx.json"
_NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
       "bfloat16": None, "int64": np.int64, "uint8": np.uint8}


@dataclass
class StepTimes:
    """Wall times of the last :meth:`ORTModel.generate` call."""

    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * float(np.mean(self.decode_s)) if self.decode_s else float("nan")


class ORTModel:
    """An exported decoder in an ``onnxruntime.InferenceSession`` plus its state description."""

    def __init__(self, session: ort.InferenceSession, meta: dict[str, Any],
                 directory: str | os.PathLike | None = None):
        self.session = session
        self.meta = meta
        self.directory = Path(directory) if directory is not None else None
        self.layers = meta["state"]["layers"]
        self.input_names = [i["name"] for i in meta["inputs"]]
        self.output_names = [o["name"] for o in meta["outputs"]]
        have = {i.name for i in session.get_inputs()}
        if set(self.input_names) != have:
            raise ValueError(f"the ONNX file's inputs {sorted(have)} do not match "
                             f"{META_FILE}'s {self.input_names}")
        providers = session.get_providers()
        self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        self.last_times = StepTimes()

    @classmethod
    def from_dir(cls, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None,
                 session_options: ort.SessionOptions | None = None) -> "ORTModel":
        """Open ``path`` (a folder written by ``longfx.export_onnx`` / ``longfx export``)."""
        path = Path(path)
        meta_path = path / META_FILE if path.is_dir() else path.with_name(META_FILE)
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: not a longfx ONNX export folder")
        meta = json.loads(meta_path.read_text())
        if not str(meta.get("format", "")).startswith("longfx-onnx/"):
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
        opts = session_options or ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(str(meta_path.parent / meta["model_file"]), opts,
                                       providers=list(providers or ["CPUExecutionProvider"]))
        return cls(session, meta, meta_path.parent)

    # ------------------------------------------------------------------------------------------
    # one step

    def empty_state(self, batch: int) -> list[ort.OrtValue]:
        """The state before prefill: every ``past.*`` input with its named dims at 0 (a past
        length of 0; a quantized state's fixed-size sink copy is zeros)."""
        out = []
        for spec in self.meta["inputs"][3:]:
            shape = [batch if d == "batch" else d if isinstance(d, int) else 0
                     for d in spec["shape"]]
            dtype = _NP.get(spec["dtype"])
            if dtype is None:
                raise NotImplementedError(f"state dtype {spec['dtype']} is not supported by "
                                          "the numpy-side runner")
            out.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0))
        return out

    def past_length(self, state: list[ort.OrtValue]) -> int:
        """Tokens a state holds: the sum of the axes ``longfx_onnx.json`` names for it
        (``past.0.key`` axis 2; a quantized state's packed + tail)."""
        names = self.input_names[3:]
        where = self.meta["state"].get("length", [{"input": names[0], "axis": 2}])
        if not where:
            raise ValueError("this export's state does not hold how many tokens were seen "
                             "(every layer keeps only its sliding window): pass the "
                             "attention_mask of every token seen plus the new ones")
        return sum(int(state[names.index(w["input"])].shape()[w["axis"]]) for w in where)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             state: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One forward: new tokens [B, S] after the state's P tokens (mask [B, P+S]).
        Returns logits [B, S, V] (numpy) and the new state (OrtValues, not copied out)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask",
                               np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        names = self.input_names[3:]
        if len(state) != len(names):
            raise ValueError(f"expected {len(names)} state tensors, got {len(state)}")
        for name, value in zip(names, state):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def __call__(self, input_ids, attention_mask=None, position_ids=None, state=None):
        """Logits of ``input_ids`` (numpy [B, S, V]) and the state after them."""
        ids = np.asarray(_to_numpy(input_ids), dtype=np.int64)
        b, s = ids.shape
        fresh = state is None
        state = self.empty_state(b) if fresh else state
        if attention_mask is None:
            p = 0 if fresh or not state else self.past_length(state)
            mask = np.ones((b, p + s), np.int64)
        else:
            mask = np.asarray(_to_numpy(attention_mask), dtype=np.int64)
        if position_ids is None:
            position_ids = _positions(mask)[:, -s:]
        return self.step(ids, mask, _to_numpy(position_ids), state)

    # ------------------------------------------------------------------------------------------
    # generate

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0):
        """Prompt + generated tokens, [B, S + n] (n <= max_new_tokens), like HF ``generate``.

        ``input_ids`` / ``attention_mask``: [B, S] numpy arrays, lists or torch tensors (the
        result has the input's type). Left padding via ``attention_mask`` (0 = padding).
        Greedy by default; ``do_sample`` draws from softmax(logits / temperature) after top-k /
        top-p filtering. ``eos_token_id``: defaults to the model's (from the JSON); ``[]``
        disables stopping.
        """
        ids = np.asarray(_to_numpy(input_ids), dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, s = ids.shape
        mask = np.ones_like(ids) if attention_mask is None \
            else np.asarray(_to_numpy(attention_mask), dtype=np.int64).reshape(b, s)
        model = self.meta.get("model", {})
        eos = (model.get("eos_token_id") or []) if eos_token_id is None else eos_token_id
        eos = np.asarray([eos] if isinstance(eos, (int, np.integer)) else list(eos), np.int64)
        pad = pad_token_id if pad_token_id is not None else model.get("pad_token_id")
        if pad is None:
            pad = int(eos[0]) if eos.size else 0
        rng = np.random.default_rng(seed)
        times = StepTimes()

        state = self.empty_state(b)
        out = ids
        unfinished = np.ones(b, dtype=bool)
        step_ids, pos = ids, _positions(mask)
        for i in range(max_new_tokens):
            t0 = time.perf_counter()
            logits, state = self.step(step_ids, mask, pos, state)
            last = logits[:, -1, :].astype(np.float32)
            if i < min_new_tokens and eos.size:
                last[:, eos] = -np.inf
            nxt = _sample(last, rng, temperature, top_k, top_p) if do_sample \
                else last.argmax(-1)
            nxt = np.where(unfinished, nxt, pad).astype(np.int64)
            dt = time.perf_counter() - t0
            if i == 0:
                times.prefill_s = dt
            else:
                times.decode_s.append(dt)
            out = np.concatenate([out, nxt[:, None]], axis=1)
            if eos.size:
                unfinished &= ~np.isin(nxt, eos)
            if not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            step_ids = nxt[:, None]
            pos = _positions(mask)[:, -1:]
        self.last_times = times
        return _like(out, input_ids)


# ----------------------------------------------------------------------------------------------


def _positions(mask: np.ndarray) -> np.ndarray:
    """transformers' rule: cumsum(mask) - 1, and 1 where the mask is 0 (padding)."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def _sample(logits: np.ndarray, rng, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row from softmax(logits / temperature) restricted to top-k / top-p."""
    x = logits / max(float(temperature), 1e-6)
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p       # keep the smallest set >= top_p
        sorted_p[drop] = 0.0
        p = np.zeros_like(p)
        np.put_along_axis(p, order, sorted_p, -1)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def _to_numpy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _like(out: np.ndarray, ref):
    """``out`` as a torch tensor when the caller passed one (torch is then already imported)."""
    if type(ref).__module__.startswith("torch") and "torch" in sys.modules:
        return sys.modules["torch"].from_numpy(out)
    return out


__all__ = ["ORTModel", "StepTimes", "META_FILE"]
