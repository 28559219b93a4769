"""Find rotary position embeddings structurally: frequency tables and where they rotate q/k.

Works on Dynamo (torch-level) and torch.export (aten-level) graphs alike, through the
vocabulary of :mod:`longfx.rewrite.graph`. Detection starts from the *rotation*, the one
shape no other computation has, and walks outward:

1. **Applications.** Three spellings of "rotate pairs of channels by a position angle":

   - ``rotate_half`` (GPT-NeoX, HF Llama...): ``x*C + cat(-x2, x1)*S`` with ``x1``/``x2`` the
     two halves of the last axis (getitem/aten.slice, ``chunk``, ``split``, ``narrow``);
   - ``interleaved`` (GPT-J): ``x*C + flatten(stack(-x[..., 1::2], x[..., ::2], -1))*S``;
   - ``complex`` (Meta Llama): ``flatten(view_as_real(view_as_complex(x.reshape(..., -1, 2))
     * F))``.

   Partial rotary (GPT-NeoX, Phi-3, GPT-J): when the rotated ``x`` is ``p[..., :r]`` and the
   result is concatenated with ``p[..., r:]``, the application is widened to ``p`` with
   ``rotary_dim = r``.
2. **Tables.** ``C``/``S`` (``F``) are walked up through casts, views, unsqueeze/expand,
   position gathers, last-axis slices/splits/cats (tracking which channels are selected) and
   scalar multiplies (the ``attention_scaling``) to a ``cos``/``sin`` pair of one angle
   (``polar`` for the complex spelling). A table that is a graph input or buffer is kept
   (``facts["table"] = "input"``): the rewrite is still exact, only frequency transforms need
   the angle.
3. **Frequencies.** The angle is walked up (through ``cat(f, f)``) to the product of
   positions and ``inv_freq`` (``outer``, ``einsum('i,j->ij')``, ``pos[..., None] *
   inv_freq`` or the batched ``inv_freq @ pos`` matmul); the operand that is a float vector
   not derived from ``arange`` is ``inv_freq``. ``base`` is read off a literal ``base ** e``
   or, when the real vector is available (a ``get_attr`` buffer, or ``example_inputs`` given
   for placeholders), from its values.

Applications are grouped into one :class:`RopeSite` per frequency vector (HF computes one
table per model, or per layer type: Gemma 3 has a local and a global one; a model that
recomputes cos/sin in every layer from one ``inv_freq`` buffer still gives one site).
Exported graphs hide the table computation inside ``wrap_with_set_grad_enabled`` /
``wrap_with_autocast`` submodules; the walks cross those boundaries, and the nodes a rewrite
needs (each application's input, output and table operands) stay in the caller's graph.

Near-misses (``rewritable=False`` with a reason): a rotation whose tables do not come from
one cos/sin pair, and cos/sin (or polar) tables that no rotation uses (e.g. sinusoidal
absolute positions added to embeddings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from longfx.rewrite import graph as G
from longfx.rewrite.sites import RopeSite

_IDENTITY = ("identity", "assert_meta")
# Single-input ops that keep the last axis (the frequency axis of a table) as it is.
_KEEP_LAST = ("identity", "cast", "assert_meta", "unsqueeze", "squeeze", "expand", "repeat",
              "view", "contiguous", "clone", "transpose", "permute", "expand_as")
_POS_INF = 2 ** 62


# --------------------------------------------------------------------------------------------
# Graph scope: the top graph plus higher-order-op submodules (export's wrap_with_*)


class _Scope:
    """``gm`` and the subgraphs its higher-order ops call, with the links across them."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None):
        self.gm = gm
        self.graphs: list[tuple[fx.GraphModule, str]] = [(gm, "")]
        self.caller: dict[fx.Graph, tuple[fx.Node, list]] = {}   # subgraph -> (hop, operands)
        self.callee: dict[fx.Node, fx.GraphModule] = {}          # hop node -> submodule
        self.order: dict[fx.Node, int] = {}
        self.real: dict[fx.Node, torch.Tensor] = {}
        self._collect(gm, "")
        for i, (mod, _) in enumerate(self.graphs):
            for j, node in enumerate(mod.graph.nodes):
                self.order[node] = i * 1_000_000 + j
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if isinstance(example_inputs, dict):
            for n in holders:
                v = example_inputs.get(n.name)
                if isinstance(v, torch.Tensor) and not _is_fake(v):
                    self.real[n] = v
        elif example_inputs is not None:
            flat = list(example_inputs)
            if len(flat) == len(holders):
                for n, v in zip(holders, flat):
                    if isinstance(v, torch.Tensor) and not _is_fake(v):
                        self.real[n] = v

    def _collect(self, mod: fx.GraphModule, prefix: str) -> None:
        for node in mod.graph.nodes:
            if node.op != "call_function" or not isinstance(
                    node.target, torch._ops.HigherOrderOperator):
                continue
            subs = [(i, a) for i, a in enumerate(node.args)
                    if isinstance(a, fx.Node) and a.op == "get_attr"
                    and isinstance(G.fetch_attr(mod, a.target), fx.GraphModule)]
            if len(subs) != 1:       # cond/while have several branches: not followed
                continue
            i, attr = subs[0]
            sub = G.fetch_attr(mod, attr.target)
            self.caller[sub.graph] = (node, list(node.args[i + 1:]))
            self.callee[node] = sub
            name = f"{prefix}{attr.target}"
            self.graphs.append((sub, name))
            self._collect(sub, name + ".")

    def up(self, node: fx.Node) -> Any:
        """The value ``node`` stands for one step across a subgraph boundary, or None."""
        if node.op == "placeholder" and node.graph in self.caller:
            _hop, operands = self.caller[node.graph]
            holders = [n for n in node.graph.nodes if n.op == "placeholder"]
            i = holders.index(node)
            return operands[i] if i < len(operands) else None
        if G.op(node) == "getitem" and node.args and node.args[0] in self.callee \
                and isinstance(node.args[1], int):
            out = _output(self.callee[node.args[0]].graph)
            vals = out.args[0]
            if isinstance(vals, (list, tuple)) and node.args[1] < len(vals):
                return vals[node.args[1]]
        return None

    def subgraph_name(self, node: fx.Node) -> str:
        for mod, name in self.graphs:
            if mod.graph is node.graph:
                return name
        return ""

    def value(self, node: fx.Node) -> torch.Tensor | None:
        """The real tensor behind a buffer/parameter node, when the graph can give it."""
        if node in self.real:
            return self.real[node]
        if node.op == "get_attr":
            for mod, _ in self.graphs:
                if mod.graph is node.graph:
                    t = G.fetch_attr(mod, node.target)
                    if isinstance(t, torch.Tensor) and not _is_fake(t):
                        return t
        return None


def _output(graph: fx.Graph) -> fx.Node:
    for node in reversed(graph.nodes):
        if node.op == "output":
            return node
    raise ValueError("graph without output")


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


# --------------------------------------------------------------------------------------------
# Small structural helpers


def _strip(x: Any) -> Any:
    return G.through(x, _IDENTITY)


def _shape(node: Any) -> tuple | None:
    """The shape as concrete ints (SymInts by their hint): comparing never adds guards."""
    s = G.shape(node)
    return None if s is None else tuple(G.as_int(d) for d in s)


def _last(node: Any) -> int | None:
    s = G.shape(node)
    return G.as_int(s[-1]) if s else None


def _dtype(node: Any) -> torch.dtype | None:
    t = G.tensor_val(node)
    return None if t is None else t.dtype


def _operands(node: fx.Node) -> tuple[Any, Any]:
    a = G.arg(node, "input", node.args[0] if node.args else None)
    b = G.arg(node, "other", node.args[1] if len(node.args) > 1 else None)
    return a, b


def _other(node: fx.Node, x: fx.Node) -> Any:
    a, b = _operands(node)
    if a is x and b is not x:
        return b
    if b is x and a is not x:
        return a
    return None


def _neg_of(node: Any) -> Any:
    """``y`` for ``-y`` written as neg or as a multiply by -1."""
    if G.op(node) == "neg":
        return node.args[0]
    if G.op(node) == "mul":
        a, b = _operands(node)
        if G.scalar(b) == -1.0 and isinstance(a, fx.Node):
            return a
        if G.scalar(a) == -1.0 and isinstance(b, fx.Node):
            return b
    return None


def _int(x: Any, default: int | None = None) -> int | None:
    if x is None:
        return default
    v = G.as_int(x)
    return default if v is None else v


def _norm_index(idx: Any, rank: int) -> list | None:
    """A getitem index as one entry per input dim (None entries kept: they add dims)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if sum(1 for i in idx if i is Ellipsis) > 1:
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * max(rank - consumed, 0) + idx[k + 1:]
    else:
        idx = idx + (slice(None),) * max(rank - consumed, 0)
    return list(idx)


def _full(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) and (
        s.stop is None or (isinstance(s.stop, int) and s.stop >= _POS_INF))


def _is_scalar(c: Any) -> bool:
    """A number: a literal, a Sym value, or a node holding one (``.item()``, 0-dim tensor)."""
    if isinstance(c, bool):
        return False
    if isinstance(c, (int, float, torch.SymInt, torch.SymFloat)):
        return True
    if isinstance(c, fx.Node):
        v = G.val(c)
        if isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool):
            return True
        return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point
    return False


def _const(c: Any) -> float | None:
    """A constant factor: a Python number or a 0-dim constant node."""
    if isinstance(c, fx.Node):
        return G.scalar(c) if G.rank(c) == 0 else None
    return G.scalar(c)


def _last_dim_slice(node: Any) -> tuple[fx.Node, int, int, int] | None:
    """``(base, start, stop, step)`` when ``node`` is a slice of ``base``'s last axis only."""
    o = G.op(node)
    if o == "getitem":
        base, idx = node.args[0], node.args[1]
        if G.op(base) in ("split", "chunk") and isinstance(idx, int):
            return _split_piece(base, idx)
        if not isinstance(base, fx.Node) or isinstance(idx, (int, fx.Node)):
            return None
        r = G.rank(base)
        L = _last(base)
        if r is None or L is None:
            return None
        entries = _norm_index(idx, r)
        if entries is None or len(entries) != r or any(e is None for e in entries):
            return None
        if not all(_full(e) for e in entries[:-1]) or not isinstance(entries[-1], slice):
            return None
        s = entries[-1]
        start, stop, step = (_int(s.start), _int(s.stop), _int(s.step, 1))
        if (s.start is not None and start is None) or (s.stop is not None and stop is None):
            return None
        return (base, *slice(start, stop, step).indices(L))
    if o == "slice":
        base = node.args[0]
        r, L = G.rank(base), _last(base)
        if r is None or L is None:
            return None
        a = list(node.args) + [None] * 5
        dim = _int(node.kwargs.get("dim", a[1]), 0)
        if G.norm_dim(dim, r) != r - 1:
            return None
        start = _int(node.kwargs.get("start", a[2]), 0)
        stop = _int(node.kwargs.get("end", a[3]), L)
        step = _int(node.kwargs.get("step", a[4]), 1)
        return (base, *slice(start, min(stop, L), step).indices(L))
    if o == "narrow":
        base, dim, start, length = (list(node.args) + [None] * 4)[:4]
        r = G.rank(base)
        if r is None or G.norm_dim(_int(dim), r) != r - 1:
            return None
        start, length = _int(start), _int(length)
        if start is None or length is None:
            return None
        return (base, start, start + length, 1)
    return None


def _split_piece(split: fx.Node, i: int) -> tuple[fx.Node, int, int, int] | None:
    base = split.args[0]
    r = G.rank(base)
    dim = G.arg(split, "dim", 0)
    if r is None or G.norm_dim(_int(dim, 0), r) != r - 1:
        return None
    pieces = G.val(split)
    if not isinstance(pieces, (list, tuple)) or i >= len(pieces):
        return None
    sizes = [G.as_int(p.shape[-1]) if isinstance(p, torch.Tensor) else None for p in pieces]
    if any(s is None for s in sizes):
        return None
    start = sum(sizes[:i])
    return (base, start, start + sizes[i], 1)


def _getitem_keeps_last(node: fx.Node) -> fx.Node | None:
    """The tensor a getitem/index/select reads from, when the last axis is left whole."""
    o = G.op(node)
    base = node.args[0] if node.args else None
    if not isinstance(base, fx.Node):
        return None
    r = G.rank(base)
    if r is None or _last(base) is None or _last(node) != _last(base):
        return None
    if o == "getitem":
        idx = node.args[1]
        if isinstance(idx, int) and G.op(base) in ("split", "chunk", "unbind"):
            return None
        entries = _norm_index(idx, r)
        if entries is None:
            return None
        if entries and entries[-1] is None:      # [..., None] adds a new last axis
            return None
        real = [e for e in entries if e is not None]
        if len(real) == r and not _full(real[-1]):
            return None
        return base
    if o == "index":                              # aten.index.Tensor(base, [i0, i1, ...])
        indices = node.args[1] if len(node.args) > 1 else []
        if len(indices) >= r and indices[r - 1] is not None:
            return None
        return base
    if o in ("index_select", "select", "slice", "narrow"):
        dim = _int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        if dim is None or G.norm_dim(dim, r) == r - 1:
            return None
        return base
    return None


# --------------------------------------------------------------------------------------------
# Applications


@dataclass
class _App:
    style: str
    x: fx.Node                   # rotated input (widened to the full head for partial rotary)
    output: fx.Node              # the node whose value is the rotated tensor
    cos: Any = None              # table operands as multiplied (rotate_half / interleaved)
    sin: Any = None
    freqs_cis: Any = None        # complex table operand (complex)
    rotary_dim: int | None = None
    head_dim: int | None = None
    partial: bool = False
    halves: str = ""             # how the halves were taken: "slice", "chunk", "split"...
    inner: list = field(default_factory=list)    # nodes of the rotation itself


def _neg_pair(ts: Any, dim: Any, r: int | None) -> tuple[Any, tuple, tuple, int] | None:
    """For ``[-x[..., a], x[..., b]]`` joined on the last axis: ``(x, slice b, slice a, L)``.

    Both rotations write their two halves this way (rotate-half with ``cat``, GPT-J's
    rotate_every_two with ``stack``); the slices say which one it is.
    """
    if not isinstance(ts, (list, tuple)) or len(ts) != 2 or r is None \
            or G.norm_dim(_int(dim, 0), r) != r - 1:
        return None
    neg_part = _neg_of(ts[0])
    s2 = _last_dim_slice(neg_part) if neg_part is not None else None
    s1 = _last_dim_slice(ts[1])
    if not s1 or not s2:
        return None
    x = _strip(s1[0])
    L = _last(x)
    if x is not _strip(s2[0]) or L is None or L % 2:
        return None
    return x, s1[1:], s2[1:], L


def _rotation_source(node: fx.Node) -> tuple[str, fx.Node, str] | None:
    """``(style, x, halves)`` when ``node`` is rotate_half(x) or rotate_every_two(x)."""
    o = G.op(node)
    if o == "cat":
        ts = G.arg(node, "tensors")
        pair = _neg_pair(ts, G.arg(node, "dim", 0), G.rank(node))
        if pair is None:
            return None
        x, s1, s2, L = pair
        h = L // 2
        if s1 != (0, h, 1) or s2 != (h, L, 1):
            return None
        spelling = G.op(ts[1]) if G.op(ts[1]) != "getitem" else (
            G.op(ts[1].args[0]) if G.op(ts[1].args[0]) in ("chunk", "split") else "slice")
        return "rotate_half", x, spelling
    if o == "view":
        stack = node.args[0]
        if G.op(stack) != "stack":
            return None
        ts, dim = G.arg(stack, "tensors", stack.args[0]), stack.kwargs.get(
            "dim", stack.args[1] if len(stack.args) > 1 else 0)
        pair = _neg_pair(ts, dim, G.rank(stack))
        if pair is None:
            return None
        x, s1, s2, L = pair
        if s1 != (0, L, 2) or s2 != (1, L, 2) or _shape(node) != _shape(x):
            return None
        return "interleaved", x, "strided"
    return None


def _combine(rot: fx.Node, x: fx.Node) -> tuple[fx.Node, Any, Any, list] | str:
    """Find ``x*C + rot*S`` above ``rot``: (add, C, S, nodes), or the reason it is not there."""
    muls = [u for u in rot.users if G.op(u) == "mul" and _other(u, rot) is not None]
    if not muls:
        return "rotated tensor is not multiplied by a table"
    for m2 in muls:
        S = _other(m2, rot)
        for add in m2.users:
            if G.op(add) != "add" or add.kwargs.get("alpha", 1) != 1:
                continue
            m1 = _other(add, m2)
            if G.op(m1) != "mul":
                continue
            a, b = _operands(m1)
            for cand, C in ((a, b), (b, a)):
                if isinstance(cand, fx.Node) and _strip(cand) is x and isinstance(C, fx.Node):
                    return add, C, S, [rot, m2, m1, add]
    return "rotation * table is not added to x * table"


def _widen_partial(app: _App) -> None:
    """x = p[..., :r] and out = cat([out, p[..., r:]]): make the application cover p."""
    sl = _last_dim_slice(app.x)
    if not sl or sl[1] != 0 or sl[3] != 1:
        return
    p, r = _strip(sl[0]), sl[2]
    L = _last(p)
    if L is None or r >= L:
        return
    for cat in app.output.users:
        if G.op(cat) != "cat":
            continue
        ts, dim = G.arg(cat, "tensors"), G.arg(cat, "dim", 0)
        rk = G.rank(cat)
        if not isinstance(ts, (list, tuple)) or len(ts) != 2 or ts[0] is not app.output \
                or rk is None or G.norm_dim(_int(dim, 0), rk) != rk - 1:
            continue
        pas = _last_dim_slice(ts[1])
        if pas and _strip(pas[0]) is p and pas[1:] == (r, L, 1):
            app.inner.append(cat)
            app.x, app.output, app.partial = p, cat, True
            return


def _complex_app(vc: fx.Node) -> _App | str | None:
    """view_as_complex(x.reshape(..., -1, 2)) * F -> view_as_real -> flatten."""
    rs = vc.args[0]
    if G.op(rs) != "view":
        return None
    x = rs.args[0]
    sx, sr = _shape(x), _shape(rs)
    if not sx or not sr or len(sr) != len(sx) + 1 or sr[-1] != 2 or sr[:-2] != sx[:-1]:
        return None
    for m in vc.users:
        if G.op(m) != "mul":
            continue
        F = _other(m, vc)
        for vr in m.users:
            if G.op(vr) != "view_as_real":
                continue
            for fl in vr.users:
                if G.op(fl) == "view" and _shape(fl) == sx:
                    L = _last(x)
                    return _App("complex", x, fl, freqs_cis=F, rotary_dim=L, head_dim=L,
                                halves="view_as_complex", inner=[rs, vc, m, vr, fl])
        return "complex product is not turned back into real channels (view_as_real, flatten)"
    return "view_as_complex(x) is not multiplied by a table"


def _is_canonical(node: fx.Node) -> bool:
    """A ``longfx::rope`` call (a graph canonicalized before)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) \
        and t.namespace == "longfx" and G.raw_name(node) == "rope"


def _canonical_app(node: fx.Node) -> _App:
    x, cos, sin, style, rd = (list(node.args) + [None] * 5)[:5]
    app = _App(str(style), x, node, rotary_dim=_int(rd), head_dim=_last(x), halves="canonical",
               inner=[node])
    app.partial = bool(app.rotary_dim and app.head_dim and app.rotary_dim < app.head_dim)
    if app.style == "complex":
        # cos/sin = select(view_as_real(freqs_cis), -1, 0 / 1)
        vr = cos.args[0] if G.op(cos) == "select" else None
        app.freqs_cis = vr.args[0] if G.op(vr) == "view_as_real" else cos
    else:
        app.cos, app.sin = cos, sin
    return app


# --------------------------------------------------------------------------------------------
# Tables: from the multiplied operand up to cos/sin/polar


@dataclass
class _Table:
    kind: str                    # "cos" | "sin" | "polar" | "input" | "unknown"
    node: Any                    # the cos/sin/polar node, the input node, or where it stopped
    scaling: float | None = 1.0  # product of constant factors met on the way
    dup: str | None = None       # how the half-width frequencies were widened
    chain: list = field(default_factory=list)
    scale_nodes: list = field(default_factory=list)   # runtime factors (graph values)


def _trace_table(scope: _Scope, node: Any) -> _Table:
    rng: tuple[int, int] | None = None      # selected channels of the current node
    scaling: float | None = 1.0
    dup = None
    chain: list = []
    scale_nodes: list = []
    for _ in range(200):
        if not isinstance(node, fx.Node):
            return _Table("unknown", node, scaling, dup, chain, scale_nodes)
        chain.append(node)
        o = G.op(node)
        if o in ("cos", "sin", "polar"):
            return _Table(o, node, scaling, dup, chain, scale_nodes)
        nxt = scope.up(node)
        if nxt is not None:
            node = nxt
            continue
        if node.op in ("placeholder", "get_attr"):
            return _Table("input", node, scaling, dup, chain, scale_nodes)
        parent = node.args[0] if node.args else None
        r = G.rank(node)
        if o in _KEEP_LAST and isinstance(parent, fx.Node):
            if o in ("transpose", "permute") and not _keeps_last_axis(node):
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            if _last(parent) != _last(node):
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            node = parent
            continue
        if o == "repeat_interleave" and isinstance(parent, fx.Node):
            rep, dim = _int(G.arg(node, "repeats")), G.arg(node, "dim")
            if dim is not None and r is not None and G.norm_dim(_int(dim), r) == r - 1:
                if rep is None:
                    return _Table("unknown", node, scaling, dup, chain, scale_nodes)
                dup = "repeat_interleave"
                if rng is not None:
                    rng = (rng[0] // rep, -(-rng[1] // rep))
            node = parent
            continue
        if o in ("mul", "div"):
            a, b = _operands(node)
            picked = None
            for t, c in ((a, b), (b, a)):
                if not isinstance(t, fx.Node) or (o == "div" and t is not a):
                    continue
                if _is_scalar(c):
                    picked = (t, _const(c))
                    break
            if picked is None:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            node, s = picked
            factor = next((c for c in (a, b) if c is not node), None)
            if isinstance(factor, fx.Node):
                scale_nodes.append(factor)
            if s is None or (o == "div" and s == 0):
                scaling = None          # a runtime scalar (dynamic=True makes it .item())
            elif scaling is not None:
                scaling = scaling * s if o == "mul" else scaling / s
            continue
        if o == "embedding":                        # F.embedding(ids, table) / aten(table, ids)
            table = next((a for a in node.args[:2] if isinstance(a, fx.Node)
                          and _dtype(a) is not None and _dtype(a).is_floating_point), None)
            if table is None:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            node = table
            continue
        sl = _last_dim_slice(node)
        if sl is not None:
            base, start, stop, step = sl
            if step != 1:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            rng = (start + rng[0], start + rng[1]) if rng else (start, stop)
            node = base
            continue
        base = _getitem_keeps_last(node)
        if base is not None:
            node = base
            continue
        if o == "cat":
            ts, dim = G.arg(node, "tensors"), G.arg(node, "dim", 0)
            if not isinstance(ts, (list, tuple)) or r is None \
                    or G.norm_dim(_int(dim, 0), r) != r - 1:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            firsts = {_strip(t) for t in ts}
            if len(firsts) == 1 and rng is None:
                dup = "cat"
                node = ts[0]
                continue
            if rng is None:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            off = 0
            for t in ts:
                w = _last(t)
                if w is None:
                    return _Table("unknown", node, scaling, dup, chain, scale_nodes)
                if off <= rng[0] and rng[1] <= off + w:
                    rng = (rng[0] - off, rng[1] - off)
                    if rng == (0, w):
                        rng = None
                    node = t
                    break
                off += w
            else:
                return _Table("unknown", node, scaling, dup, chain, scale_nodes)
            continue
        return _Table("unknown", node, scaling, dup, chain, scale_nodes)
    return _Table("unknown", node, scaling, dup, chain, scale_nodes)


def _keeps_last_axis(node: fx.Node) -> bool:
    r = G.rank(node)
    if r is None:
        return False
    if G.op(node) == "transpose":
        d0, d1 = G.arg(node, "dim0", 0), G.arg(node, "dim1", 1)
        if node.target in ("t",) or getattr(node.target, "__name__", "") == "t":
            return r < 2
        return r - 1 not in (G.norm_dim(_int(d0), r), G.norm_dim(_int(d1), r))
    dims = node.args[1:] if len(node.args) > 1 else node.kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return bool(dims) and G.norm_dim(_int(dims[-1]), r) == r - 1


# --------------------------------------------------------------------------------------------
# Frequencies: from the angle up to inv_freq


@dataclass
class _Freqs:
    angle: Any
    inv_freq: Any = None
    positions: Any = None
    form: str | None = None          # "outer" | "einsum" | "mul" | "matmul"
    dup: str | None = None
    base: float | None = None
    reason: str | None = None


_ROOT_OPS = ("identity", "cast", "assert_meta", "unsqueeze", "squeeze", "expand", "view",
             "contiguous", "clone", "transpose", "permute", "repeat")


def _root(scope: _Scope, node: Any) -> Any:
    for _ in range(50):
        if not isinstance(node, fx.Node):
            return node
        nxt = scope.up(node)
        if nxt is not None:
            node = nxt
            continue
        o = G.op(node)
        if o in _ROOT_OPS and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        if o == "getitem" and isinstance(node.args[0], fx.Node) and not isinstance(
                node.args[1], int):
            entries = _norm_index(node.args[1], G.rank(node.args[0]) or 0)
            if entries is not None and all(e is None or _full(e) for e in entries):
                node = node.args[0]
                continue
        return node
    return node


def _trace_angle(scope: _Scope, angle: Any) -> _Freqs:
    out = _Freqs(angle)
    node = angle
    for _ in range(100):
        if not isinstance(node, fx.Node):
            out.reason = "angle is not a graph value"
            return out
        nxt = scope.up(node)
        if nxt is not None:
            node = nxt
            continue
        o = G.op(node)
        if o in ("identity", "cast", "assert_meta", "view", "contiguous", "transpose",
                 "unsqueeze", "squeeze", "expand"):
            node = node.args[0]
            continue
        if o == "cat":
            ts = G.arg(node, "tensors")
            if isinstance(ts, (list, tuple)) and len({_strip(t) for t in ts}) == 1:
                out.dup = "cat"
                node = ts[0]
                continue
        if o in ("outer", "einsum", "mul", "matmul"):
            _product(scope, node, out)
            return out
        if node.op in ("placeholder", "get_attr"):
            out.reason = "angle is a graph input"
            return out
        out.reason = f"angle is not a product of positions and frequencies (stopped at {o})"
        return out
    out.reason = "angle walk too long"
    return out


def _product(scope: _Scope, node: fx.Node, out: _Freqs) -> None:
    o = G.op(node)
    if o == "einsum":
        eq = node.args[0]
        ops = list(node.args[1]) if len(node.args) == 2 and isinstance(
            node.args[1], (list, tuple)) else list(node.args[1:])
        if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
            out.reason = "einsum is not an outer product"
            return
        ins, res = eq.replace(" ", "").split("->")
        subs = ins.split(",")
        if len(subs) != 2 or not res:
            out.reason = "einsum is not an outer product"
            return
        last = res[-1]
        pick = [i for i, s in enumerate(subs) if last in s and last not in subs[1 - i]]
        if len(pick) != 1:
            out.reason = "einsum is not an outer product"
            return
        inv, pos = ops[pick[0]], ops[1 - pick[0]]
    elif o == "outer":
        pos, inv = _operands(node)
    else:
        a, b = _operands(node)
        ra, rb = _root(scope, a), _root(scope, b)
        fa, fb = _freq_like(ra), _freq_like(rb)
        if fa and not fb:
            inv, pos = a, b
        elif fb and not fa:
            inv, pos = b, a
        else:
            out.reason = "cannot tell the frequency vector from the positions"
            return
    out.form = o
    out.inv_freq = _root(scope, inv)
    out.positions = _root(scope, pos)
    out.base = _base(scope, out.inv_freq)


def _freq_like(node: Any) -> bool:
    """A float vector that is not a bare arange (positions are ints or an arange)."""
    t = G.tensor_val(node)
    if t is None or not t.dtype.is_floating_point:
        return False
    if G.op(node) == "arange":
        return False
    if G.op(node) == "cast" and G.op(_strip(node.args[0])) == "arange":
        return False
    shape = [G.as_int(s) for s in t.shape]
    return sum(1 for s in shape if s != 1) <= 1


def _base(scope: _Scope, inv: Any) -> float | None:
    if not isinstance(inv, fx.Node):
        return None
    real = scope.value(inv)
    if real is not None:
        return _base_from_values(real)
    for a in [inv, *G.ancestors(inv, limit=60)]:
        if G.op(a) == "pow" and a.args and G.scalar(a.args[0]) is not None \
                and not isinstance(a.args[0], fx.Node):
            return float(a.args[0])
    return None


def _base_from_values(inv: torch.Tensor) -> float | None:
    """base from inv_freq[i] = base ** (-i / n), n = len(inv_freq); None if not geometric."""
    v = inv.detach().reshape(-1).double().cpu()
    n = v.numel()
    if n < 2 or (v <= 0).any():
        return None
    base = math.exp(-math.log(float(v[-1])) * n / (n - 1))
    expect = torch.tensor([base ** (-i / n) for i in range(n)], dtype=torch.float64)
    if not torch.allclose(v, expect, rtol=1e-4, atol=0):
        return None
    rounded = float(f"{base:.5g}")
    return rounded if abs(rounded - base) <= 1e-5 * base else base


# --------------------------------------------------------------------------------------------
# Roles (q or k) by where the rotated tensor flows


_FLOW = ("view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "repeat_interleave",
         "repeat", "cast", "identity", "cat", "contiguous", "clone", "mul", "div", "getitem",
         "slice", "index_copy", "slice_scatter", "assert_meta")


def _role(output: fx.Node) -> str | None:
    frontier, seen = [output], {output}
    while frontier and len(seen) < 400:
        n = frontier.pop(0)
        for u in n.users:
            o = G.op(u)
            if o in ("sdpa", "sdpa_cpu_flash", "attention", "baddbmm", "matmul", "einsum"):
                args = list(u.args)
                if o == "baddbmm":
                    args = args[1:3]
                elif o == "einsum":
                    args = list(args[1]) if len(args) == 2 and isinstance(
                        args[1], (list, tuple)) else args[1:]
                if len(args) > 0 and args[0] is n or u.kwargs.get("query") is n:
                    return "q"
                if len(args) > 1 and args[1] is n or u.kwargs.get("key") is n:
                    return "k"
                continue
            if o in _FLOW and u not in seen:
                seen.add(u)
                frontier.append(u)
    return None


# --------------------------------------------------------------------------------------------
# The detector


def export_values(ep: "torch.export.ExportedProgram") -> dict[str, torch.Tensor]:
    """``{placeholder name: tensor}`` for the parameters, buffers and constants that an
    ExportedProgram's ``graph_module`` takes as inputs (pass it as ``example_inputs``)."""
    out = {}
    for spec in ep.graph_signature.input_specs:
        target = getattr(spec, "target", None)
        if target is None:
            continue
        v = ep.state_dict.get(target)
        if v is None:
            v = ep.constants.get(target)
        if isinstance(v, torch.Tensor):
            out[spec.arg.name] = v
    return out


def find_rope(gm: fx.GraphModule, example_inputs: Any = None) -> list[RopeSite]:
    """Every RoPE table of ``gm`` with its applications, plus near-misses, in graph order.

    ``example_inputs`` are optional and only let ``base`` be read off an ``inv_freq`` that is
    a graph input: the real tensors the placeholders stand for, in order (what a Dynamo
    backend receives), or a ``{placeholder name: tensor}`` dict (:func:`export_values` makes
    one for ``ExportedProgram.graph_module``). ``get_attr`` buffers (``ep.module()``) are read
    directly.
    """
    scope = _Scope(gm, example_inputs)
    apps: list[_App] = []
    misses: list[tuple[fx.Node, str, str]] = []      # (node, style, reason)

    for mod, _name in scope.graphs:
        for node in mod.graph.nodes:
            o = G.op(node)
            if o in ("cat", "view"):
                found = _rotation_source(node)
                if found is None:
                    continue
                style, x, halves = found
                comb = _combine(node, x)
                if isinstance(comb, str):
                    misses.append((node, style, f"{style} rotation found but {comb}"))
                    continue
                add, C, S, inner = comb
                L = _last(x)
                app = _App(style, x, add, cos=C, sin=S, rotary_dim=L, halves=halves,
                           inner=[*inner])
                _widen_partial(app)
                app.head_dim = _last(app.x)
                apps.append(app)
            elif _is_canonical(node):
                apps.append(_canonical_app(node))
            elif o == "view_as_complex":
                found = _complex_app(node)
                if isinstance(found, str):
                    misses.append((node, "complex", f"complex rotation found but {found}"))
                elif found is not None:
                    apps.append(found)

    sites: list[RopeSite] = []
    groups: dict[Any, list[tuple[_App, dict]]] = {}
    used_tables: set[fx.Node] = set()
    for app in apps:
        info, reason = _tables(scope, app)
        if reason is not None:
            # The tables it did reach are accounted for by this near-miss.
            used_tables.update(t.node for t in info.get("traces", ())
                               if isinstance(t.node, fx.Node))
            misses.append((app.output, app.style, reason))
            continue
        for t in info["traces"]:
            used_tables.add(t.node)
        freqs = info["freqs"]
        key = (app.style, freqs.inv_freq if freqs is not None and freqs.inv_freq is not None
               else tuple(t.node for t in info["traces"]))
        groups.setdefault(key, []).append((app, info))

    for (style, _key), members in groups.items():
        sites.append(_site(scope, style, members))

    for node, style, reason in misses:
        site = RopeSite(spelling=style, facts={"style": style})
        _locate(site, node)
        site.nodes = {"at": node}
        sites.append(site.reject(reason))

    sites.extend(_unused_tables(scope, used_tables))
    sites.sort(key=lambda s: scope.order.get(_anchor(s), 0))
    for i, s in enumerate(sites):
        s.index = i
    return sites


def _tables(scope: _Scope, app: _App) -> tuple[dict, str | None]:
    if app.style == "complex":
        t = _trace_table(scope, app.freqs_cis)
        if t.kind == "polar":
            angle = t.node.args[1] if len(t.node.args) > 1 else t.node.kwargs.get("angle")
            return {"traces": [t], "freqs": _trace_angle(scope, angle), "scale": t.scaling,
                    "table": "computed"}, None
        if t.kind == "input" and _dtype(t.node) is not None and _dtype(t.node).is_complex:
            return {"traces": [t], "freqs": None, "scale": t.scaling, "table": "input"}, None
        return {}, (f"complex rotation found but its table does not come from polar() or a "
                    f"complex input (stopped at {G.op(t.node) or t.node})")
    if app.rotary_dim is not None and _last(app.cos) not in (app.rotary_dim, None) \
            and _last(app.cos) != 1:
        return {}, "table width does not match the rotated channels"
    tc, ts = _trace_table(scope, app.cos), _trace_table(scope, app.sin)
    if tc.kind == "input" and ts.kind == "input":
        return {"traces": [tc, ts], "freqs": None, "scale": tc.scaling, "table": "input"}, None
    if tc.kind == "sin" and ts.kind == "cos":
        return {"traces": [tc, ts]}, (f"{app.style} rotation found but the tables are swapped "
                                      f"(x*sin + rot(x)*cos)")
    if tc.kind != "cos" or ts.kind != "sin":
        where = tc if tc.kind != "cos" else ts
        return {"traces": [tc, ts]}, (f"{app.style} rotation found but its tables do not "
                                      f"trace to cos()/sin() "
                                      f"(stopped at {G.op(where.node) or where.node})")
    ac, as_ = _strip(tc.node.args[0]), _strip(ts.node.args[0])
    if ac is not as_:
        return {"traces": [tc, ts]}, (f"{app.style} rotation found but cos and sin are of "
                                      f"different angles")
    return {"traces": [tc, ts], "freqs": _trace_angle(scope, tc.node.args[0]),
            "scale": tc.scaling, "table": "computed"}, None


def _site(scope: _Scope, style: str, members: list[tuple[_App, dict]]) -> RopeSite:
    first_app, first = members[0]
    freqs: _Freqs | None = first["freqs"]
    applications = []
    for app, info in members:
        entry = {"input": app.x, "output": app.output, "layer": G.layer_index(app.output),
                 "module": G.module_path(app.output), "role": _role(app.output),
                 "rotary_dim": app.rotary_dim, "head_dim": app.head_dim, "partial": app.partial,
                 "nodes": list(app.inner)}
        if style == "complex":
            entry["freqs_cis"] = app.freqs_cis
        else:
            entry["cos"], entry["sin"] = app.cos, app.sin
        applications.append(entry)
    tables = []
    for _app, info in members:
        pair = tuple(t.node for t in info["traces"])
        if pair not in tables:
            tables.append(pair)
    site = RopeSite(spelling=f"{style}:{first_app.halves}" if first_app.halves else style)
    layers = sorted({a["layer"] for a in applications if a["layer"] is not None})
    anchor = tables[0][0]
    site.module = G.module_path(anchor)
    site.layer = layers[0] if len(layers) == 1 else None
    rotary_dims = sorted({a["rotary_dim"] for a in applications if a["rotary_dim"]})
    head_dims = sorted({a["head_dim"] for a in applications if a["head_dim"]})
    rd = rotary_dims[0] if rotary_dims else None
    site.nodes = {"applications": applications, "tables": tables,
                  "scaling": [n for t in first["traces"] for n in t.scale_nodes],
                  "inv_freq": freqs.inv_freq if freqs else None,
                  "positions": freqs.positions if freqs else None,
                  "angle": freqs.angle if freqs else None}
    if style == "complex":
        site.nodes["freqs_cis"] = anchor
    else:
        site.nodes["cos"], site.nodes["sin"] = tables[0][0], tables[0][1]
    dup = (freqs.dup if freqs else None) or first["traces"][0].dup
    site.facts = {
        "style": style,
        "rotary_dim": rd if len(rotary_dims) <= 1 else rotary_dims,
        "head_dim": head_dims[0] if len(head_dims) == 1 else head_dims,
        "partial": bool(rd and head_dims and rd < head_dims[0]),
        "base": freqs.base if freqs else None,
        "attention_scaling": first["scale"],
        "table": first["table"],
        "table_graph": scope.subgraph_name(anchor) if isinstance(anchor, fx.Node) else "",
        "freq_form": freqs.form if freqs else None,
        "widened_by": dup,
        "num_tables": len(tables),
        "num_applications": len(applications),
        "layers": layers,
        "applications": [{"layer": a["layer"], "role": a["role"], "input": a["input"],
                          "output": a["output"], "rotary_dim": a["rotary_dim"]}
                         for a in applications],
    }
    if freqs is not None and freqs.inv_freq is None and first["table"] == "computed":
        site.facts["inv_freq_reason"] = freqs.reason
    if len({a["rotary_dim"] for a in applications}) > 1 or len(head_dims) > 1:
        site.facts["mixed_dims"] = True
    return site


def _unused_tables(scope: _Scope, used: set) -> list[RopeSite]:
    """cos/sin pairs (and polar tables) that no recognized rotation uses: near-misses."""
    out = []
    by_angle: dict[Any, dict[str, fx.Node]] = {}
    for mod, _ in scope.graphs:
        for node in mod.graph.nodes:
            o = G.op(node)
            if o in ("cos", "sin") and node.args:
                by_angle.setdefault(_strip(node.args[0]), {}).setdefault(o, node)
            elif o == "polar" and node not in used:
                site = RopeSite(spelling="complex", facts={"style": "complex"})
                _locate(site, node)
                site.nodes = {"freqs_cis": node, "at": node}
                out.append(site.reject("polar() table found but no complex rotation uses it"))
    for angle, pair in by_angle.items():
        if len(pair) != 2 or pair["cos"] in used or pair["sin"] in used:
            continue
        freqs = _trace_angle(scope, angle)
        site = RopeSite(spelling="table", facts={"style": None, "base": freqs.base,
                                                 "freq_form": freqs.form})
        _locate(site, pair["cos"])
        site.nodes = {"cos": pair["cos"], "sin": pair["sin"], "inv_freq": freqs.inv_freq,
                      "at": pair["cos"]}
        out.append(site.reject("cos/sin table found but no rotate-half, interleaved or complex "
                               "rotation uses it"))
    return out


def _locate(site: RopeSite, node: fx.Node) -> None:
    site.module = G.module_path(node)
    site.layer = G.layer_index(node)


def _anchor(site: RopeSite) -> Any:
    apps = site.nodes.get("applications")
    if apps:
        return apps[0]["output"]
    return site.nodes.get("at")
