"""A zoo of tiny random-weight Hugging Face models, built from config classes (never downloaded).

Every entry is 2 layers, hidden size 64, vocabulary 128, seeded: small enough to trace and run
on a shared CPU in well under a second, large enough to have every structural feature of its
architecture (GQA, partial rotary, sliding + full layers, cross-attention...). Each entry also
states what the analysis must find in its graph, so detection and rewrite tests read their
expectations from here instead of hard-coding them::

    from longfx.rewrite.testing import zoo
    model, inputs = zoo.build("llama", attn_implementation="sdpa")
    logits = model(**inputs).logits
    zoo.ZOO["llama"].attention_sites      # 2: one per layer
    zoo.ZOO["llama"].rope_style           # "rotate_half"

Expectations are about one forward over ``example inputs`` (batch 2, 11 tokens, no cache
passed in). ``rope_tables`` counts frequency tables (one ``RopeSite`` each): HF computes the
table once per model (Gemma 3: once per layer type, local and global) and applies it to q and k
in every layer, so ``rope_applications`` is ``2 * layers`` (q and k).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS          # 16
LAYERS = 2
BATCH, SEQ = 2, 11                  # odd sequence length: catches S/D mix-ups

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GQA = dict(_DECODER, num_key_value_heads=KV_HEADS)


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it and what its graph holds."""

    name: str
    config_class: str                    # a class of the ``transformers`` namespace
    model_class: str
    config: dict[str, Any]
    attention_sites: int                 # attention computations in one forward
    causal: bool                         # self-attention of the (decoder) stack is causal
    rope_tables: int = 0                 # RopeSites: one per frequency table
    rope_style: str | None = None        # "rotate_half" | "interleaved" | "complex"
    rotary_dim: int | None = None        # channels rotated per head (< head_dim: partial rotary)
    head_dim: int = HEAD_DIM
    num_heads: int = HEADS
    num_kv_heads: int = HEADS
    attn_implementations: tuple[str, ...] = ("eager", "sdpa")
    unsupported: dict[str, str] = field(default_factory=dict)   # implementation -> reason
    encoder_decoder: bool = False
    dynamo_graphs: int = 1               # graphs Dynamo makes of one forward (1: no breaks)
    notes: str = ""

    @property
    def rope_applications(self) -> int:
        """Rotations in one forward: q and k of every layer that uses RoPE."""
        return 2 * LAYERS if self.rope_tables else 0

    @property
    def has_rope(self) -> bool:
        return self.rope_tables > 0


def _entries() -> list[Entry]:
    return [
        Entry("llama", "LlamaConfig", "LlamaForCausalLM", dict(_GQA),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS),
        Entry("mistral", "MistralConfig", "MistralForCausalLM",
              dict(_GQA, sliding_window=4, head_dim=HEAD_DIM),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
              notes="sliding_window=4 < 11 tokens: both layers see a banded causal mask"),
        Entry("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(_GQA),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS, notes="q/k/v projections have bias"),
        Entry("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=HEAD_DIM),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
              notes="RMSNorm on q and k (per head) before RoPE"),
        Entry("gemma", "GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=HEAD_DIM),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS),
        Entry("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
              dict(_GQA, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"],
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS, attn_implementations=("eager",),
              unsupported={"sdpa": "Gemma2PreTrainedModel sets _supports_sdpa = False in "
                                   "transformers 5.23 (SDPA has no logit soft-capping): "
                                   "_from_config raises ValueError"},
              notes="tanh soft-capping of the scores (eager); layer 0 sliding (window 4), "
                    "layer 1 full; one RoPE table for both"),
        Entry("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
              dict(_GQA, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"]),
              attention_sites=2, causal=True, rope_tables=2, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
              notes="layer 0 sliding (window 4, local table theta=1e4), layer 1 full "
                    "(global table theta=1e6): two RoPE tables, one application pair each; "
                    "q/k RMSNorm"),
        Entry("phi3", "Phi3Config", "Phi3ForCausalLM",
              dict(_GQA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5}),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM // 2, num_kv_heads=KV_HEADS,
              notes="fused qkv projection; partial rotary (factor 0.5: 8 of 16 channels), "
                    "the pass-through channels concatenated back"),
        Entry("gpt2", "GPT2Config", "GPT2LMHeadModel",
              dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                   n_positions=128, bos_token_id=1, eos_token_id=2),
              attention_sites=2, causal=True,
              notes="Conv1D fused qkv (addmm), learned absolute positions"),
        Entry("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
              dict(_DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25}),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM // 4,
              notes="fused qkv; partial rotary (rotary_pct 0.25: 4 of 16 channels)"),
        Entry("opt", "OPTConfig", "OPTForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, ffn_dim=2 * HIDDEN, word_embed_proj_dim=HIDDEN,
                   max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2),
              attention_sites=2, causal=True, notes="learned positions (offset 2)"),
        Entry("falcon", "FalconConfig", "FalconForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, max_position_embeddings=128, bos_token_id=1,
                   eos_token_id=2, alibi=False, multi_query=True, parallel_attn=True),
              attention_sites=2, causal=True, rope_tables=1, rope_style="rotate_half",
              rotary_dim=HEAD_DIM, num_kv_heads=1,
              notes="Falcon-7B layout: multi-query (1 kv head), parallel attention/MLP, "
                    "rotary (alibi=False)"),
        Entry("bert", "BertConfig", "BertModel",
              dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                   max_position_embeddings=128, pad_token_id=0),
              attention_sites=2, causal=False,
              notes="bidirectional encoder; all-ones padding mask"),
        Entry("t5", "T5Config", "T5ForConditionalGeneration",
              dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=2 * HIDDEN,
                   num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
              attention_sites=3 * LAYERS, causal=True, encoder_decoder=True,
              notes="per layer: encoder self (bidirectional) + decoder self (causal) + decoder "
                    "cross; no 1/sqrt(d) scale; additive relative-position bias"),
    ]


ZOO: dict[str, Entry] = {e.name: e for e in _entries()}


def names() -> list[str]:
    return list(ZOO)


def example_inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids for ``name`` (batch 2, 11 tokens; T5 also gets 7 decoder tokens)."""
    entry = ZOO[name]
    gen = torch.Generator().manual_seed(seed + 1)
    # Ids from 3 up: never the pad/bos/eos ids, so no model masks or shifts anything.
    inputs = {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)}
    if entry.encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 7), generator=gen)
    return inputs


def config(name: str, attn_implementation: str = "eager"):
    """The config object of ``name`` (a fresh one each call)."""
    import transformers

    entry = ZOO[name]
    cfg = getattr(transformers, entry.config_class)(**entry.config)
    cfg._attn_implementation = attn_implementation
    return cfg


def build(name: str, attn_implementation: str = "eager", seed: int = 0):
    """``(model.eval(), example_inputs)`` for zoo entry ``name``; weights seeded by ``seed``.

    Raises ValueError for an attention implementation the architecture does not support
    (``ZOO[name].unsupported`` says why).
    """
    import transformers

    if name not in ZOO:
        raise KeyError(f"no zoo model {name!r}; have {names()}")
    entry = ZOO[name]
    if attn_implementation not in entry.attn_implementations:
        reason = entry.unsupported.get(attn_implementation, "not supported by this zoo entry")
        raise ValueError(f"{name} does not support attn_implementation="
                         f"{attn_implementation!r}: {reason}")
    cfg = getattr(transformers, entry.config_class)(**entry.config)
    cls = getattr(transformers, entry.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(cfg, attn_implementation=attn_implementation,
                                 dtype=torch.float32)
    return model.eval(), example_inputs(name, seed)


def token_ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, n] of the zoo vocabulary (special ids below 3 left out)."""
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def feed(model, ids: torch.Tensor, cache, chunks) -> torch.Tensor:
    """Run ``ids`` [B, S] through ``model`` with ``cache`` in chunks of the given sizes; the
    logits of every position, [B, sum(chunks), V]."""
    out, a = [], 0
    with torch.no_grad():
        for s in chunks:
            out.append(model(input_ids=ids[:, a:a + s], past_key_values=cache,
                             use_cache=True).logits)
            a += s
    return torch.cat(out, 1)


def first_layer_queries(model, ids: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's post-RoPE queries [B, H, S, D] for ``ids`` [B, S] (a Llama-
    layout HF model, positions 0..S-1): what layer 0's attention sees, with no cache involved
    — the window queries SnapKV-style scoring reads."""
    from longfx.kernels.kv_evict.reference import rotate_half

    m = model.model
    attn = m.layers[0].self_attn
    B, S = ids.shape
    with torch.no_grad():
        h = m.layers[0].input_layernorm(m.embed_tokens(ids))
        cos, sin = m.rotary_emb(h, torch.arange(S)[None])
        q = attn.q_proj(h).view(B, S, -1, attn.head_dim).transpose(1, 2)   # [B, H, S, D]
        return q * cos[:, None] + rotate_half(q) * sin[:, None]


def record_graphs(model, inputs: dict[str, Any], **compile_kwargs) -> list[tuple[Any, list]]:
    """Compile ``model`` under Dynamo with a recording backend and run it once on ``inputs``.

    Returns ``[(GraphModule, example_inputs), ...]``, one per graph Dynamo produced (more
    than one means graph breaks).
    """
    import torch._dynamo

    graphs: list[tuple[Any, list]] = []

    def backend(gm, example):
        graphs.append((gm, list(example)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    with torch.no_grad():
        compiled(**inputs)
    return graphs


_CAPTURED: dict[tuple, list] = {}


def captured(name: str, attn_implementation: str | None = None, seed: int = 0) -> list:
    """:func:`record_graphs` of ``build(name, ...)``, memoized per process.

    The graphs are shared between callers: analyze them freely, but rewrite a copy
    (``longfx.rewrite.engine.copy_graph_module``). ``attn_implementation`` defaults to the
    entry's first supported one.
    """
    impl = attn_implementation or ZOO[name].attn_implementations[0]
    key = (name, impl, seed)
    if key not in _CAPTURED:
        model, inputs = build(name, impl, seed)
        _CAPTURED[key] = record_graphs(model, inputs)
    return _CAPTURED[key]
