"""passes/canonical/unmasked_decode.py: a one-query decode step's all-visible mask is dropped."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from longfx import testing as T
from longfx.kernels.attention.op import OP as DENSE

RULE = "attention.unmasked_decode"


class SizesMaskAttention(nn.Module):
    """One GQA attention over a DynamicCache whose mask is built from sizes, the way
    transformers 5.17 builds SmolLM2's decode mask: ``key position <= query position``, and
    optionally a window (``window`` > 0) or a padding row read from an input tensor."""

    def __init__(self, window: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.window = window

    def forward(self, x, cache, pad=None):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 4, 8).transpose(1, 2)                  # [B, 4, S, 8]
        k = self.k(x).view(B, S, 2, 8).transpose(1, 2)                  # [B, 2, S, 8]
        v = self.v(x).view(B, S, 2, 8).transpose(1, 2)
        k, v = cache.update(k, v, 0)
        L = k.shape[2]
        qpos = torch.arange(L - S, L)[:, None]                          # [S, 1]
        kpos = torch.arange(L)[None, :]                                 # [1, L]
        mask = kpos <= qpos
        if self.window:
            mask = mask & (kpos > qpos - self.window)
        mask = mask[None, None]                                         # [1, 1, S, L]
        if pad is not None:
            mask = mask & pad[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _decode(model, pad=False):
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1)), cache)
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))
    inputs = (x, cache, torch.ones(1, 7, dtype=torch.long)) if pad else (x, cache)
    return T.run_pass(model, inputs)


def _canonical(res):
    return [n for gm in res.rewritten for n in gm.graph.nodes if n.target is DENSE]


def test_decode_mask_from_sizes_is_dropped():
    res = _decode(SizesMaskAttention())
    (node,) = _canonical(res)
    assert node.args[3] is None
    (site,) = res.sites("attention")
    assert RULE in site.facts["rules"] and site.facts["decode_mask"].startswith("dropped")
    T.assert_close(res, rtol=1e-6)        # the original graph runs torch's SDPA, not the reference


def test_dropping_an_all_true_mask_is_exact_on_cpu():
    """The reference with an all-true bool mask or an all-zero float mask equals no mask."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 29, 16, generator=g), \
        torch.randn(2, 2, 29, 16, generator=g)
    bare = torch.ops.longfx.attention(q, k, v, None, 0.25, False, 0.0)
    for mask in (torch.ones(1, 1, 1, 29, dtype=torch.bool), torch.zeros(1, 1, 1, 29)):
        assert torch.equal(torch.ops.longfx.attention(q, k, v, mask, 0.25, False, 0.0), bare)


def test_prefill_mask_stays():
    cache = DynamicCache()
    res = T.run_pass(SizesMaskAttention(), (torch.randn(1, 5, 32), cache))
    (node,) = _canonical(res)
    assert node.args[3] is not None
    assert RULE not in res.sites("attention")[0].facts.get("rules", [])


def test_window_or_padding_keeps_the_mask():
    """A window hides cached keys; a mask that reads an input tensor may carry padding."""
    for res in (_decode(SizesMaskAttention(window=3)), _decode(SizesMaskAttention(), pad=True)):
        (node,) = _canonical(res)
        assert node.args[3] is not None
        assert RULE not in res.sites("attention")[0].facts.get("rules", [])
        T.assert_close(res, rtol=1e-6)
