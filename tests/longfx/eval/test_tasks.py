"""Every task end to end on a tiny random model (zoo llama, 2 layers, vocab 128), short lengths."""
import json

import pytest
import torch

import longfx
from longfx.eval import evaluate, load_rows
from longfx.eval import cli as eval_cli
from longfx.eval import infer, ppl
from longfx.rewrite.testing import zoo

FIELDS = {"model", "recipe", "task", "length", "metrics", "n", "seed", "hardware", "torch",
          "transformers", "date", "plain_model"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and the CI cores are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    model, _ = zoo.build("llama", "sdpa")
    return model.eval()


def test_ppl_chunked_equals_one_pass(tiny):
    ids = torch.arange(1, 97) % 120 + 1
    chunked = ppl.nll_stream(tiny, ids, chunk=32)
    with torch.no_grad():
        logits = tiny(ids[None]).logits[0, :-1]
    whole = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_all_tasks_rows(tiny, tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = evaluate(tiny, tasks=["ppl", "passkey", "passkey_hard", "needle", "kl", "cost"],
                    lengths=[48, 96], depths=[0.0, 1.0], chunk=32, out=out, progress=False,
                    model_name="tiny-llama", decode_tokens=3, keys=2, values=2)
    assert {r["task"] for r in rows} == {"ppl", "passkey", "passkey_hard", "needle", "kl", "cost"}
    for r in rows:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["recipe"] == "" and r["plain_model"] is True and "delta" not in r
    p = {r["length"]: r["metrics"]["ppl"] for r in rows if r["task"] == "ppl"}
    assert set(p) == {48, 96} and all(1 < v < 1000 for v in p.values())
    pk = [r for r in rows if r["task"] == "passkey"]
    assert len(pk) == 2 * 3                          # 2 depths + pooled, per length
    assert {r["variant"] for r in rows if r["task"] == "needle"} == {"multikey", "multivalue"}
    c = next(r for r in rows if r["task"] == "cost" and r["length"] == 96)["metrics"]
    # 2 layers x (k, v) x 96 tokens x Hkv x D x 4 bytes
    cfg = tiny.config
    hkv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert c["kv_bytes"] >= 2 * cfg.num_hidden_layers * 96 * hkv * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert c["prefill_s"] > 0 and c["decode_s_per_token"] > 0
    assert load_rows([out]) == json.loads(json.dumps(rows))


def test_same_seed_same_rows(tiny):
    kw = dict(tasks=["passkey", "needle"], lengths=[64], depths=[0.5], trials=2, chunk=64,
              progress=False, needle_modes="multikey")
    a, b = evaluate(tiny, seed=1, **kw), evaluate(tiny, seed=1, **kw)
    strip = lambda rows: [(r["task"], r["metrics"], r.get("answers")) for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_recipe_rows_carry_delta_and_exact_compile_has_zero_kl(tiny):
    rows = evaluate(tiny, recipes=[("compiled", lambda m: longfx.compile(m, ""))],
                    tasks=["ppl", "kl"], lengths=[64], chunk=64, progress=False)
    dense = [r for r in rows if r["recipe"] == ""]
    comp = [r for r in rows if r["recipe"] == "compiled"]
    assert len(dense) == len(comp) == 2 and all(not r["plain_model"] for r in comp)
    kl = next(r for r in comp if r["task"] == "kl")["metrics"]
    assert kl["kl"] < 1e-6 and kl["top1_agree"] == 1.0
    assert abs(next(r for r in comp if r["task"] == "ppl")["delta"]["ppl"]) < 1e-3


def test_a_recipe_that_rewrites_nothing_is_flagged(tiny):
    gpt2, _ = zoo.build("gpt2", "sdpa")          # no RoPE: rope_cap rejects every site
    with pytest.warns(RuntimeWarning, match="rewrote no site"):
        rows = evaluate(gpt2, recipes=["rope_cap(max_distance=16)"], tasks=["ppl"],
                        lengths=[32], chunk=32, progress=False)
    row = next(r for r in rows if r["recipe"])
    assert row["rewrite"]["rewritten"] == 0 and "RoPE" in row["rewrite"]["reasons"][0]
    assert "unchanged model" in row["warning"]
    rows = evaluate(tiny, recipes=["sink_window(sink=2, window=8)"], tasks=["ppl"],
                    lengths=[32], chunk=16, progress=False)
    row = next(r for r in rows if r["recipe"])
    assert row["rewrite"]["rewritten"] >= 2 and "warning" not in row   # 2 per graph


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(tiny, tasks=["nope"], progress=False)
    with pytest.raises(Exception):
        evaluate(tiny, recipes=["not a recipe((("], tasks=["ppl"], lengths=[32], progress=False)


def test_cli_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.jsonl", tmp_path / "r.png"
    rc = eval_cli.main(["eval", "zoo:llama", "--task", "ppl,passkey,cost", "--length", "32,64",
                        "--depths", "0,1", "--chunk", "32", "--out", str(out), "--plot", str(png),
                        "--no-progress"])
    assert rc == 0 and png.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "passkey" in text and "ppl" in text and "dense" in text
    rc = eval_cli.main(["eval", "--from", str(out), "--json"])
    assert rc == 0 and len(capsys.readouterr().out.splitlines()) == len(load_rows([out]))
    assert eval_cli.main(["eval", "zoo:llama", "--task", "bogus", "--no-progress"]) == 2


def test_device_choice(monkeypatch):
    """A model loaded by name goes to the GPU when there is one (``--device auto``), and asking
    for CUDA where there is none is a clear error, not a silent CPU run."""
    from longfx import eval as ev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev._device("auto") == "cpu" and ev._device(None) == "cpu" and ev._device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA"):
        ev._device("cuda:0")
    rows = evaluate("zoo:llama", tasks=["ppl"], lengths=[32], chunk=32, progress=False,
                    device="cpu")
    assert rows[0]["device"] == "cpu"
    assert eval_cli.main(["eval", "zoo:llama", "--device", "cuda", "--no-progress"]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev._device("auto") == "cuda"


def test_kv_bytes_counts_cache():
    from transformers import DynamicCache
    c = DynamicCache()
    c.update(torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8), 0)
    assert infer.kv_bytes(c) == 2 * 2 * 10 * 8 * 4


def test_cost_reads_the_cache_after_the_first_decode_step(tiny):
    """SnapKV compresses when the first one-token call shows the prompt ended: ``kv_bytes``
    (after prefill) still holds every token, ``kv_bytes_decode`` the kept half."""
    rows = evaluate(tiny, recipes=["snapkv(ratio=0.5, window=8)"], tasks=["cost"], lengths=[96],
                    chunk=32, progress=False, decode_tokens=2)
    m = {r["recipe"]: r["metrics"] for r in rows}
    dense, snap = m[""], m["snapkv(ratio=0.5, window=8, kernel=15)"]
    assert dense["kv_bytes_decode"] > dense["kv_bytes"]            # one more token
    assert snap["kv_bytes"] == dense["kv_bytes"]
    assert snap["kv_bytes_decode"] < 0.6 * dense["kv_bytes_decode"]
