"""Packaging guardrails: one import namespace, ``longfx``.

setup.py maps rewrite/, passes/, kernels/, runtime/ into longfx.*; nothing else may land at the
top level of site-packages (PyPI has unrelated ``kernels`` and ``runtime`` packages, and
transformers imports one called ``kernels``).
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("rewrite", "passes", "kernels", "runtime")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy, so the build/ and *.egg-info folders never appear in the shared tree.
    src = tmp_path_factory.mktemp("src") / "longfx"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "out",
        ".whl", "*.onnx", "*.png"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, timeout=600)
    [whl] = out.glob("longfx-*.whl")
    return whl


def test_wheel_has_one_top_level_name(wheel):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"longfx", f"longfx-{version}.dist-info"}, top
    for path in ("longfx/__init__.py", "longfx/models.py", "longfx/recipes.py",
                 "longfx/rewrite/graph.py", "longfx/rewrite/__init__.py",
                 "longfx/kernels/__init__.py", "longfx/passes/__init__.py",
                 "longfx/runtime/__init__.py"):
        assert path in names, path
    # every package folder of the source tree made it into the wheel
    for folder in SOURCE_FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert f"longfx/{rel}" in names, rel
    meta = zipfile.ZipFile(wheel)
    dist = f"longfx-{version}.dist-info"
    entry_points = meta.read(f"{dist}/entry_points.txt").decode()
    assert "longfx = longfx.cli:main" in entry_points
    if f"{dist}/top_level.txt" in names:
        assert meta.read(f"{dist}/top_level.txt").decode().split() == ["longfx"]


def test_no_conftest_at_repo_root():
    assert not (ROOT / "conftest.py").exists()


def test_source_folders_do_not_shadow_site_packages():
    # Run through `pytest` (not `python -m pytest`) the repo root is not on sys.path: the top-level
    # folders must not be importable under their own names from here.
    for folder in SOURCE_FOLDERS:
        spec = importlib.util.find_spec(folder)
        if spec is not None and spec.origin:
            assert ROOT not in Path(spec.origin).resolve().parents, (
                f"{folder!r} imports from the repo ({spec.origin}): run the tests with `pytest`, "
                "not `python -m pytest`")
    import longfx
    import longfx.rewrite

    assert Path(longfx.rewrite.__file__).resolve().parent == ROOT / "rewrite"
    assert longfx.__version__ == tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["version"]
