"""The embedded real models through the whole front half of the pipeline."""
import torch

import longfx


def test_smollm2_sites_and_exact_compile():
    model, tok = longfx.load("smollm2-135m")
    report = longfx.inspect(model)
    counts = report.counts()
    assert counts["attention"]["found"] == counts["attention"]["rewritable"] == 30
    assert counts["rope"]["found"] == 1 and counts["kv"]["found"] == 60
    attn = [s for s in report.sites if s.kind == "attention"]
    assert [s.layer for s in attn] == list(range(30))
    assert {(s.facts["num_heads"], s.facts["num_kv_heads"], s.facts["head_dim"]) for s in attn} == {(9, 3, 64)}

    fast = longfx.compile(model, "")
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        out = fast(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert fast.longfx_backend.report.counts()["attention"]["rewritten"] == 30
    assert fast.longfx_backend.report.counts()["rope"]["rewritten"] == 1


def test_gemma3_has_18_attention_sites_with_sliding_layers():
    model, _ = longfx.load("gemma3-270m")
    report = longfx.inspect(model, seq_len=520)
    attn = [s for s in report.sites if s.kind == "attention"]
    assert len(attn) == 18 and all(s.rewritable for s in attn)
    kinds = [s.facts["mask_kind"] for s in attn]
    assert kinds.count("causal") == 3                  # every sixth layer is global
    assert kinds.count(f"sliding_window({model.config.sliding_window})") == 15
    assert sum(s.kind == "rope" for s in report.sites) == 2     # local and global tables
