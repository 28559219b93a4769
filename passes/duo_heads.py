"""``duo_heads``: some KV heads stream (sinks + sliding window), the others stay full.

DuoAttention (Xiao et al. 2024, arXiv:2410.10819) observes that only a fraction of the heads
("retrieval heads") need the whole context; the rest ("streaming heads") lose little when they
attend only the attention sinks and a window of recent tokens (StreamingLLM's pattern). LServe
(Yang et al. 2025) serves with half of the heads streaming. The decision is per KV head: under
GQA the query heads that read one KV head stream together, as in DuoAttention, so a streaming
KV head's cache could be cut to sink + window.

    duo_heads(streaming=0.5, sink=4, window=1024, calibration="calib.json")

**Which heads stream** is decided by :func:`calibrate` on local text (CPython's
``pydoc_data.topics``), saved as JSON keyed by *graph site* (``attention[3]``, see
``rewrite/sites.py``), not by module name. The score of (site, KV head) is the relative change
of that head's attention output when it streams instead of attending fully::

    score = ‖o_stream − o_full‖_F / ‖o_full‖_F      (over the KV head's query heads, all
                                                     queries, summed over the samples)

DuoAttention learns a gate per KV head that mixes full and streaming attention, trained to keep
the model's last hidden states unchanged (an L2 distillation loss plus an L1 push towards
streaming), on synthetic passkey-like data. The per-head output deviation measured here is the
local, training-free version of that objective: it is what the gate's distillation loss would
see if that head alone switched, it needs one forward pass instead of an optimisation, and unlike
"attention mass outside sink+window" it accounts for what the far keys' *values* contribute (mass
on far keys whose values equal the local average costs nothing). The ``streaming`` fraction of
all (site, KV head) pairs with the smallest scores stream — a global ranking, as DuoAttention's
threshold on the gates, so some layers may stream more heads than others.

**The rewrite** needs no new op: a site's streaming KV heads (and their query heads) are sliced
out, run through ``longfx::sparse_attention`` with the sink/window spec; the retrieval heads run
through the same op with ``window=0`` (which keeps every causal key: dense causal attention with
the padding vector, lowered to SDPA); the outputs are concatenated back in head order. Slices,
``cat`` and the sparse op are what the graph then holds, so the Triton kernel (CUDA), the blocked
CPU path, the reference and the ONNX export of ``longfx::sparse_attention`` serve it unchanged.
A site whose heads all stream becomes one sparse call (``streaming=1.0`` is ``sink_window``); a
site with no streaming head is left as it is, with the reason in the report (``streaming=0`` is
exact). Sites the sparse rules cannot take are left dense the same way (``padding_or_reason``:
a mask not proven causal + padding, a native sliding-window layer). Decode steps *are* rewritten
when their mask is proven (a one-query step fed by the KV cache): streaming heads that attended
fully at decode would read what their prefill dropped.

The model's identity (name, a hash of its architecture config and a fingerprint of its weights)
is saved with the scores: :func:`load_calibration` with the model refuses a file made for
another model. The rewrite rule itself sees only the graph (``longfx.compile`` does not hand the
model to rules), so it checks that each site's layer and head counts match the file and leaves
a mismatching site dense with the reason.

Without ``calibration``, ``longfx.compile`` cannot calibrate (a Dynamo backend may not run the
model); :func:`compile` here does: it calibrates on first compile (rich progress bar), caches the
file under ``~/.cache/longfx/duo_heads/`` and says so in the report. ``streaming`` 0 or 1 needs
no calibration.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.sparse_attention.op import OP as SPARSE
from longfx.kernels.sparse_attention.reference import density
from longfx.passes.sparse import key_keep, padding_or_reason
from longfx.recipes import Pipeline, Recipe, RecipeError, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

aten = torch.ops.aten

__all__ = ["DuoHeads", "DuoRule", "calibrate", "choose", "load_calibration", "save_calibration",
           "model_identity", "head_errors", "compile", "FORMAT"]

FORMAT = "longfx.duo_heads/1"
METRIC = {"text": "relative output change of the KV head's query heads, streaming vs full "
                  "attention",
          "recall": "attention mass of the recall queries on the hidden lines, the largest "
                    "over the KV head's query heads (retrieval-head score)"}


# ==============================================================================================
# model identity and the calibration file


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """Name, architecture hash and weight fingerprint of ``model`` (what a file is valid for).

    ``config_hash``: sha256 of the config's architecture fields; ``weights_hash``: sha256 of
    the first 64 values (float32) of every parameter — two fine-tunes of one architecture
    differ there, two loads of one checkpoint do not."""
    config = getattr(model, "config", None)
    arch = {}
    if config is not None:
        d = config.to_dict()
        for key in ("model_type", "architectures", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "hidden_size", "intermediate_size", "head_dim",
                    "vocab_size", "max_position_embeddings", "rope_parameters", "rope_theta",
                    "sliding_window", "layer_types"):
            if key in d:
                arch[key] = d[key]
    config_hash = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    weights = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            weights.update(name.encode())
            weights.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    name = getattr(model, "longfx_name", "") or getattr(config, "_name_or_path", "") or \
        type(model).__name__
    return {"name": str(name), "config_hash": config_hash.hexdigest()[:16],
            "weights_hash": weights.hexdigest()[:16]}


def _site_order(key: str) -> tuple[str, int]:
    m = re.fullmatch(r"(\w+)\[(\d+)\]", key)
    return (m.group(1), int(m.group(2))) if m else (key, -1)


def choose(scores: dict[str, list[float]], streaming: float) -> dict[str, list[int]]:
    """{site key: sorted streaming KV heads}: the ``round(streaming · N)`` (site, head) pairs
    with the smallest scores over all N pairs (ties: graph order, then head order)."""
    pairs = [(float(s), _site_order(key), h, key) for key, row in scores.items()
             for h, s in enumerate(row)]
    pairs.sort(key=lambda p: (p[0], p[1], p[2]))
    n = int(round(streaming * len(pairs)))
    chosen: dict[str, list[int]] = {key: [] for key in scores}
    for _s, _o, h, key in pairs[:n]:
        chosen[key].append(h)
    return {key: sorted(heads) for key, heads in chosen.items()}


def save_calibration(calib: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calib, indent=1) + "\n")
    return path


def _read(path: str | os.PathLike) -> dict[str, Any]:
    try:
        calib = json.loads(Path(path).read_text())
    except OSError as e:
        raise RecipeError(f"duo_heads: cannot read the calibration file {str(path)!r}: "
                          f"{e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"duo_heads: {str(path)!r} is not JSON ({e})") from None
    if not isinstance(calib, dict) or calib.get("format") != FORMAT or \
            not isinstance(calib.get("sites"), dict):
        raise RecipeError(f"duo_heads: {str(path)!r} is not a duo_heads calibration "
                          f"(expected format {FORMAT!r})")
    return calib


def load_calibration(path: str | os.PathLike, model: torch.nn.Module | None = None, *,
                     sink: int | None = None, window: int | None = None) -> dict[str, Any]:
    """Read a calibration file; with ``model``, refuse one made for another model; with
    ``sink``/``window``, refuse one scored under another spec (the ranking depends on it)."""
    calib = _read(path)
    if model is not None:
        want, have = model_identity(model), calib.get("model") or {}
        for fact in ("config_hash", "weights_hash"):
            if have.get(fact) != want[fact]:
                raise RecipeError(
                    f"duo_heads: {str(path)!r} was calibrated for {have.get('name')!r} "
                    f"({fact} {have.get(fact)}), not for this model {want['name']!r} "
                    f"({fact} {want[fact]}): recalibrate with "
                    f"longfx.passes.duo_heads.calibrate(model, tokenizer, path=...)")
    for name, value in (("sink", sink), ("window", window)):
        if value is not None and calib.get(name) != value:
            raise RecipeError(f"duo_heads: {str(path)!r} scored heads with {name}="
                              f"{calib.get(name)}, the recipe asks {name}={value}: recalibrate")
    return calib


# ==============================================================================================
# calibration: a recording rule on the canonical attention sites


def head_errors(q, k, v, keep, scale: float, softcap: float, sink: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full output, ‖o_stream − o_full‖² per KV head, ‖o_full‖² per KV head), float64 [Hkv].

    q [B, H, S, D]; k, v [B, Hkv, Skv, D]; both outputs through ``longfx::sparse_attention``
    (``window=0``: every causal key)."""
    full = SPARSE(q, k, v, keep, scale, softcap, 0, 0, 0, None, "rotate_half")
    stream = SPARSE(q, k, v, keep, scale, softcap, sink, window, 0, None, "rotate_half")
    b, h, s, dv = full.shape
    hkv = k.shape[1]
    f = full.double().reshape(b, hkv, h // hkv, s, dv)                  # [B, Hkv, G, S, Dv]
    d = stream.double().reshape(b, hkv, h // hkv, s, dv) - f
    return full, d.pow(2).sum(dim=(0, 2, 3, 4)), f.pow(2).sum(dim=(0, 2, 3, 4))


def retrieval_mass(q, k, keep, scale: float, softcap: float, last: int,
                   needles: torch.Tensor) -> torch.Tensor:
    """Attention mass the last ``last`` queries put on the key positions ``needles``, mean over
    those queries and the batch, per query head: float64 [H].

    The retrieval-head score of Wu et al. 2024 ("Retrieval Head Mechanistically Explains
    Long-Context Factuality", arXiv:2404.15574: heads that attend to the needle while the model
    copies it) measured as attention mass on the hidden lines while the model recalls them.
    q [B, H, S, D]; k [B, Hkv, Skv, D] (GQA: expanded here); keep [B, Skv] bool or None."""
    from longfx.kernels.attention.reference import expand_kv

    ql = q[:, :, -last:].float()                                         # [B, H, T, D]
    kk = expand_kv(ql, k).float()                                        # [B, H, Skv, D]
    s = torch.matmul(ql, kk.transpose(-1, -2)) * scale                   # [B, H, T, Skv]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    t, skv = s.shape[-2:]
    i = torch.arange(t, device=s.device)[:, None] + (skv - t)
    vis = (torch.arange(skv, device=s.device)[None, :] <= i)[None, None]
    if keep is not None:
        vis = vis & keep.bool()[:, None, None, :]
    p = s.masked_fill(~vis, float("-inf")).softmax(-1).nan_to_num(0.0)
    return p[..., needles.to(s.device)].sum(-1).double().mean(dim=(0, 2))


class _Recorder:
    """Per (site, KV head) across calibration samples: sums of squared output errors and
    norms (``data="text"``) or of retrieval mass (``data="recall"``)."""

    def __init__(self, sink: int, window: int, tick=None):
        self.sink, self.window, self.tick = sink, window, tick
        self.recall: tuple[int, torch.Tensor] | None = None   # (tail, needle positions)
        self.err: dict[str, torch.Tensor] = {}
        self.ref: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def __call__(self, key: str, kv_heads: int, q, k, v, keep, scale, softcap):
        if self.recall is not None:
            full = SPARSE(q, k, v, keep, scale, softcap, 0, 0, 0, None, "rotate_half")
            mass = retrieval_mass(q, k, keep, scale, softcap, *self.recall).cpu()
            # a KV head is needed in full when any of its query heads retrieves
            err, ref = mass.view(kv_heads, -1).amax(1), torch.ones(kv_heads, dtype=mass.dtype)
        else:
            full, err, ref = head_errors(q, k, v, keep, scale, softcap, self.sink, self.window)
            if err.numel() != kv_heads:           # k was repeated to the query heads
                err, ref = err.view(kv_heads, -1).sum(1), ref.view(kv_heads, -1).sum(1)
        self.err[key] = self.err.get(key, 0) + err.cpu()
        self.ref[key] = self.ref.get(key, 0) + ref.cpu()
        if self.tick:
            self.tick()
        return full


_RECORDERS: dict[int, _Recorder] = {}


def record_attention(token: int, key: str, kv_heads: int, q, k, v, keep, scale, softcap):
    """Graph target of the recording rule: score the site's heads, return the full output."""
    return _RECORDERS[token](key, kv_heads, q, k, v, keep, scale, softcap)


class RecordRule(Rule):
    """Calibration only: canonical attention → :func:`record_attention` (dense output)."""

    name = "duo_heads.record"
    kind = "attention"
    stage = "transform"

    def __init__(self, token: int):
        self.token = token
        self._sites: list[Site] = []

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target is not DENSE:
            return site.reason or "the site is not canonical (no longfx::attention)"
        pad = padding_or_reason(site, self._sites)
        if isinstance(pad, str):
            return pad
        h, hkv = _kv_heads(site, node)
        if not h or not hkv:
            return f"duo_heads: head counts not known from the graph (q {h}, kv {hkv})"
        return {"node": node, "padding": pad, "heads": h, "kv_heads": hkv}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node, g, made = facts["node"], gm.graph, []
        q, k, v, _mask, scale, _causal, softcap = node.args
        rec = _RECORDERS[self.token]
        rec.meta[site.key] = {"layer": site.layer, "num_heads": facts["heads"],
                              "num_kv_heads": facts["kv_heads"], "head_dim": _dim(q)}
        with g.inserting_before(node):
            keep = key_keep(g, made, facts["padding"], k) if facts["padding"] is not None \
                else None
            new = g.call_function(record_attention, (self.token, site.key, facts["kv_heads"],
                                                     q, k, v, keep, scale, softcap))
            made.append(new)
        replace_uses(node, new)
        return made


def _heads(node: Any) -> int | None:
    val = G.val(node)
    return int(val.shape[1]) if isinstance(val, torch.Tensor) and val.dim() == 4 else None


def _kv_heads(site: Site, node: fx.Node) -> tuple[int | None, int | None]:
    """(query heads, the model's KV heads) of a canonical attention node. The node's k may
    be repeated to the query heads (the export capture spells GQA that way); the site's
    ``num_kv_heads`` fact then still names the model's KV heads."""
    h, hk = _heads(node.args[0]), _heads(node.args[1])
    hkv = site.facts.get("num_kv_heads") or hk
    if not h or not hk or not isinstance(hkv, int) or h % hkv or (hk != hkv and hk != h):
        return h, None
    return h, hkv


def _dim(node: Any) -> int | None:
    val = G.val(node)
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() == 4 else None


DATA = ("text", "recall")


def _samples(tokenizer_or_ids, length: int, samples: int, data: str = "text", keys: int = 4
             ) -> list[tuple[torch.Tensor, tuple[int, torch.Tensor] | None]]:
    """[(ids, None | (recall tokens, hidden-line positions))]: ``samples`` windows of
    ``length`` tokens from the *end* of the corpus (the ``ppl`` task reads its beginning, so
    calibration and evaluation text do not overlap), or from given ids. ``data="text"``: the
    windows as they are. ``data="recall"``: each window carries ``keys`` access-code lines
    recalled at its end (``longfx.eval.data.recall``, seeded by the sample's index)."""
    if data not in DATA:
        raise RecipeError(f"duo_heads: calibration data must be one of {DATA}, got {data!r}")
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if data != "text":
            raise RecipeError("duo_heads: data='recall' builds its prompts with a tokenizer; "
                              "token ids were given")
        ids = tokenizer_or_ids.reshape(-1).long()
    else:
        from longfx.eval.data import corpus_tokens

        ids = corpus_tokens(tokenizer_or_ids)
    if ids.numel() < length:
        raise RecipeError(f"duo_heads: calibration needs {length} tokens, the text has "
                          f"{ids.numel()}")
    n = min(samples, ids.numel() // length)
    end = ids.numel()
    windows = [ids[end - (i + 1) * length:end - i * length] for i in range(n)][::-1]
    if data == "text":
        return [(w, None) for w in windows]
    import random

    from longfx.eval.data import recall

    out = []
    for i, w in enumerate(windows):
        p = recall(tokenizer_or_ids, w.tolist(), random.Random(i), keys)
        ids = torch.tensor(p.ids, dtype=torch.long)
        needles = torch.tensor([a + j for a, n in zip(p.insert_at, p.meta["line_tokens"])
                                for j in range(n)])
        out.append((ids, (p.meta["tail"], needles)))
    return out


def calibrate(model: torch.nn.Module, tokenizer_or_ids: Any, *, sink: int = 4,
              window: int = 1024, streaming: float = 0.5, length: int = 4096,
              samples: int = 2, path: str | os.PathLike | None = None,
              progress: bool = True, data: str = "text", keys: int = 4) -> dict[str, Any]:
    """Score every (attention site, KV head) of ``model``; return (and save to ``path``) the
    calibration: per site its layer, head counts, scores and the heads that stream at
    ``streaming``, plus the model identity and how it was measured.

    ``tokenizer_or_ids``: a tokenizer (the text is ``longfx.eval.data.corpus_tokens``, windows
    taken from its end) or a 1-D tensor of token ids. The model runs once per sample through
    ``longfx.compile``'s machinery with :class:`RecordRule` on its canonical attention sites:
    one forward of ``length`` tokens into a fresh KV cache, each site scoring its heads
    (:func:`head_errors`) and passing the full output on.

    ``data``: "text" — the windows as they are, each head scored by its output change
    (:func:`head_errors`, every query) — or "recall" — ``keys`` access codes hidden in each
    window and recalled at its end (DuoAttention's synthetic retrieval data, see
    :func:`_samples`), each head scored by the attention mass its recall queries put on the
    hidden lines (:func:`retrieval_mass`; the KV head takes its largest query head). docs/sparse.md
    compares the two."""
    _check(streaming, sink, window)
    from longfx import api
    from longfx.eval.infer import new_cache
    from longfx.rewrite.capture import Backend
    from longfx.runtime.hf import compiled_copy

    chunks = _samples(tokenizer_or_ids, length, samples, data, keys)
    device = next(model.parameters()).device
    token = max(_RECORDERS, default=0) + 1
    rec = _Recorder(sink, window)
    _RECORDERS[token] = rec
    try:
        be = Backend([RecordRule(token)], recipe="duo_heads.calibrate",
                     model_facts=api.model_facts(model))
        fast = compiled_copy(model, be, dynamic=False)
        with _progress(progress, len(chunks)) as advance:
            for ids, recall in chunks:
                rec.recall = recall
                # through a fresh KV cache, as the model runs in use: without one, the mask of
                # some transformers versions (5.17) is built after a state update and is not
                # proven causal, so no site could be scored
                kwargs = {"input_ids": ids[None].to(device), "use_cache": True,
                          "past_key_values": new_cache(model)}
                with torch.no_grad():
                    try:
                        fast(**kwargs, logits_to_keep=1)      # [B, 1, V]: no [S, V] logits
                    except TypeError:
                        fast(**kwargs)
                advance()
    finally:
        _RECORDERS.pop(token, None)
    if not rec.err:
        reasons = sorted({r["reason"] for r in be.report.rows() if r.get("reason")})
        raise RecipeError(f"duo_heads: no attention site could be calibrated ({reasons})")
    mean = {key: rec.err[key] / rec.ref[key].clamp(min=1e-30) for key in rec.err}
    scores = {key: (mean[key] if data == "recall" else mean[key].sqrt()).tolist()
              for key in sorted(rec.err, key=_site_order)}
    chosen = choose(scores, streaming)
    import transformers

    calib = {
        "format": FORMAT, "model": model_identity(model), "metric": METRIC[data],
        "sink": sink, "window": window, "streaming": streaming,
        "data": {"text": _text_name(tokenizer_or_ids), "length": length,
                 "samples": len(chunks), "from": "end of the text", "kind": data,
                 **({"keys": keys, "scored": "the recall queries"} if data == "recall" else
                    {"scored": "every query"})},
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "sites": {key: {**rec.meta.get(key, {}), "scores": scores[key],
                        "streaming": chosen[key]} for key in scores},
    }
    if path is not None:
        save_calibration(calib, path)
    return calib


def _text_name(tokenizer_or_ids) -> str:
    if isinstance(tokenizer_or_ids, torch.Tensor):
        return "token ids given by the caller"
    from longfx.eval.data import CORPUS_NAME

    return CORPUS_NAME


class _progress:
    """A rich progress bar over calibration samples (or nothing)."""

    def __init__(self, show: bool, total: int):
        self.show, self.total, self.bar = show, total, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("duo_heads: calibrating heads", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


# ==============================================================================================
# the rewrite


def _runs(heads: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted heads → [start, end) runs of consecutive heads: [0, 1, 3] → [(0, 2), (3, 4)]."""
    out: list[tuple[int, int]] = []
    for h in sorted(heads):
        if out and out[-1][1] == h:
            out[-1] = (out[-1][0], h + 1)
        else:
            out.append((h, h + 1))
    return out


def _take(g: fx.Graph, made: list, x: fx.Node, runs: list[tuple[int, int]], group: int):
    """The head runs of ``x`` [B, H', ...] (head h' = kv head · group + i), concatenated."""
    parts = [G.call(g, made, aten.slice.Tensor, x, 1, a * group, b * group) for a, b in runs]
    return parts[0] if len(parts) == 1 else G.call(g, made, aten.cat.default, parts, 1)


class DuoRule(Rule):
    """Canonical attention → streaming KV heads through the sparse op, the rest full."""

    kind = "attention"
    stage = "transform"

    def __init__(self, streaming: float, sink: int, window: int,
                 calibration: str | None = None, recipe: str = ""):
        self.name = "sparse.duo_heads"
        self.streaming, self.sink, self.window = float(streaming), int(sink), int(window)
        self.calibration, self.recipe = calibration, recipe
        self._sites: list[Site] = []
        self._calib: dict[str, Any] | None = None
        self._chosen: dict[str, list[int]] = {}

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites
        if self.calibration and self._calib is None and 0.0 < self.streaming < 1.0:
            self._calib = load_calibration(self.calibration, sink=self.sink, window=self.window)
            self._chosen = choose({k: s["scores"] for k, s in self._calib["sites"].items()},
                                  self.streaming)

    def _streaming_heads(self, site: Site, hkv: int, h: int) -> list[int] | str:
        if self.streaming >= 1.0:
            return list(range(hkv))
        if self.streaming <= 0.0:
            return []
        if self._calib is None:
            return ("duo_heads: no calibration file: pass calibration=PATH (made by "
                    "longfx.passes.duo_heads.calibrate) or compile with "
                    "longfx.passes.duo_heads.compile(model, recipe, tokenizer), which "
                    "calibrates on first compile; kept dense")
        entry = self._calib["sites"].get(site.key)
        if entry is None:
            return (f"duo_heads: the calibration has no entry for {site.key} (it has "
                    f"{len(self._calib['sites'])} sites): not this model's graph; kept dense")
        want = {"num_kv_heads": hkv, "num_heads": h, "layer": site.layer}
        for fact, value in want.items():
            if value is not None and entry.get(fact) is not None and entry[fact] != value:
                return (f"duo_heads: calibration mismatch at {site.key}: the file has "
                        f"{fact}={entry[fact]}, the site {value} (calibrated for "
                        f"{self._calib['model'].get('name')!r}); kept dense")
        if len(entry.get("scores", ())) != hkv:
            return f"duo_heads: calibration mismatch at {site.key}: {hkv} KV heads; kept dense"
        return self._chosen[site.key]

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("sparse") or site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target not in (DENSE, SPARSE):
            return site.reason or "the site is not canonical (no longfx::attention to rewrite)"
        if node.target is SPARSE:
            return f"already sparse ({site.facts.get('sparse')}): one sparse recipe per site"
        h, hkv = _kv_heads(site, node)
        if not h or not hkv:
            return (f"duo_heads: head counts not known from the graph (q {_heads(node.args[0])}"
                    f", kv {_heads(node.args[1])})")
        entry = (self._calib or {}).get("sites", {}).get(site.key) or {}
        c = entry.get("num_kv_heads")
        if isinstance(c, int) and 0 < c < hkv == h == entry.get("num_heads") and h % c == 0:
            hkv = c         # this graph repeats k to the query heads; the file knows the KV heads
        heads = self._streaming_heads(site, hkv, h)
        if isinstance(heads, str):
            return heads
        if not heads:
            return (f"duo_heads: all {hkv} KV heads of this site are retrieval heads "
                    f"(streaming={self.streaming}); kept dense")
        pad = padding_or_reason(site, self._sites)
        if isinstance(pad, str):
            return pad
        group = h // hkv
        graph_stream, graph_hkv = heads, hkv
        if _heads(node.args[1]) == h and hkv != h:      # k repeated: one graph head per query
            graph_stream = [j * group + i for j in heads for i in range(group)]
            graph_hkv, group = h, 1
        return {"node": node, "padding": pad, "stream": graph_stream, "hkv": graph_hkv,
                "group": group, "kv_stream": heads, "kv_heads": hkv}

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        g, made = gm.graph, []
        q, k, v, _mask, scale, _causal, softcap = node.args
        hkv, group, stream = facts["hkv"], facts["group"], facts["stream"]
        full = [h for h in range(hkv) if h not in stream]            # graph k heads
        with g.inserting_before(node):
            keep = key_keep(g, made, facts["padding"], k) if facts["padding"] is not None \
                else None

            def attend(runs, sink, window):
                return G.call(g, made, SPARSE, _take(g, made, q, runs, group),
                              _take(g, made, k, runs, 1), _take(g, made, v, runs, 1), keep,
                              scale, softcap, sink, window, 0, None, "rotate_half")

            if not full:                                        # every head streams
                new = streamed = G.call(g, made, SPARSE, q, k, v, keep, scale, softcap,
                                        self.sink, self.window, 0, None, "rotate_half")
            else:
                streamed = attend(_runs(stream), self.sink, self.window)  # [B, |S|·G, S, Dv]
                dense = attend(_runs(full), 0, 0)                         # [B, |F|·G, S, Dv]
                # back to head order: each run sliced from the output that computed it
                pieces, offset = [], {id(streamed): 0, id(dense): 0}
                for a, b in sorted(_runs(stream) + _runs(full)):
                    src = streamed if a in stream else dense
                    o = offset[id(src)]
                    pieces.append(G.call(g, made, aten.slice.Tensor, src, 1, o * group,
                                         (o + b - a) * group))
                    offset[id(src)] = o + b - a
                new = G.call(g, made, aten.cat.default, pieces, 1)       # [B, H, S, Dv]
        replace_uses(node, new)
        site.nodes["sparse"] = streamed
        kv_stream = facts["kv_stream"]
        kv_full = [h for h in range(facts["kv_heads"]) if h not in kv_stream]
        site.facts["sparse"] = (f"duo: kv heads {kv_stream} stream (sink={self.sink}, "
                                f"window={self.window}), {kv_full} full")
        site.facts["duo"] = {"streaming_kv_heads": kv_stream, "retrieval_kv_heads": kv_full,
                             "sink": self.sink, "window": self.window}
        if not full:
            site.facts["sparse_spec"] = {"sink": self.sink, "window": self.window, "cap": 0}
        else:
            site.facts["density"] = duo_density(site, 8192)
            site.facts["density_context"] = 8192
        return made


def duo_density(site: Site, context: int) -> float:
    """Kept over causal query–key pairs of a duo site at ``context`` tokens (prefill)."""
    duo = site.facts.get("duo") or {}
    n_stream = len(duo.get("streaming_kv_heads", ()))
    n = n_stream + len(duo.get("retrieval_kv_heads", ()))
    if not n:
        return 1.0
    d = density(context, context, int(duo.get("sink", 0)), int(duo.get("window", 0)))
    return (n_stream * d + (n - n_stream)) / n


# ==============================================================================================
# the recipe


def _check(streaming: Any, sink: Any, window: Any) -> None:
    if isinstance(streaming, bool) or not isinstance(streaming, (int, float)) or \
            not (0.0 <= float(streaming) <= 1.0) or math.isnan(float(streaming)):
        raise RecipeError(f"duo_heads: streaming must be a fraction in [0, 1], got {streaming!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise RecipeError(f"duo_heads: sink must be an int >= 0, got {sink!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise RecipeError(f"duo_heads: window must be an int >= 1, got {window!r}")


@register("duo_heads")
class DuoHeads(Recipe):
    """DuoAttention-style heads: a ``streaming`` fraction of the KV heads attends ``sink`` +
    ``window`` keys (StreamingLLM), the rest stays full; which ones: ``calibration`` (JSON)."""

    streaming: float = 0.5
    sink: int = 4
    window: int = 1024
    calibration: str | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self):
        _check(self.streaming, self.sink, self.window)
        if self.calibration is not None and (not isinstance(self.calibration, str)
                                             or not self.calibration):
            raise RecipeError(f"duo_heads: calibration must be a file path, got "
                              f"{self.calibration!r}")

    @property
    def needs_calibration(self) -> bool:
        return 0.0 < self.streaming < 1.0

    def rules(self) -> list:
        return [DuoRule(self.streaming, self.sink, self.window, self.calibration,
                        recipe=str(self))]

    def bind(self, model: torch.nn.Module) -> "DuoHeads":
        """The recipe for ``model`` (``longfx.compile`` calls this): without a calibration
        file, the one :func:`compile` made for this model before (:func:`default_path`, same
        weights, sink and window) is used when it exists; otherwise the recipe is unchanged
        and its sites stay dense, the report saying how to calibrate."""
        if not self.needs_calibration or self.calibration:
            return self
        path = default_path(model, self.sink, self.window)
        if not path.exists():
            return self
        load_calibration(path, model, sink=self.sink, window=self.window)
        return DuoHeads(self.streaming, self.sink, self.window, str(path))


def default_path(model: torch.nn.Module, sink: int, window: int, data: str = "text") -> Path:
    """Where :func:`compile` keeps a calibration it made: ``$XDG_CACHE_HOME`` (or
    ``~/.cache``), then
    ``longfx/duo_heads/<name>-<config hash>-<weights hash>-s<sink>-w<window>.json``."""
    ident = model_identity(model)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ident["name"]).strip("_")[-60:] or "model"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    kind = "" if data == "text" else f"-{data}"
    return root / "longfx" / "duo_heads" / \
        f"{name}-{ident['config_hash']}-{ident['weights_hash']}-s{sink}-w{window}{kind}.json"


def compile(model: torch.nn.Module, recipe: Any, tokenizer: Any = None, *,
            length: int = 4096, samples: int = 2, progress: bool = True, data: str = "text",
            **kwargs) -> torch.nn.Module:
    """``longfx.compile`` for pipelines holding ``duo_heads``: a ``duo_heads`` without a
    calibration file is calibrated on this first compile (``tokenizer`` or a 1-D id tensor
    gives the text; ``length``/``samples``/``data`` as in :func:`calibrate`), the file cached under
    :func:`default_path` and reused next time; a given file is checked against ``model``
    (:func:`load_calibration`). The report's warnings say which calibration was used."""
    import longfx
    from longfx import recipes

    pipeline = recipe if isinstance(recipe, Pipeline) else \
        Pipeline((recipe,)) if isinstance(recipe, Recipe) else recipes.parse(recipe)
    bound, notes = [], []
    for r in pipeline:
        if isinstance(r, DuoHeads) and r.needs_calibration:
            if r.calibration:
                load_calibration(r.calibration, model, sink=r.sink, window=r.window)
                notes.append(f"duo_heads: heads from the calibration {r.calibration}")
            else:
                path = default_path(model, r.sink, r.window, data)
                if path.exists():
                    load_calibration(path, model, sink=r.sink, window=r.window)
                    notes.append(f"duo_heads: no calibration given; reused the one made on "
                                 f"first compile, {path}")
                else:
                    if tokenizer is None:
                        raise RecipeError(f"{r}: no calibration file: pass calibration=PATH, "
                                          f"or a tokenizer (or token ids) to calibrate on")
                    calib = calibrate(model, tokenizer, sink=r.sink, window=r.window,
                                      streaming=r.streaming, length=length, samples=samples,
                                      path=path, progress=progress, data=data)
                    d = calib["data"]
                    notes.append(f"duo_heads: no calibration given; calibrated on first "
                                 f"compile ({d['samples']} x {d['length']} tokens of "
                                 f"{d['text']}), saved to {path}")
                r = DuoHeads(r.streaming, r.sink, r.window, str(path))
        bound.append(r)
    fast = longfx.compile(model, Pipeline(tuple(bound)), **kwargs)
    fast.longfx_backend.report.warnings.extend(notes)
    return fast
