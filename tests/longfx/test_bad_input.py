"""Bad input: a clear message, and the model keeps working unrewritten."""
import pytest
import torch

import longfx
from longfx.rewrite.capture import Backend
from longfx.rewrite.engine import RewriteWarning
from longfx.rewrite.rule import Rule
from longfx.rewrite.testing import handmade


class _Broken(Rule):
    name = "broken"
    kind = "attention"
    stage = "transform"

    def check(self, site, gm):
        return {}

    def replace(self, site, gm, facts):
        raise RuntimeError("this rule is broken on purpose")


def test_failing_rule_leaves_graph_unrewritten_with_warning():
    model, x = handmade.make("nanogpt")
    be = Backend([_Broken()])
    with pytest.warns(RewriteWarning, match="left unrewritten: RuntimeError: this rule is broken"):
        out = torch.compile(model, backend=be)(x)
    assert torch.equal(out, model(x))
    assert any("broken on purpose" in w for w in be.report.warnings)


class _Breaking(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, _ = handmade.make("nanogpt")

    def forward(self, x):
        y = self.a(x)
        print("host-side effect")            # Dynamo cannot capture this: graph break
        return y * 2


def test_graph_break_is_reported_and_outputs_unchanged(capsys):
    model = _Breaking().eval()
    x = handmade.make("nanogpt")[1]
    fast = longfx.compile(model)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-6)
    warnings = fast.longfx_backend.report.warnings
    assert any("graph break" in w and "print" in w.lower() for w in warnings), warnings
    assert fast.longfx_backend.report.counts()["attention"]["rewritten"] == 2
