"""KV-state sites: where this step's keys/values are appended to the past and read by attention.

Two families of spellings reach the same record (:class:`KVSite`):

* **append** (a growing cache): ``cat([past, new], dim=-2)`` on [B, Hkv, S, D]. A fresh
  ``DynamicCache`` starts from an empty ``torch.tensor([])`` (Dynamo: a ``tensor`` node;
  export: a lifted constant read through ``lift_fresh_copy``/``detach_``); a cache passed in is a
  graph input (Dynamo: ``l_kwargs_past_key_values_layers_0_keys``; longfx export: ``past_0_key``).
* **write into a fixed buffer** (a static cache): ``index_copy_``/``index_copy`` along the
  sequence axis, ``index_put_``/``index_put`` with one index tensor (aten spelling of
  ``buf[:, :, pos] = new``; Dynamo keeps ``operator.setitem``), ``slice_scatter``, and
  ``buf[:, :, a:b].copy_(new)``. The buffer is a graph input or attribute. In a Dynamo graph
  the write is in place and attention reads the input itself afterwards; in an export graph
  attention reads the write node (training IR keeps ``index_copy_``; after
  ``run_decompositions()`` it is a functional ``index_put``).

Each site is linked to the attention site it feeds by walking forward from ``result`` through
view-like ops (view/reshape/expand/getitem/slice/transpose/permute/unsqueeze/cast/clone) to an
attention site's ``k`` or ``v`` node (or an argument of its output node). The walk tracks the
appended axis, so a cache stored [B, S, H, D] and transposed before attention is still checked
against attention's sequence axis. The state is recognized structurally (a graph input, an
attribute or an empty tensor reached through view-like ops), never by name.

A candidate that looks like a KV append (4-D result, one operand from the state) but appends
along another axis, or whose result feeds no attention site, is kept as a near-miss. RoPE's
``cat(freqs, freqs)`` and rotate-half's ``cat(-x2, x1)`` have no state operand and are not
reported.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from longfx.rewrite import graph as G
from longfx.rewrite.sites import AttentionSite, KVSite, locate

# Walking back from an operand to the state it reads (no arithmetic on the way).
_STATE_PATH = ("identity", "cast", "view", "slice", "getitem", "select", "narrow",
               "detach_", "alias", "expand", "roll", "assert_meta")
# Walking forward from the full keys/values to attention (the values are only reshaped).
_READ_PATH = ("view", "expand", "getitem", "slice", "narrow", "transpose", "permute",
              "unsqueeze", "cast", "identity", "detach_", "repeat_interleave", "repeat",
              "select", "squeeze")
_WRITES = ("index_copy", "index_put", "slice_scatter", "setitem", "copy_")


def find_kv(gm: fx.GraphModule, attention_sites: Iterable[AttentionSite] = ()) -> list[KVSite]:
    """Every KV append / static write (and near-miss) of ``gm`` in graph order, each linked to
    the attention site of ``attention_sites`` that reads it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    targets = _attention_targets(attention_sites)
    sites: list[KVSite] = []
    for node in gm.graph.nodes:
        name = G.op(node)
        site = None
        if name == "cat":
            site = _cat_site(node)
        elif name in _WRITES:
            site = _write_site(node, name)
        if site is None:
            continue
        _link(site, targets, order)
        sites.append(site)
    for i, site in enumerate(sites):
        site.index = i
    return sites


# ---------------------------------------------------------------- the state

def _state_source(x: Any) -> tuple[fx.Node | None, str | None]:
    """The graph input / attribute / empty tensor that ``x`` reads, through view-like ops.

    Returns (source, kind): kind is "input" (placeholder or attribute of rank >= 3), "empty"
    (a zero-element tensor: the start of a fresh dynamic cache) or None.
    """
    seen = 0
    while isinstance(x, fx.Node) and seen < 32:
        seen += 1
        if _is_empty(x):
            while isinstance(x, fx.Node) and x.args and isinstance(x.args[0], fx.Node) and \
                    G.op(x) in _STATE_PATH and _is_empty(x.args[0]):
                x = x.args[0]      # to the constant / tensor([]) it was read from
            return x, "empty"
        if x.op in ("placeholder", "get_attr"):
            r = G.rank(x)
            if r is not None and r >= 3:
                return x, "input"
            return None, None
        name = G.op(x)
        if name in _STATE_PATH or G.raw_name(x) in _STATE_PATH:
            if not x.args:
                return None, None
            x = x.args[0]
            continue
        return None, None
    return None, None


def _is_empty(x: fx.Node) -> bool:
    t = G.tensor_val(x)
    if t is None:
        return False
    # an empty tensor made here, a constant, or an input: all mean "nothing cached yet"
    return G.as_int(t.numel()) == 0


# ---------------------------------------------------------------- append: cat(past, new)

def _cat_site(node: fx.Node) -> KVSite | None:
    tensors = G.arg(node, "tensors")
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    if G.rank(node) != 4:
        return None
    sources = [_state_source(t) for t in tensors]
    which = [i for i, (src, _kind) in enumerate(sources) if src is not None]
    if not which:
        return None            # rotate-half, cat(freqs, freqs), q/k splits...: not state
    i_past = which[0]
    past, new = tensors[i_past], tensors[1 - i_past]
    site = KVSite(spelling="cat")
    locate(site, node)
    axis = G.norm_dim(G.arg(node, "dim", 0), 4)
    src, kind = sources[i_past]
    site.nodes.update(past=past, new=new, result=node, state=src)
    site.facts.update(role=None, axis=axis, static=False, attention=None,
                      fresh=kind == "empty", past_first=i_past == 0,
                      state=src.name if isinstance(src, fx.Node) else None)
    if i_past != 0:
        site.reject("cat(new, past): the new entries are prepended, not appended")
    return site


# ---------------------------------------------------------------- static buffer writes

def _write_site(node: fx.Node, name: str) -> KVSite | None:
    parsed = _parse_write(node, name)
    if parsed is None:
        return None
    buf, new, axis, index = parsed
    if G.rank(buf) != 4:
        return None
    src, kind = _state_source(buf)
    if src is None or kind != "input":
        return None
    if name == "copy_" and axis is None:
        return None            # whole-buffer copy_: the write-back of another site's result
    site = KVSite(spelling=G.raw_name(node) or name)
    locate(site, node)
    # Who reads the keys/values after the write: the write node when it returns the updated
    # buffer and something uses it (export), else the buffer itself, read after the in-place
    # write (Dynamo; setitem and copy_ into a view of the buffer).
    readers = [u for u in node.users if u.op != "output" and G.op(u) != "assert_meta"]
    if name == "copy_":
        result = src
    elif name == "setitem" or (_inplace(node) and not readers):
        result = buf
    else:
        result = node
    site.nodes.update(past=buf, new=new, result=result, write=node, state=src)
    if index is not None:
        site.nodes["index"] = index
    site.facts.update(role=None, axis=axis, static=True, attention=None, fresh=False,
                      state=src.name, rolled=_rolled(buf, src))
    if axis is None:
        site.reject("the write position is not along one axis (no single index tensor "
                    "or slice)")
    return site


def _rolled(x: Any, src: fx.Node) -> bool:
    """Whether the buffer is a ``roll`` of the state (a ring buffer shifted by one slot)."""
    while isinstance(x, fx.Node) and x is not src and x.args:
        if G.op(x) == "roll":
            return True
        x = x.args[0]
    return False


def _inplace(node: fx.Node) -> bool:
    raw = G.raw_name(node) or ""
    return raw.endswith("_") or raw == "setitem"


def _parse_write(node: fx.Node, name: str):
    """(buffer, new, axis, index) of a buffer write, or None when it is not one."""
    args, kw = node.args, node.kwargs

    def a(i, key, default=None):
        if key in kw:
            return kw[key]
        return args[i] if i < len(args) else default

    if name == "index_copy":                       # (self, dim, index, source)
        buf, dim, index, new = a(0, "self", a(0, "input")), a(1, "dim"), a(2, "index"), \
            a(3, "source")
        return buf, new, G.norm_dim(dim, G.rank(buf)), index
    if name == "index_put":                        # (self, indices, values, accumulate)
        buf, indices, new = a(0, "self", a(0, "input")), a(1, "indices"), a(2, "values")
        if a(3, "accumulate", False):
            return None
        axis, index = _index_axis(indices)
        return buf, new, axis, index
    if name == "slice_scatter":                    # (self, src, dim, start, end, step)
        buf, new, dim = a(0, "self", a(0, "input")), a(1, "src"), a(2, "dim", 0)
        return buf, new, G.norm_dim(dim, G.rank(buf)), None
    if name == "setitem":                          # operator.setitem(buf, idx, new)
        if len(args) != 3 or not isinstance(args[0], fx.Node):
            return None
        buf, idx, new = args
        if not isinstance(new, fx.Node):
            return None
        axis, index = _index_axis(idx if isinstance(idx, (tuple, list)) else (idx,))
        return buf, new, axis, index
    if name == "copy_":                            # view_of_buf.copy_(new)
        dst, new = a(0, "self", a(0, "input")), a(1, "src")
        if not isinstance(dst, fx.Node) or not isinstance(new, fx.Node):
            return None
        axis, index, base = _sliced_axis(dst)
        if base is None:
            return None
        return base, new, axis, index
    return None


def _index_axis(indices: Any) -> tuple[int | None, Any]:
    """The one indexed axis of an index tuple (``[None, None, pos]``, ``(:, :, pos)``,
    ``(:B, a:b)``: a prefix slice of the batch axis beside another is a batch selection)."""
    picks = []
    for i, ix in enumerate(indices or ()):
        if ix is None or (isinstance(ix, slice) and _full(ix.start, ix.stop)):
            continue
        if ix is Ellipsis:
            return None, None
        index = (ix.start, ix.stop) if isinstance(ix, slice) else ix
        picks.append((i, index, isinstance(ix, slice) and ix.start in (None, 0)))
    return _one_axis(picks)


def _one_axis(picks: list) -> tuple[int | None, Any]:
    if len(picks) > 1:
        picks = [p for p in picks if not (p[0] == 0 and p[2])]
    if len(picks) != 1:
        return None, None
    return picks[0][0], picks[0][1]


def _sliced_axis(dst: fx.Node) -> tuple[int | None, Any, fx.Node | None]:
    """For a view ``buf[..., a:b, ...]``: (the sliced axis, (a, b), buf). None axis when
    nothing (or more than one axis besides a batch prefix) is sliced."""
    picks = []
    x = dst
    for _ in range(8):
        if not isinstance(x, fx.Node):
            return None, None, None
        if x.op in ("placeholder", "get_attr"):
            axis, index = _one_axis(picks)
            return axis, index, x
        name = G.op(x)
        if name == "slice":                        # aten.slice.Tensor(x, dim, start, end)
            dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
            start = x.args[2] if len(x.args) > 2 else x.kwargs.get("start")
            end = x.args[3] if len(x.args) > 3 else x.kwargs.get("end")
            if not _full(start, end):
                picks.append((G.norm_dim(dim, G.rank(x)), (start, end), start in (None, 0)))
        elif name == "getitem":
            idx = x.args[1] if len(x.args) > 1 else None
            idx = idx if isinstance(idx, tuple) else (idx,)
            for i, sl in enumerate(idx):
                if isinstance(sl, slice):
                    if not _full(sl.start, sl.stop):
                        picks.append((i, (sl.start, sl.stop), sl.start in (None, 0)))
                elif sl is not None:
                    return None, None, None
        elif name not in ("identity", "view", "cast"):
            return None, None, None
        x = x.args[0] if x.args else None
    return None, None, None


def _full(start: Any, end: Any) -> bool:
    big = end is None or (isinstance(end, int) and end >= 2**62)
    return (start is None or start == 0) and big


# ---------------------------------------------------------------- link to attention

def _attention_targets(sites: Iterable[AttentionSite]) -> dict[fx.Node, list]:
    """node -> [(attention site, role, seq axis of that node or None)]."""
    targets: dict[fx.Node, list] = {}

    def add(node, site, role, axis):
        if isinstance(node, fx.Node):
            targets.setdefault(node, []).append((site, role, axis))

    for site in sites:
        k, v = site.nodes.get("k"), site.nodes.get("v")
        for node, role in ((k, "key"), (v, "value")):
            r = G.rank(node)
            add(node, site, role, None if r is None else r - 2)
        out = site.nodes.get("output")
        if G.op(out) in ("sdpa", "sdpa_cpu_flash"):
            add(G.arg(out, "key"), site, "key", 2)
            add(G.arg(out, "value"), site, "value", 2)
        pv = site.nodes.get("pv")
        if G.op(pv) == "matmul" and len(pv.args) > 1:
            add(pv.args[1], site, "value", 2)
        qk = site.nodes.get("qk")
        if G.op(qk) == "matmul" and len(qk.args) > 1:
            add(qk.args[1], site, "key", 3)     # kᵀ: the sequence is the last axis
        sm = site.nodes.get("softmax")
        if isinstance(sm, fx.Node):
            # for sites that recorded no k (near-misses): q·kᵀ reaches their softmax
            targets.setdefault(_SOFTMAX, {})[sm] = site
    return targets


_SOFTMAX = "__softmax__"   # key of the softmax -> site map inside the targets dict
_CONTRACTIONS = ("matmul", "baddbmm", "einsum")


def _softmax_after(qk: fx.Node, softmaxes: dict, limit: int = 12) -> AttentionSite | None:
    """The attention site whose softmax the scores ``qk`` reach within a few ops."""
    todo, seen = [qk], set()
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n in softmaxes:
            return softmaxes[n]
        if G.op(n) in _CONTRACTIONS and n is not qk:
            continue
        todo.extend(n.users)
    return None


def _link(site: KVSite, targets: dict, order: dict) -> None:
    write = site.nodes.get("write")
    after = order.get(write, -1) if write is not None else -1
    starts = [site.nodes["result"]]
    if write is not None and _inplace(write):
        # an in-place write: later reads may go through the write node or the buffer
        starts += [n for n in (write, site.nodes["past"], site.nodes.get("state"))
                   if isinstance(n, fx.Node) and n not in starts]
    found = _walk(starts, site.facts.get("axis"), targets, order, after)
    if not found:
        if site.rewritable:
            site.reject("the appended keys/values feed no attention site")
        return
    att, role, axis_there, want, origin = found[0]
    roles = {f[1] for f in found}
    sites = {f[0].key for f in found}
    site.nodes["result"] = origin
    site.facts.update(role=role if len(roles) == 1 else None, attention=att.key)
    if site.layer is None and not site.module:
        site.layer, site.module = att.layer, att.module
    if len(sites) > 1:
        site.facts["attention_all"] = sorted(sites)
    if not site.rewritable:
        return
    if len(roles) > 1:
        site.reject("the same state feeds attention both as keys and as values")
    elif want is not None and axis_there is not None:
        if axis_there != want:
            site.reject(f"appended along axis {site.facts.get('axis')}, which attention reads "
                        f"as axis {axis_there}, not its sequence axis {want}")
    elif site.facts.get("axis") != 2:
        site.reject(f"appended along axis {site.facts.get('axis')}, not the sequence axis 2 "
                    "of [B, Hkv, S, D]")


def _walk(starts: list, axis: Any, targets: dict, order: dict, after: int) -> list:
    """Targets reached from ``starts`` through read-path ops:
    [(site, role, axis there, sequence axis there, start it was reached from)]."""
    found = []
    softmaxes = targets.get(_SOFTMAX, {})
    todo = [(start, axis if isinstance(axis, int) else None, start) for start in starts]
    seen = set()
    while todo and len(seen) < 256:
        node, ax, origin = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        hits = targets.get(node, ()) if isinstance(node, fx.Node) else ()
        for att, role, want in hits:
            found.append((att, role, ax, want, origin))
        if hits:
            continue
        for user in node.users:
            if order.get(user, 0) <= after:
                continue       # reads before the in-place write see the old state
            name = G.op(user)
            if name in _CONTRACTIONS and softmaxes and node is not user.args[0]:
                att = _softmax_after(user, softmaxes)
                if att is not None:     # node is kᵀ of q·kᵀ: its sequence is the last axis
                    r = G.rank(node)
                    found.append((att, "key", ax, None if r is None else r - 1, origin))
                    continue
            if name not in _READ_PATH and G.raw_name(user) not in _READ_PATH:
                continue
            if not user.args or user.args[0] is not node:
                continue
            todo.append((user, _axis_after(user, ax), origin))
    found.sort(key=lambda f: order.get(f[0].nodes.get("output"), 0))
    return found


def _axis_after(node: fx.Node, axis: int | None) -> int | None:
    """Where axis ``axis`` of ``node``'s input ends up in its output (None if unknown/lost)."""
    if axis is None:
        return None
    name = G.op(node)
    src = node.args[0]
    r_in, r_out = G.rank(src), G.rank(node)
    if name == "transpose":
        d0 = G.norm_dim(G.arg(node, "dim0", node.args[1] if len(node.args) > 1 else None), r_in)
        d1 = G.norm_dim(G.arg(node, "dim1", node.args[2] if len(node.args) > 2 else None), r_in)
        if len(node.args) == 1 and r_in == 2:     # .t()
            d0, d1 = 0, 1
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if name == "permute":
        perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        perm = [G.norm_dim(p, r_in) for p in perm]
        return perm.index(axis) if axis in perm else None
    if name == "unsqueeze":
        d = G.norm_dim(G.arg(node, "dim"), r_out)
        return axis + 1 if isinstance(d, int) and d <= axis else axis
    if name == "select":
        d = G.norm_dim(node.args[1] if len(node.args) > 1 else None, r_in)
        if d == axis:
            return None
        return axis - 1 if isinstance(d, int) and d < axis else axis
    if name == "getitem":
        idx = node.args[1] if len(node.args) > 1 else None
        if not isinstance(idx, (tuple, list)):
            idx = (idx,)
        out_axis, i_in = 0, 0
        for s in idx:
            if s is None:
                out_axis += 1
                continue
            if s is Ellipsis:
                return _axis_by_shape(src, node, axis)
            if isinstance(s, int):
                if i_in == axis:
                    return None
                i_in += 1
                continue
            if isinstance(s, slice):
                if i_in == axis:
                    return out_axis
                i_in += 1
                out_axis += 1
                continue
            return None            # advanced indexing
        return out_axis + (axis - i_in)
    if r_in == r_out:
        return axis
    return _axis_by_shape(src, node, axis)


def _axis_by_shape(src: Any, node: fx.Node, axis: int) -> int | None:
    """A rank-changing reshape (repeat_kv's 5-D -> 4-D): the axis counted from the end when
    the trailing sizes agree, or from the start when the leading sizes do."""
    s_in, s_out = G.shape(src), G.shape(node)
    if s_in is None or s_out is None:
        return None
    tail = len(s_in) - axis
    if tail <= len(s_out) and [str(d) for d in s_in[axis:]] == [str(d) for d in s_out[-tail:]]:
        return len(s_out) - tail
    if [str(d) for d in s_in[:axis + 1]] == [str(d) for d in s_out[:axis + 1]]:
        return axis
    return None


__all__ = ["find_kv"]
