"""The pass manager's dead-code rule keeps every write (rewrite/manager.py ``is_impure``)."""
import torch
import torch.fx as fx

from longfx.kernels.kv_quant import op as kv_op
from longfx.rewrite import manager
from longfx.rewrite.engine import rewrite_graph
from longfx.rewrite.manager import is_impure, mutates

aten = torch.ops.aten


def test_mutates_reads_the_schema_of_overloads_and_packets():
    assert mutates(torch.ops.longfx.kv_quant_append)             # the packet
    assert mutates(kv_op.APPEND) and mutates(kv_op.GEAR_APPEND)
    assert mutates(aten.add_.Tensor)
    assert not mutates(aten.add.Tensor) and not mutates(kv_op.READ)
    assert not mutates(torch.ops.longfx.kv_quant_read) and not mutates(torch.add)


def _graph_with_unused_append() -> fx.GraphModule:
    """state tensors in, the append's (None) result unused, the ring returned."""
    g = fx.Graph()
    names = ("k_codes", "k_params", "v_codes", "v_params", "k_ring", "v_ring", "length", "k", "v")
    args = [g.placeholder(n) for n in names]
    g.call_function(torch.ops.longfx.kv_quant_append, (*args, 4, 64))
    g.output(args[4])
    return fx.GraphModule(torch.nn.Module(), g)


def test_a_packet_call_that_writes_survives_dead_code_elimination(monkeypatch):
    # torch 2.11's Node.is_impure does not resolve a packet to its schema (the kv_quant bug on
    # the GPU machine); emulate it here, where torch 2.13 does resolve it
    monkeypatch.setattr(fx.Node, "is_impure", lambda self, *a, **k: False)
    gm = _graph_with_unused_append()
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert is_impure(node)
    new, _ = rewrite_graph(gm)                      # the canonical passes, their dead-code rule
    assert any(n.target is torch.ops.longfx.kv_quant_append for n in new.graph.nodes)
    # without the schema test the same passes drop it: the test above can fail
    monkeypatch.setattr(manager, "mutates", lambda target: False)
    new, _ = rewrite_graph(gm)
    assert not any(n.target is torch.ops.longfx.kv_quant_append for n in new.graph.nodes)
