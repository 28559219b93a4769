"""Sparse attention recipes: canonical ``longfx::attention`` → ``longfx::sparse_attention``.

A sparse site carries a mask *spec* (``sink`` first keys + a ``window`` of recent ones,
causal, bottom-right aligned as in a KV cache) and at most the [B, Skv] padding vector; the
model's dense [S, Skv] mask subgraph loses its last user and is removed. This is only done
when analysis proved what the mask meant (``facts["mask_spec"]``, see
``rewrite/detect/mask_meaning.py``: the mask was evaluated with and without padding and equals
"causal [∧ window] ∧ attention_mask[:, -Skv:]"); any other mask keeps the site dense, with the
reason in the report.

    sink_window(sink=4, window=1024)   StreamingLLM (Xiao et al. 2023): attention sinks +
                                       sliding window; LM-Infinite's Λ-shaped mask
    sliding_window(window=4096)        a plain sliding window (Mistral / Gemma local layers)
    rope_cap(max_distance=L, sink=4)   LM-Infinite (Han et al. 2023): the Λ mask with window L
                                       plus the distance ceiling — sink keys are scored as if
                                       the query stood at most L positions away

Layers that already attend a window (Gemma's local layers, Mistral; from the mask itself or
the config's ``layer_types``/``sliding_window``) keep their own window when it is narrower
than the recipe's: the model was trained that way, and adding sinks there would change it.

Kernels and the dense fallback are the op's business (kernels/sparse_attention/): the rewrite
is the same for every device and length.
"""
from __future__ import annotations

import operator
from dataclasses import field
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.rope.op import OP as ROPE
from longfx.kernels.sparse_attention.op import OP as SPARSE
from longfx.kernels.sparse_attention.reference import density
from longfx.recipes import Recipe, register
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

aten = torch.ops.aten

__all__ = ["SparseRule", "SinkWindow", "SlidingWindow", "RopeCap", "padding_of", "rope_of",
           "rotation_of", "one_query_decode",
           "current_inv_freq", "key_keep", "native_window"]

# ops a query passes through between the rotation and the attention (layout only)
_LAYOUT = ("transpose", "contiguous", "clone", "view", "reshape", "cast", "identity", "permute")


def _opt(default: Any) -> Any:
    return field(default=default, metadata={"omit_default": True})


def native_window(site: Site) -> int:
    """The window the model itself applies at this site (0: none), from the mask analysis
    or, when the example was shorter than the window, from the config's per-layer facts."""
    spec = site.facts.get("mask_spec") or {}
    if spec.get("window"):
        return int(spec["window"])
    windows = site.facts.get("layer_windows") or {}
    w = windows.get(site.layer, windows.get(str(site.layer))) if site.layer is not None else None
    return int(w) if w else 0


def rotation_of(q: fx.Node) -> fx.Node | None:
    """The ``longfx::rope`` node that produced ``q`` (through layout-only ops), if any."""
    node = q
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.target is ROPE:
            return node
        if G.op(node) in _LAYOUT and node.all_input_nodes:
            node = node.all_input_nodes[0]
            continue
        return None
    return None


def rope_of(q: fx.Node, sites: list[Site]) -> Site | None:
    """The RoPE site whose rotation produced ``q`` (through layout-only ops)."""
    node = rotation_of(q)
    if node is None:
        return None
    for site in sites:
        if site.kind == "rope" and node in (site.nodes.get("canonical") or []):
            return site
    return None


def current_inv_freq(site: Site) -> fx.Node | None:
    """The frequency vector the site's table uses now: a rope recipe that ran first inserted
    ``mul(inv_freq, ratio)`` and pointed the table at it."""
    inv = site.nodes.get("inv_freq")
    if not isinstance(inv, fx.Node):
        return None
    for user in inv.users:
        rule = (user.meta.get("longfx") or {}).get("rule", "")
        if str(rule).startswith("rope.") and user.target is aten.mul.Tensor:
            return user
    return inv


def one_query_decode(site: Site, sites: list[Site]) -> bool:
    """A self-attention decode step without a padding mask: one query, no mask node or one
    computed from sizes alone (:func:`mask_from_sizes`), not flagged causal, and keys that come
    from a KV-cache append (a KV site links to this attention as its keys). HF 5.23 builds no
    mask for one query without padding; 5.17 builds one from ``arange`` and comparisons on
    the cache length (SmolLM2). One query at the last position over all cached keys is exactly
    causal, with no padding to carry — though the mask analysis names it "full". The KV link
    keeps cross-attention (one decoder query over encoder keys, where "the last position"
    means nothing) out; a ``kv_quant`` cache has no such KV site (its append and read are
    custom ops), and there the keys being the state's decode read is the link
    (``passes/kv_quant_decode.py:decode_read``)."""
    if site.facts.get("mask_spec") or site.facts.get("mask_kind") != "full":
        return False
    mask = site.nodes.get("mask")
    if (isinstance(mask, fx.Node) and not mask_from_sizes(mask)) or site.facts.get("is_causal"):
        return False
    q = site.nodes.get("q")
    val = q.meta.get("example_value", q.meta.get("val")) if isinstance(q, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and isinstance(val.shape[-2], int)
            and val.shape[-2] == 1):
        return False
    if any(s.kind == "kv" and s.facts.get("attention") == site.key
           and s.facts.get("role") == "key" and _appends_one(s) for s in sites):
        return True
    from longfx.passes.kv_quant_decode import decode_read      # a kv_quant cache's decode read

    node = site.nodes.get("canonical")
    k = node.args[1] if isinstance(node, fx.Node) and node.target in (DENSE, SPARSE) \
        else site.nodes.get("k")
    return not isinstance(decode_read(k), str)


def mask_from_sizes(mask: fx.Node) -> bool:
    """Whether ``mask`` is computed from sizes alone: no tensor input, buffer or parameter
    among its ancestors (only symbolic or constant lengths feeding ``arange`` and
    comparisons), so it cannot carry padding."""
    for n in G.ancestors(mask) | {mask}:
        if n.op == "get_attr":
            return False
        if n.op == "placeholder" and not isinstance(G.val(n), (int, torch.SymInt)):
            return False
    return True


def _appends_one(kv: Site) -> bool:
    """The KV append adds exactly one token (this step's own key): a cross-attention cache
    filled on the first decode step appends the whole encoder output instead."""
    new = kv.nodes.get("new")
    val = new.meta.get("example_value", new.meta.get("val")) if isinstance(new, fx.Node) else None
    axis = kv.facts.get("axis")
    return isinstance(val, torch.Tensor) and isinstance(axis, int) and -val.dim() <= axis < \
        val.dim() and isinstance(val.shape[axis], int) and val.shape[axis] == 1


def padding_or_reason(site: Site, sites: list[Site]):
    """For a rule that replaces a dense attention by a sparse one: the key padding
    (``padding_of``), or why the site stays — a str: padding it cannot read, or a native
    window of the model's own (Gemma/Mistral local layers are left as they are)."""
    pad = padding_of(site, sites)
    if isinstance(pad, str):
        return pad
    native = native_window(site)
    if native:
        return f"the layer attends a native window of {native}; left as the model has it"
    return pad


def padding_of(site: Site, sites: list[Site] | None = None) -> fx.Node | None | str:
    """The 2-D padding input the site's mask and-s in (None: no padding), or why the mask is
    not "causal [∧ window] ∧ padding" — the only masks a rewrite may drop. With ``sites`` (all
    sites of the graph), a maskless one-query decode step fed by a KV cache counts as causal
    without padding (:func:`one_query_decode`)."""
    spec = site.facts.get("mask_spec")
    if not spec:
        if sites is not None and one_query_decode(site, sites):
            return None
        why = site.facts.get("mask_spec_reason") or \
            f"mask {site.facts.get('mask_kind', 'unknown')!r}"
        return f"mask not understood as causal/window + padding ({why}); kept dense"
    pad = site.nodes.get("key_padding")
    if spec.get("padding") and not isinstance(pad, fx.Node):
        return "the padding input of the mask is not a graph value"
    return pad if spec.get("padding") else None


class SparseRule(Rule):
    """Attach a sink/window spec (and optionally the distance cap) to an attention site.

    ``sink``/``window``: the spec; ``cap``: LM-Infinite's ceiling (0: none). With ``amend``
    the rule only sets the cap on a site a previous sparse rule already made sparse, and
    otherwise makes it sparse with its own sink/window (``rope_cap`` alone)."""

    kind = "attention"
    stage = "transform"

    def __init__(self, name: str, sink: int, window: int, cap: int | None = None,
                 amend: bool = False, recipe: str = ""):
        self.name = name
        self.sink, self.window, self.cap, self.amend = int(sink), int(window), cap, amend
        self.recipe = recipe
        self._sites: list[Site] = []

    def prepare(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        self._sites = sites                         # the cap looks up the RoPE sites

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("sparse") or site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.target not in (DENSE, SPARSE):
            return site.reason or "the site is not canonical (no longfx::attention to rewrite)"
        if node.target is SPARSE and not self.amend:
            return f"already sparse ({site.facts.get('sparse')}): one sparse recipe per site"
        facts: dict[str, Any] = {"node": node}
        cap = 0
        if self.cap is not None:                   # rope_cap: 0 means "the trained length"
            cap = int(self.cap) or int(site.facts.get("trained_length") or 0)
            if cap <= 0:
                return "rope_cap: no max_distance given and the trained length is unknown"
        if node.target is SPARSE:                  # amend a sparse site: keep its spec
            sink, window = int(node.args[6]), int(node.args[7])
        else:
            pad = padding_of(site, self._sites)
            if isinstance(pad, str):
                return pad
            facts["padding"] = pad
            sink, window = self.sink, self.window or cap
            native = native_window(site)
            if native and native <= window:
                sink, window = 0, native            # the model's own local layer, unchanged
            facts["native"] = native
        if cap and sink:
            if window <= 0 or window > cap:
                return f"rope_cap: window {window} must be in 1..max_distance ({cap})"
            rope = rope_of(node.args[0], self._sites)
            if rope is None:
                return "rope_cap: no RoPE rotation found on this site's queries"
            inv = current_inv_freq(rope)
            if inv is None or rope.facts.get("style") not in ("rotate_half", "interleaved",
                                                              "complex"):
                return "rope_cap: the query rotation's frequency vector is not in the graph"
            facts.update(inv_freq=inv, rope_style=rope.facts["style"])
        else:
            cap = 0                                 # no sinks: every key is within the window
        facts.update(sink=sink, window=window, cap=cap)
        return facts

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        g = gm.graph
        made: list[fx.Node] = []
        with g.inserting_before(node):
            if node.target is SPARSE:
                q, k, v, keep, scale, softcap = node.args[:6]
            else:
                q, k, v, _mask, scale, _causal, softcap = node.args
                keep = None
                if facts["padding"] is not None:
                    keep = key_keep(g, made, facts["padding"], k)
            inv, style = None, "rotate_half"
            if facts["cap"]:
                inv = G.call(g, made, aten.reshape.default, facts["inv_freq"], [-1])
                style = facts["rope_style"]
            new = G.call(g, made, SPARSE, q, k, v, keep, scale, softcap, facts["sink"],
                         facts["window"], facts["cap"], inv, style)
        replace_uses(node, new)
        site.nodes["sparse"] = new
        spec = f"sink={facts['sink']}, window={facts['window']}" + \
            (f", cap={facts['cap']}" if facts["cap"] else "")
        site.facts["sparse"] = spec
        site.facts["sparse_spec"] = {"sink": facts["sink"], "window": facts["window"],
                                     "cap": facts["cap"]}
        if facts.get("native"):
            site.facts["native_window"] = facts["native"]
        return made


def key_keep(g: fx.Graph, made: list, pad: fx.Node, k: fx.Node) -> fx.Node:
    """bool [B, Skv]: the last Skv columns of the 2-D padding input (KV-cache alignment)."""
    total = G.call(g, made, aten.sym_size.int, pad, 1)
    skv = G.call(g, made, aten.sym_size.int, k, 2)
    start = G.call(g, made, operator.sub, total, skv)
    tail = G.call(g, made, aten.slice.Tensor, pad, 1, start, total)      # [B, Skv]
    return G.call(g, made, aten.ne.Scalar, tail, 0)


def spec_density(site: Site, context: int) -> float:
    """Fraction of the causal score matrix a sparse site computes at ``context`` tokens."""
    spec = site.facts.get("sparse_spec") or {}
    return density(context, context, int(spec.get("sink", 0)), int(spec.get("window", 0)))


# ==============================================================================================
# Recipes


def _positive(name: str, value: int, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value!r}")


@register("sink_window")
class SinkWindow(Recipe):
    """Attention sinks + sliding window (StreamingLLM; LM-Infinite's Λ mask): each query
    attends the first ``sink`` keys and the ``window`` most recent ones."""

    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        _positive("sink_window: sink", self.sink, allow_zero=True)
        _positive("sink_window: window", self.window)

    def rules(self) -> list:
        return [SparseRule("sparse.sink_window", self.sink, self.window, recipe=str(self))]


@register("sliding_window")
class SlidingWindow(Recipe):
    """A plain sliding window: each query attends its ``window`` most recent keys."""

    window: int = 4096

    def __post_init__(self):
        _positive("sliding_window: window", self.window)

    def rules(self) -> list:
        return [SparseRule("sparse.sliding_window", 0, self.window, recipe=str(self))]


@register("rope_cap")
class RopeCap(Recipe):
    """LM-Infinite's distance ceiling (Han et al. 2023): no query–key distance seen by
    attention exceeds ``max_distance`` (default: the trained length). Alone it brings the
    Λ mask (``sink`` keys + a window of ``max_distance``); after ``sink_window`` it caps that
    recipe's sinks instead."""

    max_distance: int | None = None
    sink: int = _opt(4)

    def __post_init__(self):
        if self.max_distance is not None:
            _positive("rope_cap: max_distance", self.max_distance)
        _positive("rope_cap: sink", self.sink)

    def rules(self) -> list:
        return [SparseRule("sparse.rope_cap", self.sink, 0, cap=self.max_distance or 0,
                           amend=True, recipe=str(self))]
