"""runtime/decode_graph.py: decode steps replayed as a CUDA graph only when shown replayable.

On CPU (CI) the runner must run every step through the compiled model, give exactly its
logits, and say why it did not record; the proof it relies on (which compiled graphs read a
host integer, rewrite/capture.py ``int_inputs_read``) is checked on the zoo Llama: a lowered
``kv_quant`` decode step reads none, the unlowered one (``fuse=false``) reads the lengths.
The replay itself needs CUDA (the last tests, skipped without it).
"""
from __future__ import annotations

import pytest
import torch

import longfx
from longfx.runtime.decode_graph import DecodeGraph, DecodeGraphError
from longfx.testing import tiny

RECIPE = "kv_quant(bits=4, group=16, residual=16)"


def _compiled(recipe: str, device: str = "cpu", dtype=torch.float32):
    model, _ = tiny("llama", attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    return longfx.compile(model, recipe)


def _decode_graphs_read(recipe: str, positions: bool = True) -> list[tuple[int, ...]]:
    """int_inputs_read of the compiled graphs a decode step runs, after two warm-up steps;
    ``positions``: pass position_ids as the runner does (else the model makes them from the
    cache's Python length, which the step then reads)."""
    fast = _compiled(recipe)
    cache = fast.longfx_new_cache()
    be = fast.longfx_backend
    with torch.no_grad():
        tok = fast(input_ids=torch.randint(3, 100, (1, 40)), past_key_values=cache,
                   use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(3):
            be.calls = []
            pos = {"position_ids": torch.full_like(tok, cache.get_seq_length())} \
                if positions else {}
            tok = fast(input_ids=tok, past_key_values=cache, use_cache=True, **pos
                       ).logits[:, -1:].argmax(-1)
            calls, be.calls = be.calls, None
    return [be.int_inputs_read[i] for i, _ in calls]


def test_a_lowered_decode_step_reads_no_host_integer():
    read = _decode_graphs_read(RECIPE)
    assert read and all(r == () for r in read)


def test_an_unlowered_decode_step_reads_the_lengths():
    read = _decode_graphs_read(RECIPE[:-1] + ", fuse=false)")
    assert any(r for r in read)


def test_positions_made_from_the_cache_length_are_read():
    read = _decode_graphs_read(RECIPE, positions=False)
    assert any(r for r in read)


def test_a_dynamic_batch_is_read_but_steady_and_the_length_changes():
    """After batches of 1 and 3 Dynamo makes the batch a SymInt the decode graph reads (view
    shapes). It keeps its value from step to step, so the runner bakes it in; the lengths
    (which change every step) stay unread."""
    fast = _compiled(RECIPE)
    be = fast.longfx_backend
    runs = []
    for batch in (1, 3):
        cache = fast.longfx_new_cache()
        with torch.no_grad():
            tok = fast(input_ids=torch.randint(3, 100, (batch, 40)), past_key_values=cache,
                       use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(2):
                be.calls = []
                tok = fast(input_ids=tok, position_ids=torch.full_like(tok, cache.get_seq_length()),
                           past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                runs.append(be.calls)
                be.calls = None
    (index, first), (again, second) = runs[-2][0], runs[-1][0]
    read = be.int_inputs_read[index]
    assert index == again and read and {first[p] for p in read} == {second[p] for p in read} == {3}
    changed = [p for p in first if first[p] != second[p]]
    assert changed and not set(changed) & set(read)         # the lengths: passed, not read
    runner = DecodeGraph(fast, cache)
    runner._runs = runs[-2:]
    assert runner._reads_changing_ints(index) == []


def _greedy_plain(fast, cache, ids, n):
    with torch.no_grad():
        out = fast(input_ids=ids, past_key_values=cache, use_cache=True)
        tok, toks, logits = out.logits[:, -1:].argmax(-1), [], []
        toks.append(tok)
        for _ in range(n - 1):
            out = fast(input_ids=tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits.clone())
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
    return torch.cat(toks, 1), logits


def test_on_cpu_every_step_runs_the_compiled_model_and_says_why():
    fast = _compiled(RECIPE)
    ids = torch.randint(3, 100, (2, 37), generator=torch.Generator().manual_seed(1))
    want, _ = _greedy_plain(fast, fast.longfx_new_cache(), ids, 12)
    runner = DecodeGraph(fast, fast.longfx_new_cache(), headroom=8)
    got = runner.generate(ids, 12, prefill_chunk=16)
    assert torch.equal(got, want)
    assert runner.replays == 0 and runner.captures == 0 and runner.normal_steps == 11
    assert runner.reason == "CUDA graphs need a CUDA device"


def test_bad_inputs_are_refused_with_the_reason():
    model, _ = tiny("llama", attn_implementation="sdpa")
    fast = longfx.compile(model, RECIPE)
    with pytest.raises(DecodeGraphError, match="longfx.compile"):
        DecodeGraph(model, fast.longfx_new_cache())
    with pytest.raises(DecodeGraphError, match="reserves storage"):
        DecodeGraph(fast, object())
    with pytest.raises(DecodeGraphError, match="warmup"):
        DecodeGraph(fast, fast.longfx_new_cache(), warmup=1)
    runner = DecodeGraph(fast, fast.longfx_new_cache())
    with pytest.raises(ValueError, match=r"input_ids \[B, 1\]"):
        runner.step(torch.ones(1, 3, dtype=torch.long))


def test_sliding_window_caches_are_refused():
    model, _ = tiny("gemma3", attn_implementation="sdpa")
    fast = longfx.compile(model, RECIPE)
    with pytest.raises(DecodeGraphError, match="sliding window"):
        DecodeGraph(fast, fast.longfx_new_cache())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
CUDA_RECIPE = "kv_quant(bits=4, group=32, residual=32)"


def _cuda_llama(recipe: str):
    """A two-layer Llama the Triton kv_quant kernels take (head_dim 64, GQA 2), fp16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, intermediate_size=512, num_hidden_layers=2, vocab_size=256,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    return longfx.compile(model, recipe)


@cuda
@pytest.mark.parametrize("recipe", [CUDA_RECIPE, "kv_quant(bits=2, group=32, residual=32, sink=4)",
                                    "kv_quant(bits=2, group=32, residual=32, rotate=true, "
                                    "clip=true, key_bits=4)"])
def test_replayed_steps_give_the_compiled_steps_tokens(recipe):
    """Greedy tokens through recordings that cross packed-group and ring boundaries and
    re-recordings (headroom 40 over 150 steps) equal the plain compiled steps'."""
    fast = _cuda_llama(recipe)
    ids = torch.randint(3, 250, (2, 70), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(2))
    want, _ = _greedy_plain(fast, fast.longfx_new_cache(), ids, 150)
    runner = DecodeGraph(fast, fast.longfx_new_cache(), headroom=40)
    got = runner.generate(ids, 150)
    assert runner.captures >= 3 and runner.replays >= 120, (runner.captures, runner.replays,
                                                             runner.reason)
    assert torch.equal(got, want)


@cuda
def test_an_unlowered_step_is_never_replayed_on_cuda():
    fast = _cuda_llama(CUDA_RECIPE[:-1] + ", fuse=false)")
    runner = DecodeGraph(fast, fast.longfx_new_cache())
    ids = torch.randint(3, 250, (1, 20), device="cuda")
    want, _ = _greedy_plain(fast, fast.longfx_new_cache(), ids, 8)
    assert torch.equal(runner.generate(ids, 8), want)
    assert runner.replays == 0 and runner.captures == 0
    assert "reads host integers" in runner.reason or "waits for the GPU" in runner.reason


@cuda
def test_an_op_fallback_that_syncs_is_seen_before_recording():
    """The zoo Llama (head_dim 16, groups of 16) is not a shape the Triton decode takes: the
    op's dequantized fallback reads the length on the host, which the sync watch sees in the
    warm-up, so no recording is tried and the tokens are the compiled steps'."""
    model, _ = tiny("llama", attn_implementation="sdpa")
    fast = longfx.compile(model.to("cuda", torch.float16), RECIPE)
    ids = torch.randint(3, 100, (1, 40), device="cuda")
    want, _ = _greedy_plain(fast, fast.longfx_new_cache(), ids, 12)
    runner = DecodeGraph(fast, fast.longfx_new_cache())
    assert torch.equal(runner.generate(ids, 12), want)
    assert runner.captures == 0 and "waits for the GPU" in runner.reason, runner.reason
