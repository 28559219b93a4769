"""Name what an attention site's mask means by evaluating it once on example inputs.

HF 5 builds masks through vmapped predicate functions, SDPA-style index comparisons or
cached tensors; nanoGPT slices a registered ``tril`` buffer. Rather than pattern-match every
builder, the analysis runs the graph once (an ``fx.Interpreter``) and classifies the mask
tensor it produced: ``causal``, ``sliding_window(w)``, ``full``, ``padding``,
``causal+padding``, ``bias`` (a float additive bias such as T5's relative positions) or
``custom``. A window wider than the example's sequence is indistinguishable from causal; the
name describes what the example showed (``facts["mask_seen_len"]`` says how long it was).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from longfx.rewrite import graph as G
from longfx.rewrite.manager import is_impure

_NEG = -1e4


class _Recorder(fx.Interpreter):
    """Evaluates only the nodes the masks depend on, and records the masks.

    Everything else is skipped: running the whole graph would apply its side effects
    (a static cache's ``index_copy_``, its length counter) to the caller's real state.
    """

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node], needed: set[fx.Node]):
        super().__init__(gm)
        self.wanted = wanted
        self.needed = needed
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("placeholder", "get_attr") and n not in self.needed:
            return None
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _mask_nodes(site) -> list:
    parts = site.nodes.get("mask_parts") or []
    nodes = [p[0] for p in parts]
    if site.nodes.get("mask") is not None:
        nodes.append(site.nodes["mask"])
    return [n for n in nodes if isinstance(n, fx.Node)]


def keep_matrix(site, values: dict) -> torch.Tensor | None:
    """The boolean keep-matrix [B, H|1, S, Skv] a site's mask(s) produce, or None if no mask."""
    keep = None
    bias = False
    parts = list(site.nodes.get("mask_parts") or [])
    if site.nodes.get("mask") is not None:
        parts.append((site.nodes["mask"], "keep_or_add", 1.0))
    for node, kind, _factor in parts:
        m = values.get(node) if isinstance(node, fx.Node) else None
        if not isinstance(m, torch.Tensor):
            return None
        if m.dtype == torch.bool:
            k = ~m if kind == "drop" else m
        else:
            k = m > _NEG
            finite = m[k]
            if finite.numel() and finite.abs().max() > 0:
                bias = True
        keep = k if keep is None else keep & k
    if keep is not None and bias:
        keep = keep.clone()
        keep.bias = True  # type: ignore[attr-defined]
    return keep


def classify(keep: torch.Tensor | None, is_causal: bool, s: int | None, skv: int | None) -> str:
    if keep is None:
        return "causal" if is_causal else "full"
    bias = getattr(keep, "bias", False)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    s = s or keep.shape[-2]
    skv = skv or keep.shape[-1]
    keep = keep.expand(*keep.shape[:-2], s, skv)
    if is_causal:
        keep = keep & torch.ones(s, skv, dtype=torch.bool, device=keep.device).tril()
    first = keep.reshape(-1, s, skv)
    same = bool((first == first[:1]).all())
    ref = first[0]
    i = torch.arange(s, device=keep.device)[:, None] + (skv - s)
    j = torch.arange(skv, device=keep.device)[None, :]
    causal = j <= i
    if not same:
        name = "causal+padding" if bool((first & ~causal).sum() == 0) else "padding"
    elif bool(ref.all()):
        name = "full"
    elif bool((ref == causal).all()):
        name = "causal"
    else:
        width = int(ref.sum(-1).max())
        band = causal & (i - j < width)
        name = f"sliding_window({width})" if bool((ref == band).all()) else "custom"
    return f"{name}+bias" if bias else name


def name_masks(gm: fx.GraphModule, sites: list, example_inputs: Any) -> None:
    """Set ``facts["mask_kind"]`` on every attention site of ``gm``."""
    wanted = {n for site in sites for n in _mask_nodes(site)}
    values: dict = {}
    if wanted:
        needed = set(wanted)
        for n in wanted:
            needed |= G.ancestors(n)
        if any(n.op.startswith("call") and is_impure(n) for n in needed):
            for site in sites:
                site.facts["mask_kind"] = "unknown (the mask is computed after a state update)"
            return
        try:
            rec = _Recorder(gm, wanted, needed)
            concrete = [G.as_int(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
            with torch.no_grad():
                rec.run(*concrete)
            values = rec.values
        except Exception as e:  # noqa: BLE001 - analysis must not break on exotic graphs
            for site in sites:
                site.facts["mask_kind"] = f"unknown ({type(e).__name__}: {str(e)[:200]})"
            return
    proven: dict = {}        # layers share one mask: prove it once per (mask nodes, shape)
    for site in sites:
        q = site.nodes.get("q")
        k = site.nodes.get("k")
        qv = q.meta.get("example_value", q.meta.get("val")) if isinstance(q, fx.Node) else None
        kv = k.meta.get("example_value", k.meta.get("val")) if isinstance(k, fx.Node) else None
        # hints, not int(): int() on a SymInt adds a guard that specializes the graph
        s = G.as_int(qv.shape[-2]) if isinstance(qv, torch.Tensor) else None
        skv = G.as_int(kv.shape[-2]) if isinstance(kv, torch.Tensor) else None
        try:
            keep = keep_matrix(site, values)
            site.facts["mask_kind"] = classify(keep, site.facts.get("is_causal", False), s, skv)
            site.facts["mask_seen_len"] = skv
        except Exception as e:  # noqa: BLE001
            site.facts["mask_kind"] = f"unknown ({type(e).__name__})"
            continue
        try:
            spec = mask_spec(gm, site, keep, s, skv, example_inputs, proven)
        except Exception as e:  # noqa: BLE001
            spec = f"{type(e).__name__}: {str(e)[:200]}"
        if isinstance(spec, dict):
            site.facts["mask_spec"] = {"window": spec["window"],
                                       "padding": getattr(spec["padding"], "name", None)}
            site.nodes["key_padding"] = spec["padding"]
        else:
            site.facts["mask_spec_reason"] = spec


# ---------------------------------------------------------------- the mask as a spec

def spec_keep(s: int, skv: int, window: int) -> torch.Tensor:
    """[S, Skv] bottom-right causal keep-matrix, limited to ``window`` keys when > 0 (the
    convention of ``longfx::sparse_attention``)."""
    i = torch.arange(s)[:, None] + (skv - s)
    j = torch.arange(skv)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window > 0 else keep


def _window_of(kind: str) -> int | None:
    if kind.startswith("causal"):
        return 0
    if kind.startswith("sliding_window("):
        return int(kind[len("sliding_window("):].split(")")[0])
    return None


def mask_spec(gm: fx.GraphModule, site, keep, s, skv, example_inputs,
              proven: dict | None = None) -> dict | str:
    """Whether the site's mask is exactly ``spec_keep(window) ∧ key_keep[b, j]`` with
    ``key_keep`` the last Skv columns of a 2-D graph input (HF's ``attention_mask``).

    That is what lets a sparse rewrite drop the dense [S, Skv] mask and pass only the
    [B, Skv] padding vector. Checked by evaluating the mask subgraph twice: on the example
    inputs, and with the first key of batch row 0 padded out in each candidate input; both
    results must equal the spec. Returns ``{"window": w, "padding": node | None}`` or why not.
    """
    kind = site.facts.get("mask_kind", "")
    window = _window_of(kind.split("+bias")[0]) if "+bias" not in kind else None
    if window is None:
        return f"the mask is {kind!r}, not causal or a sliding window"
    if keep is None:
        return {"window": 0, "padding": None} if site.facts.get("is_causal") else \
            "no mask and not causal"
    if s is None or skv is None:
        return "query/key lengths unknown"
    nodes = _mask_nodes(site)
    key = (tuple(nodes), window, bool(site.facts.get("is_causal")), s, skv)
    if proven is not None and key in proven:
        return proven[key]
    result = _prove(gm, site, keep, s, skv, example_inputs, nodes, window)
    if proven is not None:
        proven[key] = result
    return result


def _prove(gm, site, keep, s, skv, example_inputs, nodes, window) -> dict | str:
    needed = set(nodes)
    for n in nodes:
        needed |= G.ancestors(n)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for n in placeholders:
        if n not in needed:
            continue
        t = G.tensor_val(n)
        if t is not None and t.dim() == 2 and not t.dtype.is_floating_point \
                and G.as_int(t.shape[-1]) >= skv:
            candidates.append(n)
    concrete = [G.as_int(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]

    def evaluate(inputs) -> torch.Tensor | None:
        rec = _Recorder(gm, set(nodes), needed)
        with torch.no_grad():
            rec.run(*inputs)
        return keep_matrix(site, rec.values)

    def matches(k, pad_vec) -> bool:
        # on the mask's device: a CUDA model's mask compared with a CPU spec would raise,
        # and a raise here means "not the spec" (the rewrite would silently stay dense)
        want = spec_keep(s, skv, window).to(k.device)[None, None]
        if pad_vec is not None:
            want = want & (pad_vec[:, -skv:] != 0).to(k.device)[:, None, None, :]
        k = k.expand(*k.shape[:-2], s, skv) if k.dim() >= 2 else k
        if site.facts.get("is_causal"):
            k = k & torch.ones(s, skv, dtype=torch.bool, device=k.device).tril()
        try:
            return bool((torch.broadcast_to(k, torch.broadcast_shapes(k.shape, want.shape))
                         == torch.broadcast_to(want, torch.broadcast_shapes(k.shape, want.shape))
                         ).all())
        except RuntimeError:
            return False

    if not candidates:
        if matches(keep, None):
            return {"window": window, "padding": None}
        return "the mask is not the causal/window spec and has no 2-D padding input"
    for node in candidates:
        idx = placeholders.index(node)
        value = concrete[idx]
        if not isinstance(value, torch.Tensor) or not matches(keep, value):
            continue
        padded = value.clone()
        padded[0, padded.shape[-1] - skv] = 0             # pad out the first key of row 0
        inputs = list(concrete)
        inputs[idx] = padded
        if matches(evaluate(inputs), padded):
            return {"window": window, "padding": node}
    return ("the mask did not behave as causal/window ∧ padding when its 2-D input was "
            "padded (custom mask kept dense)")
