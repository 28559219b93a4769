"""The harness must catch a broken rewrite: SmolLM2 whose attention sees only the last 16 keys
(as if the KV cache kept 16 tokens) loses the pass key, while the dense model finds it.

The broken variant is test-only: an attention function registered under a private name and a
wrapper that switches the model to it for the duration of each forward call."""
import contextlib

import pytest
import torch

from longfx.eval import evaluate

KEEP = 16
NAME = "longfx_test_last16"


def _last16_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    S, Skv = query.shape[2], key.shape[2]
    qpos = torch.arange(Skv - S, Skv, device=query.device)[:, None]       # [S, 1]
    kpos = torch.arange(Skv, device=query.device)[None, :]                # [1, Skv]
    keep = (kpos <= qpos) & (kpos > qpos - KEEP)                          # [S, Skv]
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, keep[None, None], is_causal=False, **kwargs)


class Last16(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @contextlib.contextmanager
    def _swapped(self):
        old = self.inner.config._attn_implementation
        self.inner.config._attn_implementation = NAME
        try:
            yield
        finally:
            self.inner.config._attn_implementation = old

    def forward(self, *args, **kwargs):
        with self._swapped():
            return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def smollm2():
    longfx = pytest.importorskip("longfx")
    try:
        return longfx.load("smollm2-135m")
    except ImportError as e:                       # the model package is not installed
        pytest.skip(str(e))


def test_dropping_all_but_16_kv_tokens_collapses_passkey(smollm2):
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _last16_attention)
    model, tok = smollm2
    rows = evaluate(model, tokenizer=tok, recipes=[("last16", Last16)], tasks=["passkey"],
                    lengths=[160], depths=[0.0, 0.4], trials=1, progress=False)
    acc = {r["recipe"]: r["metrics"]["acc"] for r in rows if r["depth"] is None}
    assert acc[""] == 1.0, rows
    assert acc["last16"] == 0.0, rows
    broken = next(r for r in rows if r["recipe"] == "last16" and r["depth"] is None)
    assert broken["delta"]["acc"] == -1.0
    assert model.config._attn_implementation != NAME        # the wrapper restored the model
