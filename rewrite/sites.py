"""The sites analysis finds: attention, RoPE and KV-state computations in an FX graph.

A site is a dataflow signature, not a module class. Detection lives in ``rewrite/detect/``
(one file per kind); this file holds the records they produce, which the report, the
canonicalization rules and the CLI all read. Each site keeps the FX nodes it was found on
(``nodes``; not serialized) and plain facts (``facts``; JSON-safe). A near-miss is a site with
``rewritable=False`` and a ``reason`` saying which check failed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from longfx.rewrite import graph as G


@dataclass(eq=False)
class Site:
    """One place in a graph that a rewrite family acts on."""

    kind: str                      # "attention" | "rope" | "kv"
    index: int = 0                 # order of discovery within its kind (graph order)
    layer: int | None = None       # block index from nn_module_stack, when recorded
    module: str = ""               # module path from nn_module_stack, when recorded
    spelling: str = ""             # how it was written: "sdpa", "eager", "rotate_half", "cat", ...
    rewritable: bool = True
    reason: str | None = None      # why not rewritable (near-miss), None otherwise
    facts: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """Stable name of the site within its graph: ``attention[3]``; the graph-site key
        calibration data and per-site settings are stored under."""
        return f"{self.kind}[{self.index}]"

    def reject(self, reason: str) -> "Site":
        self.rewritable = False
        self.reason = reason
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {
            "key": self.key, "kind": self.kind, "layer": self.layer, "module": self.module,
            "spelling": self.spelling, "rewritable": self.rewritable, "reason": self.reason,
        }
        out.update({k: _jsonable(v) for k, v in self.facts.items()})
        return out


@dataclass(eq=False)
class AttentionSite(Site):
    """softmax(q·kᵀ·scale + mask)·v, written as one SDPA call or spelled out.

    nodes: ``q``, ``k``, ``v`` (k/v before any GQA repeat), ``mask`` (bool keep-mask or
    additive float, or None), ``output`` (the node whose value the site produces), plus the
    spelling's own nodes (``softmax``, ``qk``, ``pv``...). facts: ``scale``, ``is_causal``,
    ``softcap``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``gqa`` (how repeats were
    written), ``mask_kind`` ("causal", "sliding_window(w)", "full", "padding", "custom", ...).
    """

    kind: str = "attention"


@dataclass(eq=False)
class RopeSite(Site):
    """A rotary position embedding: the frequency table and where it is applied.

    nodes: ``inv_freq`` (the frequency vector node), ``cos`` and ``sin`` (or ``freqs_cis``
    for the complex spelling), ``applications``: list of dicts with the ``input`` and
    ``output`` node of each rotation (q and k). facts: ``style`` ("rotate_half",
    "interleaved", "complex"), ``rotary_dim``, ``head_dim``, ``attention_scaling``.
    """

    kind: str = "rope"


@dataclass(eq=False)
class KVSite(Site):
    """The KV state read/append that feeds an attention site.

    nodes: ``past`` (state read), ``new`` (this step's keys or values), ``result`` (the full
    keys/values the attention reads). facts: ``role`` ("key" | "value"), ``axis`` (sequence
    axis), ``attention`` (key of the attention site it feeds), ``static`` (fixed buffer).
    """

    kind: str = "kv"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return _jsonable(dataclasses.asdict(v))
    if isinstance(v, fx.Node):
        return v.name
    return str(v)


def locate(site: Site, node: fx.Node) -> None:
    """Fill ``layer`` and ``module`` from the node's recorded module stack."""
    site.module = G.module_path(node)
    site.layer = G.layer_index(node)


def analyze(gm: fx.GraphModule, example_inputs: Any = None) -> list[Site]:
    """All sites of ``gm``: attention first, then RoPE, then KV, each in graph order.

    ``example_inputs`` (real tensors), when given, let the analysis evaluate masks to name
    their meaning (causal, sliding window...).
    """
    from longfx.rewrite.detect.attention import find_attention
    from longfx.rewrite.detect.kv import find_kv
    from longfx.rewrite.detect.rope import find_rope

    attention = find_attention(gm, example_inputs)
    rope = find_rope(gm, example_inputs)
    kv = find_kv(gm, attention)
    return [*attention, *rope, *kv]
