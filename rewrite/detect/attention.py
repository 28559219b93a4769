"""Attention sites: softmax(q·kᵀ·scale + mask)·v, however it is written.

Two spellings reach the same record (:class:`AttentionSite`):

* one ``scaled_dot_product_attention`` node (torch level, or aten level from torch.export);
* spelled out ("eager"): a contraction over the head dim, then scale / softcap / mask ops in
  any order HF, nanoGPT or Meta's reference code write them, a row softmax (maybe with an fp32
  upcast), dropout, and a second contraction with v. The structure is the dataflow signature
  itself — two contractions around a row softmax — so no class or module name is consulted
  (the way Inductor's fused-attention patterns key on ops, but as one walk instead of thirty
  numbered patterns).

GQA written as repeat_kv (expand + reshape, HF) or ``repeat_interleave`` (Meta) is stripped
back to the un-repeated k/v, so the canonical op sees [B, Hkv, Skv, D] and does the grouping.
Every row softmax that fails a check is kept as a near-miss with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from longfx.rewrite import graph as G
from longfx.rewrite.sites import AttentionSite, locate

# Ops a value passes through unchanged in meaning (dtype casts, clones, dropout at p=0).
_PASS = ("cast", "identity")
_NEG_LIMIT = -1e4   # a fill value at or below this acts as "masked out" (HF uses finfo.min)


@dataclass
class _Scores:
    """What the walk from the softmax back to the q·kᵀ contraction collected."""

    qk: fx.Node | None = None
    q: Any = None
    kt: Any = None
    scale: float = 1.0
    softcap: float = 0.0
    masks: list = field(default_factory=list)   # (node, kind, scale_after) kind: "add"|"keep"|"drop"
    scale_nodes: list = field(default_factory=list)   # (node, power): run-time scale factors
    reason: str | None = None


def find_attention(gm: fx.GraphModule, example_inputs: Any = None) -> list[AttentionSite]:
    """Every attention site (and near-miss) of ``gm`` in graph order."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        name = G.op(node)
        if name in ("sdpa", "sdpa_cpu_flash"):
            sites.append(_sdpa_site(node))
        elif name == "softmax":
            site = _eager_site(node)
            if site is not None:
                sites.append(site)
    for i, site in enumerate(sites):
        site.index = i
    if example_inputs is not None:
        from longfx.rewrite.detect.mask_meaning import name_masks
        name_masks(gm, sites, example_inputs)
    return sites


# ---------------------------------------------------------------- SDPA spelling

def _sdpa_site(node: fx.Node) -> AttentionSite:
    site = AttentionSite(spelling="sdpa")
    locate(site, node)
    q, k, v = (G.arg(node, n) for n in ("query", "key", "value"))
    mask = G.arg(node, "attn_mask")
    dropout = G.scalar(G.arg(node, "dropout_p", 0.0)) or 0.0
    causal = bool(G.arg(node, "is_causal", False))
    scale = G.arg(node, "scale")
    gqa_flag = bool(G.arg(node, "enable_gqa", False))
    site.nodes.update(output=node, sdpa=node)
    if G.op(node) == "sdpa_cpu_flash":
        # returns (out, logsumexp): the site's value is element 0
        outs = [u for u in node.users if G.op(u) == "getitem" and u.args[1] == 0]
        if len(outs) != 1:
            return _finish(site, q, k, v, None, 1.0, causal, 0.0, "sdpa", reject="flash-for-cpu output not read as element 0")
        site.nodes["output"] = outs[0]
    if dropout:
        return _finish(site, q, k, v, mask, scale, causal, 0.0, "none",
                       reject=f"dropout_p={dropout} is active (training-mode attention)")
    if scale is not None and G.scalar(scale) is None:
        sym = G.sym_scalar(scale)
        if sym is None:
            return _finish(site, q, k, v, mask, 1.0, causal, 0.0, "none",
                           reject="scale is neither a constant nor a run-time scalar")
        site.nodes["scale_nodes"] = [(sym[0], 1)]
        site.facts["scale_seen"] = sym[1]
        scale = 1.0                       # the constant part; the node supplies the rest
    if scale is None:
        d = G.shape(q)[-1] if G.shape(q) else None
        scale_value = 1.0 / math.sqrt(G.as_int(d)) if G.as_int(d) else None
        if scale_value is None:
            return _finish(site, q, k, v, mask, 1.0, causal, 0.0, "none",
                           reject="head dim unknown (no example value on q)")
    else:
        scale_value = G.scalar(scale)
    k0, v0, gqa = _strip_repeat(k, v)
    if gqa == "none" and gqa_flag:
        gqa = "enable_gqa"
    return _finish(site, q, k0, v0, mask, scale_value, causal, 0.0, gqa)


# ---------------------------------------------------------------- eager spelling

def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    x = G.arg(softmax, "input")
    xr = G.rank(x)
    dim = G.norm_dim(G.arg(softmax, "dim", -1), xr)
    # Only row softmaxes that feed a contraction or come from one are candidates; a softmax
    # elsewhere (gating, classification heads) is simply not attention and not reported.
    pv = _find_pv(softmax)
    scores = _walk_scores(x)
    if pv is None and scores.qk is None:
        return None
    site = AttentionSite(spelling="eager")
    locate(site, softmax)
    site.nodes["softmax"] = softmax
    if pv is None:
        site.nodes["output"] = softmax
        return site.reject("softmax feeds no second contraction with v "
                           "(attention probabilities used elsewhere, or not attention)")
    pv_node, probs_problem = pv
    site.nodes["output"] = pv_node
    site.nodes["pv"] = pv_node
    if xr is None or dim != xr - 1:
        return site.reject(f"softmax over axis {dim}, not the last (key) axis")
    if scores.reason:
        return site.reject(scores.reason)
    if scores.qk is None:
        return site.reject("no q·kᵀ contraction found before the softmax")
    if probs_problem:
        return site.reject(probs_problem)
    if softmax_extra_users(softmax, pv_node):
        return site.reject("attention probabilities are also used elsewhere "
                           "(e.g. returned with output_attentions=True)")
    site.nodes.update(qk=scores.qk)
    v = pv_node.args[1]
    # k arrives transposed: (.., D, Skv). Undo a transpose of the last two axes when present,
    # otherwise insert one in the replacement (recorded as facts["k_layout"]).
    kt = scores.kt
    k = _untranspose(kt)
    site.facts["k_transposed_in_graph"] = k is None
    if k is None:
        k = kt
    k0, v0, gqa = _strip_repeat(k, v)
    mask = None
    for m in scores.masks:
        site.nodes.setdefault("mask_parts", []).append(m)
    if scores.masks:
        mask = "parts"
    if scores.scale_nodes:
        site.nodes["scale_nodes"] = scores.scale_nodes
    return _finish(site, scores.q, k0, v0, mask, scores.scale, False, scores.softcap, gqa)


def softmax_extra_users(softmax: fx.Node, pv: fx.Node) -> bool:
    """True when the probabilities reach anything but the v contraction."""
    frontier = [softmax]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u is pv or G.op(u) == "assert_meta":
                continue
            if G.op(u) in (*_PASS, "dropout"):
                frontier.append(u)
            else:
                return True
    return False


def _find_pv(softmax: fx.Node) -> tuple[fx.Node, str | None] | None:
    """The p·v contraction the probabilities flow into (through casts and dropout)."""
    n = softmax
    problem: str | None = None     # why the probabilities are not used as they are
    for _ in range(8):
        nxt = None
        for u in n.users:
            name = G.op(u)
            if name in ("matmul",) and u.args and u.args[0] is n:
                return u, problem
            if name in _PASS and u.args and u.args[0] is n:
                nxt = u
            elif name == "dropout" and u.args and u.args[0] is n:
                p = G.scalar(G.arg(u, "p", 0.5))
                training = G.arg(u, "training", True)
                if p and training is not False:
                    problem = f"dropout p={p} active between softmax and v (training mode)"
                nxt = u
            elif name == "getitem" and G.op(n) == "dropout":
                nxt = u   # aten native_dropout returns (out, mask)
            elif name == "view" and u.args and u.args[0] is n:
                # e.g. Bloom: [B, H, S, Skv] -> [B*H, S, Skv] before bmm. Reported, not taken:
                # the canonical op would need the mask and bias reshaped alike.
                problem = "probabilities are reshaped between the softmax and the v contraction"
                nxt = u
        if nxt is None:
            return None
        n = nxt
    return None


def _walk_scores(x: Any) -> _Scores:
    """Walk back from the softmax input to the q·kᵀ contraction, collecting what sits between."""
    s = _Scores()
    scale_after = 1.0   # product of scales met so far walking backwards (applied after a mask)
    for _ in range(32):
        if not isinstance(x, fx.Node):
            s.reason = "softmax input is not computed in the graph"
            return s
        name = G.op(x)
        if name in _PASS:
            x = x.args[0]
            continue
        if name == "matmul":
            a, b = x.args[0], x.args[1]
            if G.rank(a) is None or G.rank(a) < 3 or G.rank(b) != G.rank(a):
                s.reason = "scores come from a matmul that is not a batched head-dim contraction"
                return s
            s.qk, s.kt = x, b
            s.q = _unscale_q(a, s)
            return s
        if name == "baddbmm":
            bias, b1, b2 = (G.arg(x, n) for n in ("input", "batch1", "batch2"))
            beta = G.scalar(G.arg(x, "beta", 1.0))
            alpha = G.scalar(G.arg(x, "alpha", 1.0))
            if beta is None or alpha is None:
                s.reason = "baddbmm with non-constant alpha/beta"
                return s
            if beta != 0.0 and isinstance(bias, fx.Node):
                s.masks.append((bias, "add", scale_after * beta))
            s.scale *= alpha
            s.qk, s.kt = x, b2
            s.q = _unscale_q(b1, s)
            return s
        if name in ("mul", "div"):
            c, rest, sym = _const_factor(x)
            if sym is not None:
                s.scale_nodes.append(sym)
            if c is None:
                s.reason = f"scores {name} by a non-constant tensor"
                return s
            inner = _softcap_tail(rest, c) if name == "mul" else None
            if inner is not None:           # mul(tanh(div(y, cap)), cap)
                if scale_after != 1.0:
                    s.reason = "scores scaled after logit softcapping"
                    return s
                s.softcap = c
                x = inner
                continue
            s.scale *= c
            if not s.softcap:
                scale_after *= c
            x = rest
            continue
        if name == "add":
            a, b = x.args[0], x.args[1]
            if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):
                s.reason = "scores shifted by a constant"
                return s
            if s.scale_nodes:
                s.reason = "additive mask applied before a run-time scale factor"
                return s
            sa, sb = _leads_to_contraction(a), _leads_to_contraction(b)
            if sa and not sb:
                s.masks.append((b, "add", scale_after))
                x = a
            elif sb and not sa:
                s.masks.append((a, "add", scale_after))
                x = b
            else:
                s.reason = "cannot tell scores from mask in an add"
                return s
            if s.softcap:
                s.reason = "mask added inside the softcap"
                return s
            continue
        if name in ("where", "masked_fill") and s.softcap:
            s.reason = "mask applied inside the softcap"
            return s
        if name == "where":
            cond, a, b = (G.arg(x, n) for n in ("condition", "input", "other"))
            fa, fb = G.scalar(a), G.scalar(b)
            if isinstance(a, fx.Node) and _leads_to_contraction(a) and fb is not None and fb <= _NEG_LIMIT:
                s.masks.append((cond, "keep", 1.0))
                x = a
            elif isinstance(b, fx.Node) and _leads_to_contraction(b) and fa is not None and fa <= _NEG_LIMIT:
                s.masks.append((cond, "drop", 1.0))
                x = b
            else:
                s.reason = "where() on scores whose fill is not a large negative constant"
                return s
            continue
        if name == "masked_fill":
            inp, m, value = (G.arg(x, n) for n in ("input", "mask", "value"))
            fv = G.scalar(value)
            if fv is None or fv > _NEG_LIMIT:
                s.reason = f"masked_fill with value {value!r}, not a large negative constant"
                return s
            s.masks.append((m, "drop", 1.0))
            x = inp
            continue
        if name == "view":
            s.reason = "scores are reshaped between the q·kᵀ contraction and the softmax"
            return s
        if name in ("getitem", "slice"):
            s.reason = "scores are sliced before the softmax"
            return s
        s.reason = f"unsupported op '{G.raw_name(x)}' between the q·kᵀ contraction and the softmax"
        return s
    s.reason = "too many ops between the contraction and the softmax"
    return s


def _const_factor(x: fx.Node) -> tuple[float | None, Any, tuple | None]:
    """``x = y * c``, ``c * y`` or ``y / c``: return (c as a multiplier, y, run-time factor).

    c is a constant, or a run-time scalar node (then the third item is ``(node, ±1)`` and
    c is the value it had when captured, used for reports only).
    """
    a, b = x.args[0], x.args[1]
    ca, cb = G.scalar(a), G.scalar(b)
    sa, sb = G.sym_scalar(a), G.sym_scalar(b)
    if G.op(x) == "mul":
        if cb is not None:
            return cb, a, None
        if ca is not None:
            return ca, b, None
        if sb is not None:
            return 1.0, a, (sb[0], 1)
        if sa is not None:
            return 1.0, b, (sa[0], 1)
    else:
        if cb:
            return 1.0 / cb, a, None
        if sb is not None:
            return 1.0, a, (sb[0], -1)
    return None, None, None


def _softcap_tail(x: Any, cap: float) -> Any:
    """For ``mul(tanh(div(y, cap)), cap)`` with ``x`` the tanh: return y, else None."""
    x = G.through(x, _PASS)
    if G.op(x) != "tanh":
        return None
    inner = G.through(x.args[0], _PASS)
    if G.op(inner) == "div" and G.scalar(inner.args[1]) == cap:
        return inner.args[0]
    if G.op(inner) == "mul" and G.scalar(inner.args[1]) is not None and \
            abs(G.scalar(inner.args[1]) * cap - 1.0) < 1e-6:
        return inner.args[0]
    return None


def _leads_to_contraction(x: Any, depth: int = 16) -> bool:
    """Does walking back from ``x`` through score-side ops reach a q·kᵀ contraction?"""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return False
        name = G.op(x)
        if name in ("matmul", "baddbmm"):
            return True
        if name in (*_PASS, "mul", "div", "tanh", "view"):
            x = x.args[0] if G.scalar(x.args[0]) is None else x.args[1]
            continue
        if name == "add":
            return _leads_to_contraction(x.args[0], depth - 1) or \
                _leads_to_contraction(x.args[1], depth - 1)
        if name == "where":
            return _leads_to_contraction(G.arg(x, "input"), depth - 1) or \
                _leads_to_contraction(G.arg(x, "other"), depth - 1)
        if name == "masked_fill":
            x = x.args[0]
            continue
        return False
    return False


def _unscale_q(q: Any, s: _Scores) -> Any:
    """Strip a constant pre-scaling of q (``q * scale`` before the contraction)."""
    while isinstance(q, fx.Node) and G.op(q) in ("mul", "div"):
        a, b = q.args[0], q.args[1]
        c = G.scalar(b) if G.op(q) == "mul" else (1 / G.scalar(b) if G.scalar(b) else None)
        if c is None and G.op(q) == "mul" and G.scalar(a) is not None:
            c, b, a = G.scalar(a), a, b
        if c is None:
            break
        # only a pure scalar scaling of a tensor whose only user is this mul
        if len(q.users) != 1:
            break
        s.scale *= c
        q = a
    return q


def _untranspose(kt: Any) -> Any:
    """k for kᵀ = transpose(k, -2, -1) (or permute swapping the last two axes), else None."""
    if not isinstance(kt, fx.Node):
        return None
    r = G.rank(kt)
    name = G.op(kt)
    if name == "transpose":
        d0 = G.norm_dim(G.arg(kt, "dim0"), r)
        d1 = G.norm_dim(G.arg(kt, "dim1"), r)
        if {d0, d1} == {r - 1, r - 2}:
            return kt.args[0]
    if name == "permute":
        perm = kt.args[1] if len(kt.args) == 2 and isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        perm = [G.norm_dim(p, r) for p in perm]
        if perm == [*range(r - 2), r - 1, r - 2]:
            return kt.args[0]
    return None


def _strip_repeat(k: Any, v: Any) -> tuple[Any, Any, str]:
    """Undo GQA head repetition applied identically to k and v.

    repeat_kv (HF): ``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)``;
    Meta: ``torch.repeat_interleave(x, n, dim=1)``. Both map head h to kv head h // n.
    """
    k0, nk = _repeat_source(k)
    v0, nv = _repeat_source(v)
    if k0 is not None and v0 is not None and nk == nv:
        return k0, v0, f"repeat(n={nk})"
    return k, v, "none"


def _through_whole(x: Any) -> Any:
    """Walk up through casts and slices that keep their whole axis (``aten.slice(x, dim, 0,
    INT_MAX)``: ``x[:, :, None]`` traced by ``torch.export`` is such slices around an
    unsqueeze)."""
    while isinstance(x, fx.Node):
        name = G.op(x)
        if name in _PASS and x.args:
            x = x.args[0]
        elif name == "slice" and _whole_slice(x):
            x = x.args[0]
        else:
            return x
    return x


def _whole_slice(node: fx.Node) -> bool:
    """aten.slice.Tensor(x, dim, start, end, step) with start 0 and an end past any size."""
    start, end, step = G.arg(node, "start", 0), G.arg(node, "end"), G.arg(node, "step", 1)
    return start in (None, 0) and step in (None, 1) and (
        end is None or (type(end) is int and end >= 2 ** 62))


def _repeat_source(x: Any) -> tuple[Any, int | None]:
    if not isinstance(x, fx.Node):
        return None, None
    x = G.through(x, _PASS)
    name = G.op(x)
    if name == "repeat_interleave":
        reps = G.as_int(G.arg(x, "repeats"))
        dim = G.norm_dim(G.arg(x, "dim"), G.rank(x))
        if reps and dim == 1 and G.rank(x) == 4:
            return x.args[0], reps
        return None, None
    # (view covers reshape; torch.export's graphs add whole-axis slices around the unsqueeze)
    if name == "view" and G.rank(x) == 4:
        e = _through_whole(x.args[0])
        if G.op(e) != "expand" or G.rank(e) != 5:
            return None, None
        es = G.shape(e)
        u = _through_whole(e.args[0])
        # the source gains a unit axis at position 2: x[:, :, None] or unsqueeze(2)
        src = None
        if G.op(u) == "unsqueeze" and G.norm_dim(G.arg(u, "dim"), 5) == 2:
            src = u.args[0]
        elif G.op(u) == "getitem" and G.rank(u) == 5:
            idx = u.args[1]
            if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None:
                src = u.args[0]
        elif G.op(u) == "view" and G.rank(u) == 5 and G.shape(u)[2] == 1:
            src = u.args[0]
        if src is None or G.rank(src) != 4:
            return None, None
        n = G.as_int(es[2])
        return (src, n) if n else (None, None)
    return None, None


def _desc(x: Any) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)


# ---------------------------------------------------------------- shared finish

def _finish(site: AttentionSite, q, k, v, mask, scale, causal, softcap, gqa,
            reject: str | None = None) -> AttentionSite:
    site.nodes.update(q=q, k=k, v=v)
    if mask != "parts":
        site.nodes["mask"] = mask
    qs, ks, vs = G.shape(q), G.shape(k), G.shape(v)
    heads = kv_heads = head_dim = None
    if qs and ks and len(qs) == 4 and len(ks) == 4:
        heads, kv_heads = G.as_int(qs[1]), G.as_int(ks[1])
    if qs:
        head_dim = G.as_int(qs[-1])
    site.facts.update(
        scale=None if scale is None else float(scale), is_causal=bool(causal),
        softcap=float(softcap or 0.0), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, gqa=gqa, rank=len(qs) if qs else None,
        has_mask=mask is not None,
    )
    if reject:
        return site.reject(reject)
    if not qs or not ks or not vs:
        return site.reject("no example values on q/k/v (graph captured without shapes)")
    if len(qs) not in (3, 4) or len(ks) != len(qs) or len(vs) != len(qs):
        return site.reject(f"q/k/v ranks {len(qs)}/{len(ks)}/{len(vs)} are not [B,H,S,D] or [B*H,S,D]")
    if G.as_int(qs[-1]) != G.as_int(ks[-1]) and G.as_int(ks[-1]) is not None:
        return site.reject(f"q head dim {qs[-1]} != k head dim {ks[-1]}")
    if heads and kv_heads and heads % kv_heads:
        return site.reject(f"{heads} query heads do not group over {kv_heads} kv heads")
    return site


__all__ = ["find_attention"]
