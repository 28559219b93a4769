"""Write your own rewrite rule and test it with longfx.testing.

The rule below acts on canonical attention sites (after canonicalization every site is one
``longfx::attention`` call) and sharpens the softmax by multiplying the scale by 1.25 — a toy
transform, but it shows the whole contract: ``check`` reads and returns facts or a reason,
``replace`` edits the graph and returns the nodes it made, the manager stamps provenance.

    python examples/write_a_pass.py
"""
import torch
import torch.fx as fx

from longfx import testing
from longfx.rewrite.rule import Rule


class SharpenScale(Rule):
    name = "example.sharpen_scale"
    kind = "attention"
    stage = "transform"

    def __init__(self, factor: float = 1.25):
        self.factor = factor

    def check(self, site, gm: fx.GraphModule):
        node = site.nodes.get("canonical")
        if node is None:
            return "site was not canonicalized"
        if not isinstance(node.args[4], float):
            return "scale is computed at run time"
        return {"node": node}

    def replace(self, site, gm: fx.GraphModule, facts):
        node = facts["node"]
        args = list(node.args)
        args[4] = args[4] * self.factor           # q, k, v, mask, scale, is_causal, softcap
        node.args = tuple(args)
        site.facts["scale"] = args[4]
        return [node]


if __name__ == "__main__":
    model, inputs = testing.tiny("llama", "eager")
    result = testing.run_pass(model, inputs, rules=[SharpenScale()])
    testing.assert_counts(result, "attention", found=2, rewritten=2)
    stamped = [rule for gm in result.rewritten for n in gm.graph.nodes if "longfx" in n.meta
               for rule in (*n.meta["longfx"]["history"], n.meta["longfx"]["rule"])]
    print("provenance:", sorted(set(stamped)))
    try:
        testing.assert_close(result, rtol=1e-5)
    except AssertionError as e:                   # a lossy rewrite: the outputs must move
        print("as expected, the outputs changed:", e)
    print(result.report.graphs[0].diff()[:1500])
