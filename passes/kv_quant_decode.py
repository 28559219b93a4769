"""Lowering of a ``kv_quant(...)`` decode step: the cache read and the attention become one op.

A ``kv_quant`` cache (runtime/cache.py) hands a one-token decode step's attention the whole
state after the append, dequantized, with the first ``sink`` positions read from the exact
copy the layer keeps. Captured, a decode step's attention is this chain (HF models, any
spelling of the attention that canonicalization turned into ``longfx::attention``)::

    kv_quant_append(k_codes, ..., length_t, k_new, v_new, bits, group, clip)   # mutates it
    kd, vd = kv_quant_read(k_codes, ..., length, bits, group, residual, scales)
    keys   = cat(sink_k[:, :, :m].to(dtype), kd[:, :, m:], dim=2)        # m = min(sink, length)
    values = cat(sink_v[:, :, :m].to(dtype), vd[:, :, m:], dim=2)        # (absent when sink=0)
    out    = longfx::attention(q, keys, values, mask, scale, False, 0.0)

:class:`FusedQuantDecode` replaces ``read → cat → attention`` by
``longfx::kv_quant_attention(q, k_codes, ..., length_t, scale, bits, group, sink_k, sink_v
[, window])``:
on CUDA the split-KV Triton decode over the packed codes, dequantized in registers (KIVI's
fused kernel, Liu et al. 2024, arXiv:2402.02750; Flash-Decoding's split-KV, Dao et al. 2023),
so a decode step no longer writes and reads a dequantized copy of every layer's cache; the
reference (dequantize, then attend) elsewhere. The op computes exactly what the chain computes
(``reference.attention_decode`` with sinks = ``with_sinks(dequantize_state)`` + attention).

``rotate=true`` (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456): the state holds ``K·Q``,
``V·Q`` and the chain un-rotates the read, ``kd = kv_rotate(kd_stored, rot, inverse=True)``
(same for ``vd``), before the sink cat. Then ``q·kdᵀ = (q·Q)·kd_storedᵀ`` and
``p·vd = (p·vd_stored)·Qᵀ``, and with ``Q`` orthogonal the exact sink copy in the stored basis
is ``sink·Q``, so the step becomes::

    out = kv_rotate(kv_quant_attention(kv_rotate(q, rot), *state, ..., kv_rotate(sink_k, rot),
                                       kv_rotate(sink_v, rot)), rot, inverse=True)

(QuaRot rotates queries and keys alike and folds the value rotation into the output
projection; here the output is un-rotated explicitly). Two [S, D]·[D, D] products per step and
two of the sink copy's n tokens, against un-rotating the whole read. The rotation is the graph
input Dynamo lifts from the cache layer's ``rot`` (a placeholder; a get_attr is taken too).
``clip=true`` changes only the append (its ``clip`` argument), not the read.

Sliding-window layers (Gemma's local layers, Mistral): the layer's cache (``QuantizedKVLayer``
with ``window=W`` from the config, runtime/cache.py ``_trim``) drops only whole packed groups,
so it holds up to W − 1 + group − 1 + ring tokens, and the model's sliding mask
(``kv_idx > q_idx − W``, built from the cache's (length, offset) sizes, so it lines up with
the held keys) hides the excess. :func:`decode_window` proves that the mask is that mask
with the W the config gives the layer's cache, and the op gets ``window=W``: the query, at
held index L − 1, sees held keys >= L − W, the exact sink copy included (before the layer's
first trim drops it). On CUDA the Triton decode then visits only the packed tiles from the
window's on (``kernels/kv_quant/triton.py``, ``wnd``), so the step's cost follows W, not what
the layer holds.

It is a ``lower``-stage rule: it runs after every recipe's transforms, so it takes only an
attention no other recipe changed (a ``sink_window`` or ``self_extend`` site, or keys a RoPE
recipe re-rotates, break the chain and stay as they are). It also leaves alone, with the
reason in the report:

* prefill chunks (more than one query, or keys that are the read *and* the chunk);
* a mask that is neither provably "every key visible" nor the layer's sliding window
  (:func:`decode_window`): a mask with tensor inputs (padding), a window that is not the one
  the config gives the layer (``layer_windows`` facts), a sliding layer whose mask showed
  more keys visible than its window or that has no mask, ``is_causal`` (top-left for one
  query);
* GEAR states (``gear_read``: the correction is added on read), softcap.

Key width (``key_bits``, ``key_layers``) is not the rule's business: the op reads it off the
state's tensors and takes the path that serves it (``kernels/kv_quant/op.py``).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from longfx.kernels.attention.op import OP as DENSE
from longfx.kernels.kv_quant import op as kv_op
from longfx.passes.sparse import mask_from_sizes
from longfx.rewrite import graph as G
from longfx.rewrite.rule import Rule, replace_uses
from longfx.rewrite.sites import Site

__all__ = ["FusedQuantDecode", "decode_read", "decode_window"]

SEQ_DIM = 2          # [B, Hkv, L, D]


def _seq_slice(node: Any) -> tuple[fx.Node, Any, Any] | None:
    """``x[:, :, a:b]`` (a Dynamo ``getitem`` with a tuple of slices or ``aten.slice`` on dim 2)
    as ``(x, a, b)``; None for anything else."""
    if not isinstance(node, fx.Node):
        return None
    if G.op(node) == "getitem" and len(node.args) == 2 and isinstance(node.args[1], tuple):
        src, idx = node.args
        if len(idx) == 3 and all(isinstance(s, slice) for s in idx) \
                and idx[0] == slice(None) and idx[1] == slice(None) and idx[2].step in (None, 1):
            return src, idx[2].start, idx[2].stop
        return None
    if G.op(node) == "slice":
        src, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        rank = G.rank(src)
        if G.norm_dim(dim, rank) == SEQ_DIM and (len(node.args) < 5 or node.args[4] == 1):
            start = node.args[2] if len(node.args) > 2 else None
            stop = node.args[3] if len(node.args) > 3 else None
            return src, start, stop
    return None


def _strip_cast(node: Any) -> Any:
    """The input of a dtype cast (``x.to(dtype)``), else ``node``."""
    return node.args[0] if G.op(node) == "cast" else node


def _read_output(node: Any) -> tuple[fx.Node, int] | None:
    """``(read, i)`` when ``node`` is output ``i`` of a ``longfx::kv_quant_read``."""
    if isinstance(node, fx.Node) and node.op == "call_function" \
            and node.target is operator.getitem and len(node.args) == 2 \
            and isinstance(node.args[1], int):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target is kv_op.READ:
            return src, node.args[1]
    return None


def _unrotated_read(node: Any) -> tuple[fx.Node, int, fx.Node | None] | None:
    """``(read, i, rot)`` when ``node`` is output ``i`` of a ``kv_quant_read``, either directly
    (``rot`` None) or un-rotated by ``longfx::kv_rotate(read[i], rot, inverse=True)`` — a
    ``rotate=true`` cache's read back into the model's basis (runtime/cache.py)."""
    rot = None
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is kv_op.ROTATE:
        x = node.args[0]
        rot = node.args[1] if len(node.args) > 1 else node.kwargs.get("rot")
        inverse = node.args[2] if len(node.args) > 2 else node.kwargs.get("inverse", False)
        if inverse is not True:
            return None
        node = x
    got = _read_output(node)
    return None if got is None else (*got, rot)


def _kv_input(node: Any) -> tuple[fx.Node, int, fx.Node | None, Any, fx.Node | None] | str:
    """What feeds an attention's key or value input: ``(read, output index, sink copy or None,
    m, rotation or None)`` or why it is not the cache's decode read."""
    direct = _unrotated_read(node)
    if direct is not None:
        read, i, rot = direct
        return read, i, None, None, rot
    if G.op(node) != "cat":
        return "its keys/values are not the kv_quant state's read"
    parts, dim = G.arg(node, "tensors"), G.arg(node, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 \
            or G.norm_dim(dim, G.rank(node)) != SEQ_DIM:
        return "its keys/values join more than the state's read and its sink copy"
    head, tail = _seq_slice(_strip_cast(parts[0])), _seq_slice(parts[1])
    if head is None or tail is None:
        return "its keys/values join more than the state's read and its sink copy"
    sink, start, m = head
    src, m_tail, stop = tail
    got = _unrotated_read(src)
    if got is None:
        return "its keys/values are not the kv_quant state's read (a prefill chunk, or " \
               "keys changed after the read)"
    if start not in (None, 0) or stop is not None or m is not m_tail and m != m_tail:
        return "the sink copy and the state's read do not meet at one position"
    if not isinstance(sink, fx.Node) or sink.op != "placeholder":
        return "the sink copy is not a state input"
    read, i, rot = got
    return read, i, sink, m, rot


def decode_read(k: Any) -> tuple[fx.Node, fx.Node, fx.Node | None, Any] | str:
    """``(read, append, sink copy or None, m)`` when the attention keys ``k`` are a kv_quant
    cache's decode read — the whole state after this step's append, its sinks exact, un-rotated
    when the cache is ``rotate=true`` — or why not. Other rules use it to recognise a decode
    step over a quantized cache as self-attention over a KV cache
    (``passes/sparse.py:one_query_decode``)."""
    got = _decode_read(k)
    return got if isinstance(got, str) else got[:4]


def _decode_read(k: Any) -> tuple[fx.Node, fx.Node, fx.Node | None, Any, fx.Node | None] | str:
    """:func:`decode_read` and the rotation the read is un-rotated by (None: not rotated)."""
    got = _kv_input(k)
    if isinstance(got, str):
        return got
    read, i, sink, m, rot = got
    if i != 0:
        return "the keys are the read's values"
    append = _append_of(read)
    if append is None:
        return "no kv_quant_append of the same state before the read"
    if any(a is not b for a, b in zip(read.args[:6], append.args[:6])):
        return "the read and the append do not share the state tensors"
    return read, append, sink, m, rot


def _declared_window(site: Site) -> int:
    """The window the config declares for the site's layer (``layer_windows`` facts, from
    ``longfx/api.py:model_facts``; 0: none): the one ``QuantizedCache`` gives that layer's
    cache (runtime/cache.py reads the same config fields for sliding layers)."""
    windows = site.facts.get("layer_windows") or {}
    w = windows.get(site.layer, windows.get(str(site.layer))) if site.layer is not None else None
    return int(w) if w else 0


def decode_window(site: Site, mask: Any) -> int | str:
    """Which held keys a one-query decode step's ``mask`` lets the query see: 0 (all of them)
    or W (the last W: a sliding layer), or why neither is proven.

    * no mask, or a mask from sizes (``mask_from_sizes``: no tensor input that could carry
      padding) that the analysis names "full", on a layer with no declared window: 0;
    * a mask from sizes the analysis read as ``sliding_window(W)`` (no padding; HF's sliding
      overlay ``kv_idx > q_idx − W``, built from the cache's (length, offset) sizes, so it
      lines up with the held keys), W the window the config declares for the layer: W;
    * the same mask on an example no longer than the window (it showed every key visible,
      "full"), on a layer the config declares sliding with W >= the keys it saw: W.

    Anything else is refused: a mask with tensor inputs, a window that is not the config's
    (or one the config declares but the mask did not show at a longer example), a sliding layer
    with no mask."""
    if isinstance(mask, fx.Node) and not mask_from_sizes(mask):
        return "the mask has tensor inputs (padding?): not every cached key is visible"
    spec, kind = site.facts.get("mask_spec") or {}, site.facts.get("mask_kind")
    declared = _declared_window(site)
    if spec.get("window") and not spec.get("padding"):
        w = int(spec["window"])
        if w != declared:
            return f"the mask's window of {w} is not the one the config gives the layer's " \
                   f"cache ({declared or 'none'})"
        return w
    if spec or kind not in (None, "full"):
        return f"mask {kind!r}: not every cached key is visible"
    if not declared:
        return 0
    if not isinstance(mask, fx.Node):
        return f"the config gives the layer a window of {declared} but its decode step has " \
               "no mask: the cache holds keys the model attends and the window would hide"
    seen = site.facts.get("mask_seen_len")
    if not isinstance(seen, int) or seen > declared:
        return f"the config gives the layer a window of {declared}, but its mask showed " \
               f"all of {seen} keys visible"
    return declared


def _append_of(read: fx.Node) -> fx.Node | None:
    """The ``kv_quant_append`` that wrote the state ``read`` reads, before it in the graph."""
    codes = read.args[0]
    order = {n: i for i, n in enumerate(read.graph.nodes)}
    found = [u for u in codes.users if u.target is kv_op.APPEND and u.args[0] is codes
             and order[u] < order[read]]
    return found[-1] if found else None


class FusedQuantDecode(Rule):
    """``kv_quant_read → (sink cat) → longfx::attention`` of a one-token decode step becomes
    ``longfx::kv_quant_attention`` over the packed state (module docstring)."""

    name = "kv_quant.fused_decode"
    kind = "attention"
    stage = "lower"

    def check(self, site: Site, gm: fx.GraphModule) -> dict[str, Any] | str:
        node = site.nodes.get("canonical")
        if not isinstance(node, fx.Node) or node.graph is not gm.graph:
            return site.reason or "the site is not canonical (no longfx::attention)"
        if node.target is not DENSE or getattr(node, "_erased", False) or not node.users:
            return "another recipe rewrote this attention; its keys are read dequantized"
        q, k, v, mask, scale, is_causal, softcap = node.args
        qv = G.val(q)
        if not (isinstance(qv, torch.Tensor) and qv.dim() == 4 and isinstance(qv.shape[2], int)
                and qv.shape[2] == 1):
            return "not a one-token decode step (prefill attends in full precision)"
        keys, values = _decode_read(k), _kv_input(v)
        for got in (keys, values):
            if isinstance(got, str):
                return got
        (kread, append, ksink, km, krot), (vread, vi, vsink, vm, vrot) = keys, values
        if kread is not vread or vi != 1:
            return "keys and values do not come from one state read"
        if (ksink is None) != (vsink is None) or (km is not vm and km != vm):
            return "keys and values do not take the same sink copy"
        if krot is not vrot:
            return "keys and values are not un-rotated by one rotation"
        if krot is not None and not self._rotation_ok(krot, qv):
            return "the rotation is not a [D, D] state input"
        if is_causal or softcap:
            return "is_causal/softcap attention: the fused decode computes plain attention"
        window = decode_window(site, mask)
        if isinstance(window, str):
            return window
        state = kread.args[:6]
        qv_dtype, ring = qv.dtype, G.val(state[4])
        if isinstance(ring, torch.Tensor) and ring.dtype != qv_dtype:
            return f"queries are {qv_dtype}, the state holds {ring.dtype}"
        return {"node": node, "state": state, "length": append.args[6],
                "bits": kread.args[7], "group": kread.args[8], "scale": scale,
                "sink_k": ksink, "sink_v": vsink, "rot": krot, "window": window}

    @staticmethod
    def _rotation_ok(rot: fx.Node, qv: torch.Tensor) -> bool:
        """The layer's rotation: an input of the graph (Dynamo lifts the cache layer's ``rot``
        tensor as a placeholder; a get_attr is taken too), [D, D] for the queries' head dim."""
        if not isinstance(rot, fx.Node) or rot.op not in ("placeholder", "get_attr"):
            return False
        val = G.val(rot)
        if val is None and rot.op == "get_attr":                  # a constant of the module
            val = rot.graph.owning_module
            for part in str(rot.target).split("."):
                val = getattr(val, part, None)
        D = qv.shape[-1]
        return isinstance(val, torch.Tensor) and val.dim() == 2 and tuple(val.shape) == (D, D)

    def replace(self, site: Site, gm: fx.GraphModule, facts: dict[str, Any]) -> list[fx.Node]:
        node: fx.Node = facts["node"]
        made: list[fx.Node] = []
        q, rot = node.args[0], facts["rot"]
        sink_k, sink_v = facts["sink_k"], facts["sink_v"]
        with gm.graph.inserting_before(node):
            if rot is not None:      # the state holds K·Q, V·Q: attend with q·Q (and sinks·Q)
                q = G.call(gm.graph, made, kv_op.ROTATE, q, rot, False)
                if sink_k is not None:
                    sink_k = G.call(gm.graph, made, kv_op.ROTATE, sink_k, rot, False)
                    sink_v = G.call(gm.graph, made, kv_op.ROTATE, sink_v, rot, False)
            window = (facts["window"],) if facts["window"] else ()       # 0: the default
            new = G.call(gm.graph, made, kv_op.ATTENTION, q, *facts["state"],
                         facts["length"], facts["scale"], facts["bits"], facts["group"],
                         sink_k, sink_v, *window)
            if rot is not None:      # softmax·(V·Q) = (softmax·V)·Q: back by Qᵀ
                new = G.call(gm.graph, made, kv_op.ROTATE, new, rot, True)
        replace_uses(node, new)
        site.nodes["canonical"] = new
        site.facts["kv_decode"] = "fused"
        site.facts["kv_decode_window"] = facts["window"]
        return made
