"""The KV state an exported decoder carries, when a recipe changes it: ``kv_quant(...)``.

``rewrite/capture_export.py`` builds the model's cache from flat graph inputs and returns the
cache's tensors as graph outputs. For the plain model that is a ``DynamicCache`` (``past.{i}.key``
/ ``.value``, ``present = concat(past, new)``). With ``kv_quant(...)`` in the recipe it is a
:class:`QuantizedState`: per layer the packed codes, their scales, the full-precision tail and
the sink copy of ``kernels/kv_quant/concat_state.py`` (the runtime's ``QuantizedKVLayer`` state
with the ring unrolled and no spare capacity), appended by that module's functional
:func:`~longfx.kernels.kv_quant.concat_state.step`, so the graph quantizes on append and
attention reads what the runtime cache would hand it.

Per layer i, inputs ``past.{i}.{name}`` and outputs ``present.{i}.{name}`` (Pp packed tokens,
a multiple of ``group``; T ≤ R tail tokens; P = Pp + T; B batch):

    k_codes  uint8        [B, Hkv, Pp, D·kbits/8]   dims: batch, packed
    k_params uint8 | fp16 [B, Hkv, Pp/group, 2, D]  dims: batch, packed_groups
    v_codes  uint8        [B, Hkv, Pp, D·bits/8]    dims: batch, packed
    v_params uint8 | fp16 [B, Hkv, Pp, 2, Jv]       dims: batch, packed
    k_tail   model dtype  [B, Hkv, T, D]            dims: batch, tail
    v_tail   model dtype  [B, Hkv, T, D]
    sink_k   model dtype  [B, Hkv, sink, D]         dims: batch (sink > 0 only)
    sink_v   model dtype  [B, Hkv, sink, D]

Before prefill every dim but batch is 0, except the sink copy (zeros, full size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longfx.kernels.kv_quant import concat_state as C
from longfx.kernels.kv_quant import reference as kv_ref
from longfx.kernels.kv_quant.reference import KVQuantConfig
from longfx.runtime.cache import StateLayer


class ConcatQuantizedLayer(StateLayer):
    """A cache layer over a concat-layout quantized state (``concat_state``): what the
    exported graph's model code talks to. ``update`` replaces the state by the step's new one;
    nothing is written in place, so ``torch.export`` sees inputs → outputs."""

    is_compileable = False
    is_sliding = False            # windows are applied by the model's mask (as for DynamicLayer)

    def __init__(self, tensors: tuple[torch.Tensor, ...], config: KVQuantConfig, sink: int,
                 rot: torch.Tensor | None = None):
        super().__init__()
        self.tensors = tuple(tensors)
        self.config = config
        self.sink = sink
        self.dtype, self.device = tensors[4].dtype, tensors[4].device
        if config.rotate and rot is None:
            rot = kv_ref.rotation(tensors[4].shape[-1], self.device)
        self.rot = rot if config.rotate else None
        self.is_initialized = True

    @property
    def length(self):
        return C.length(self.tensors)

    def lazy_initialization(self, key_states, value_states):   # built from inputs, never lazily
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.dtype != self.dtype:
            raise TypeError(f"the state holds {self.dtype}, the model gave {key_states.dtype}")
        k, v, self.tensors = C.step(self.tensors, key_states, value_states, self.config,
                                    self.sink, self.rot)
        return k, v


@dataclass(frozen=True)
class QuantizedState:
    """How an exported graph carries a ``kv_quant(...)`` state (module docstring)."""

    config: KVQuantConfig
    sink: int = 0
    layer_configs: dict[int, KVQuantConfig] = field(default_factory=dict)
    recipe: str = ""
    # rotations made before tracing (``example``), so the traced graph holds each as one
    # constant rather than the index arithmetic that builds it
    _rotations: dict = field(default_factory=dict, compare=False, repr=False)

    layout = "kv_quant"

    @classmethod
    def from_recipe(cls, recipe) -> "QuantizedState":
        """From a parsed ``kv_quant(...)`` recipe (passes/kv_quant.py)."""
        return cls(recipe.kv_config, recipe.sink, dict(recipe.layer_configs), str(recipe))

    def config_of(self, layer: int) -> KVQuantConfig:
        return self.layer_configs.get(layer, self.config)

    def rotation(self, head_dim: int, device) -> torch.Tensor:
        """``reference.rotation(head_dim)``, made once per (head dim, device)."""
        key = (head_dim, str(device))
        if key not in self._rotations:
            self._rotations[key] = kv_ref.rotation(head_dim, device)
        return self._rotations[key]

    def names(self) -> tuple[str, ...]:
        return C.names(self.sink)

    def check(self, num_layers: int) -> None:
        bad = [i for i in self.layer_configs if i >= num_layers]
        if bad:
            raise ValueError(f"key_layers {bad} are beyond the model's {num_layers} layers")

    # ---------------------------------------------------------------- graph building

    def cache(self, flat: list[torch.Tensor], num_layers: int):
        """A transformers ``Cache`` over the flat per-layer state tensors."""
        from transformers.cache_utils import Cache

        n = len(self.names())
        self.tie_sizes(flat, num_layers)
        layers = []
        for i in range(num_layers):
            t, c = flat[i * n:(i + 1) * n], self.config_of(i)
            rot = self.rotation(t[4].shape[-1], t[4].device) if c.rotate else None
            layers.append(ConcatQuantizedLayer(t, c, self.sink, rot))
        return Cache(layers=layers)

    def tie_sizes(self, flat: list[torch.Tensor], num_layers: int) -> None:
        """State that every layer's batch, packed, packed_groups and tail sizes are layer 0's
        (``torch._check``). Under export each input size starts as its own symbol, and the
        shared ``Dim`` names only become runtime asserts checked afterwards. Without the ties,
        every layer traced its step with sizes of its own, and the facts export keeps about
        them grew with each layer, as did the time to consult them. The capture of a
        SmolLM2-shaped model took 9.8 s at 2 layers, 38 s at 8 and 500 s at 30. In eager
        code these are plain integer checks."""
        names = self.names()
        first: dict[str, Any] = {}
        for i, name, axis, dim in self.sized_axes(num_layers):
            size = flat[i * len(names) + names.index(name)].shape[axis]
            if dim in first:
                torch._check(size == first[dim], lambda: f"layer {i} {name}: its {dim} "
                             f"size differs from layer 0's")
            else:
                first[dim] = size

    def sized_axes(self, num_layers: int):
        """(layer, tensor name, axis, dim name) of every named size of the state, layer by
        layer in input order (what ``tie_sizes`` and the export's asserts tie together)."""
        dims = self.dims()
        for i in range(num_layers):
            for name in self.names():
                for axis, dim in dims[name].items():
                    yield i, name, axis, dim

    @staticmethod
    def present(cache) -> list[torch.Tensor]:
        return [t for layer in cache.layers for t in layer.tensors]

    # ---------------------------------------------------------------- shapes

    def trace_seq(self, batch: int) -> int:
        """New tokens to trace with: enough that the traced step packs two groups (export
        specializes a size it traces at 0 or 1, and that includes the packed chunk's groups)."""
        return 2 * self.config.group + 2

    def trace_tokens(self, batch: int, seq: int) -> int:
        """The past length to trace with: packed groups and tail both >= 2 and unlike the other
        traced sizes (export specializes sizes 0 and 1 and may confuse equal ones), and a tail
        full enough that ``seq`` new tokens pack at least two groups."""
        r, g = self.config.ring, self.config.group
        taken = {batch, seq}
        # a prefill of n tokens leaves a tail in (r - g, r]
        tail = next((t for t in range(r, max(r - g, 1), -1)
                     if (t + seq - r + g - 1) // g >= 2 and t not in taken), None)
        if tail is None:
            raise ValueError(f"kv_quant state: no traceable tail for a ring of {r} tokens, "
                             f"group {g} and {seq} new tokens (use residual >= 4)")
        groups = next(n for n in range(4, 64) if not {n, n * g} & (taken | {tail}))
        return groups * g + tail

    def example(self, shapes, dtype, batch: int, tokens: int, device,
                gen: torch.Generator) -> list[torch.Tensor]:
        """The state after a prefill of ``tokens`` random keys and values per layer (appended
        through the step, so it is a state the graph can meet), flat in input order.
        ``shapes``: per layer (Hkv, Dk, Dv)."""
        out = []
        for i, (h, dk, dv) in enumerate(shapes):
            if dk != dv:
                raise ValueError(f"layer {i}: keys of {dk} and values of {dv} channels; the "
                                 "quantized state takes one head dim")
            c = self.config_of(i)
            state = C.empty(batch, h, dk, c, self.sink, dtype, device)
            rot = self.rotation(dk, device) if c.rotate else None
            k = torch.randn(batch, h, tokens, dk, generator=gen).to(dtype).to(device)
            v = torch.randn(batch, h, tokens, dk, generator=gen).to(dtype).to(device)
            _, _, state = C.step(state, k, v, c, self.sink, rot)
            # fresh tensors: the tails are views of the step's concatenation, and export
            # gives a view's base symbols of its own (more sizes per layer to reason over;
            # see tie_sizes)
            out += [t.clone(memory_format=torch.contiguous_format) for t in state]
        return out

    def empty(self, shapes, dtype, batch: int, device=None) -> list[torch.Tensor]:
        out = []
        for i, (h, dk, _) in enumerate(shapes):
            out += list(C.empty(batch, h, dk, self.config_of(i), self.sink, dtype, device))
        return out

    def dims(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: dim name}} of one layer's state."""
        d = {"k_codes": {0: "batch", 2: "packed"}, "k_params": {0: "batch", 2: "packed_groups"},
             "v_codes": {0: "batch", 2: "packed"}, "v_params": {0: "batch", 2: "packed"},
             "k_tail": {0: "batch", 2: "tail"}, "v_tail": {0: "batch", 2: "tail"}}
        if self.sink:
            d.update(sink_k={0: "batch"}, sink_v={0: "batch"})
        return d

    def export_dims(self, batch) -> dict[str, dict[int, Any]]:
        """{tensor name: {axis: torch.export.Dim}} of one layer's state (``batch`` shared with
        the other inputs; packed = group × packed_groups, a derived dim)."""
        Dim = torch.export.Dim
        groups = Dim("packed_groups", min=0)
        packed = groups * self.config.group if self.config.group > 1 else groups
        tail = Dim("tail", min=0, max=self.config.ring)
        sym = {"batch": batch, "packed": packed, "packed_groups": groups, "tail": tail}
        return {name: {axis: sym[s] for axis, s in axes.items()}
                for name, axes in self.dims().items()}

    def describe(self, shapes, dtype, num_layers: int) -> dict[str, Any]:
        """The ``state`` block of ``longfx_onnx.json``: per layer the tensors' names, dtypes
        and shapes (dim names as strings), and how to read P off them."""
        rows = []
        ex = self.empty(shapes, dtype, 1, "meta")
        n = len(self.names())
        for i in range(num_layers):
            tensors = []
            for j, name in enumerate(self.names()):
                t, axes = ex[i * n + j], self.dims()[name]
                shape = [axes.get(a, int(s)) for a, s in enumerate(t.shape)]
                tensors.append({"name": name, "input": f"past.{i}.{name}",
                                "output": f"present.{i}.{name}", "shape": shape,
                                "empty_shape": [s if isinstance(s, int) else
                                                ("batch" if s == "batch" else 0) for s in shape],
                                "dtype": str(t.dtype).replace("torch.", "")})
            c = self.config_of(i)
            rows.append({"layer": i, "config": {"bits": c.bits, "key_bits": c.kbits,
                                                "group": c.group, "ring": c.ring,
                                                "scales": c.scales, "rotate": c.rotate,
                                                "clip": c.clip, "sink": self.sink},
                         "tensors": tensors})
        return {
            "layout": self.layout,
            "recipe": self.recipe,
            "description": "kernels/kv_quant/concat_state.py: per layer the packed KIVI codes "
                           "and scales of the first Pp tokens (Pp a multiple of group), the "
                           "last T <= ring tokens in full precision (k_tail, v_tail), and the "
                           "exact copy of the first `sink` tokens; present.* replaces past.* "
                           "each step. Prefill: every past dim 0 but batch (sink copy: zeros). "
                           "P = packed + tail.",
            "length": [{"input": "past.0.k_codes", "axis": 2},
                       {"input": "past.0.k_tail", "axis": 2}],
            "layers": rows,
        }


def state_for(pipeline) -> QuantizedState | None:
    """The exported state a recipe asks for: None (the plain concat cache) or a
    :class:`QuantizedState`; a ValueError for runtime-cache recipes the export cannot carry
    yet (their message names them)."""
    from longfx.passes.kv_quant import KVQuant, cache_recipe

    kv = cache_recipe(pipeline)
    if kv is None:
        return None
    if isinstance(kv, KVQuant):
        return QuantizedState.from_recipe(kv)
    raise ValueError(f"{kv}: its runtime cache has no exported form yet (the ONNX export "
                     "carries the plain cache and kv_quant(...); gear, eviction, think and "
                     "minicache states are not exported)")


__all__ = ["ConcatQuantizedLayer", "QuantizedState", "state_for"]
