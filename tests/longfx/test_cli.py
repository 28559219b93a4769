"""The longfx command line, on zoo models (fast) — the real models are in test_real_models."""
import json

from longfx.cli import main


def test_inspect_json(capsys):
    assert main(["inspect", "zoo:llama", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["attention"]["found"] == 2
    assert {row["kind"] for row in data["sites"]} == {"attention", "rope", "kv"}
    assert all({"layer", "rewritable", "reason"} <= set(row) for row in data["sites"])


def test_inspect_table_and_diff(capsys):
    assert main(["inspect", "zoo:gemma3", "--seq-len", "20", "--kinds", "attention"]) == 0
    out = capsys.readouterr().out
    assert "attention[1]" in out and "sliding_window" in out
    assert main(["diff", "zoo:llama", "--recipe", "", "--max-lines", "0"]) == 0
    out = capsys.readouterr().out
    assert "longfx.attention" in out and "longfx.rope" in out


def test_diff_of_a_kv_recipe_ends_with_the_state_bytes_even_when_cut(capsys):
    assert main(["diff", "zoo:llama", "--recipe", "kv_quant(bits=4)", "--max-lines", "3",
                 "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "more lines" in out and "KV state at 1024 tokens" in out and "all layers:" in out


def test_bad_recipe_points_at_token(capsys):
    assert main(["diff", "zoo:llama", "--recipe", "nosuch(x=1)"]) == 2
    out = capsys.readouterr().out
    assert "error" in out and "^" in out and "nosuch" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "no-such-model-xyz"]) == 2
    out = capsys.readouterr().out
    assert "smollm2-135m" in out                      # the message lists the known names


def test_python_dash_m_runs_the_cli():
    """``python -m longfx`` is the ``longfx`` script."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "longfx", "eval", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "usage: longfx eval" in out.stdout
