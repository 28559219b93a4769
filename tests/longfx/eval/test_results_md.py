"""benchmarks/make_results.py renders recorded rows (no measuring) and names the gaps."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _module():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "benchmarks" / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(task, length, metrics, depth=None, **kw):
    return {"model": "smollm2-135m", "recipe": "", "plain_model": True, "task": task, "length": length,
            "depth": depth, "n": 1, "metrics": metrics, "seed": 0, "elapsed_s": 1.0, "hardware": "Test CPU",
            "device": "cpu", "threads": 2, "cpus": 2, "torch": "2.13", "transformers": "5.23",
            "python": "3.11", "date": "2026-11-23", **kw}


def test_render_and_check(tmp_path):
    mr = _module()
    rows = [_row("ppl", 2048, {"ppl": 11.91, "nll": 2.48}, prefix_of=2048),
            _row("passkey", 1024, {"acc": 1.0}, depth=0.5, cell_s=2.0),
            _row("passkey", 1024, {"acc": 0.0}, depth=1.0, cell_s=2.0),
            _row("passkey", 1024, {"acc": 0.5}, depth=None)]
    res = tmp_path / "results"
    res.mkdir()
    (res / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "RESULTS.md"
    assert mr.main(["--results", str(res), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| ppl | 2048 | 1 | 11.91 |" in text
    assert "| 1024 | 100% (1/1) | 0% (0/1) | 50% (1/2) |" in text
    assert "Test CPU" in text and "2026-11-23" in text
    # rows without a "prompt" field were measured with longfx's own filler: passkey_alt
    assert "### passkey_alt" in text and "### passkey\n" not in text
    assert "passkey_alt at 2048, 4096, 8192, 12288, 16384: not measured" in text
    assert mr.main(["--results", str(res), "--out", str(out), "--check"]) == 0
    out.write_text(text + "edited\n")
    assert mr.main(["--results", str(res), "--out", str(out), "--check"]) == 1


def test_classic_passkey_rows_keep_their_task(tmp_path):
    mr = _module()
    rows = [_row("passkey", 1024, {"acc": 1.0}, depth=0.5, prompt="classic", cell_s=2.0),
            _row("passkey", 1024, {"acc": 1.0}, depth=None, prompt="classic")]
    res = tmp_path / "results"
    res.mkdir()
    (res / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "RESULTS.md"
    assert mr.main(["--results", str(res), "--out", str(out)]) == 0
    assert "### passkey\n" in out.read_text() and "### passkey_alt" not in out.read_text()


def test_independent_rows_sit_beside_the_harness(tmp_path):
    mr = _module()
    res = tmp_path / "results"
    (res / "independent").mkdir(parents=True)
    (res / "a.jsonl").write_text(json.dumps(_row("ppl", 2048, {"ppl": 11.91}, n=2047)) + "\n")
    ind = {"model": "smollm2-135m", "recipe": "", "task": "ppl", "length": 2048, "n": 2047,
           "metrics": {"ppl": 11.9082}, "env": {"device": "cpu", "hardware": "Test CPU",
                                                "python": "3.11"}}
    (res / "independent" / "b.jsonl").write_text(json.dumps(ind) + "\n")
    out = tmp_path / "RESULTS.md"
    assert mr.main(["--results", str(res), "--out", str(out)]) == 0
    assert "| Test CPU | ppl | `dense` | 2048 | 11.91 | 2047 | 11.91 | 2047 |" in out.read_text()


def test_block_density_rows_get_their_own_table():
    mr = _module()
    rows = [{"model": "smollm2-135m", "recipe": "vertical_slash(vertical=96)", "task": "block_density",
             "length": 8192, "prefill": {"density": 0.2418}, "date": "2026-11-23"}]
    text = mr.block_density(rows)
    assert "| smollm2-135m | `vertical_slash(vertical=96)` | 8192 | 0.242 | 2026-11-23 |" in text
