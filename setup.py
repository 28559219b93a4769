"""Maps the top-level source folders into the single import namespace ``longfx``.

rewrite/ -> longfx.rewrite, passes/ -> longfx.passes, kernels/ -> longfx.kernels,
runtime/ -> longfx.runtime; the front door is longfx/ itself. Nothing else is installed at
the top level of site-packages (PyPI has unrelated packages named ``kernels`` and ``runtime``).
"""
from pathlib import Path

from setuptools import setup

FOLDERS = {"rewrite": "longfx.rewrite", "passes": "longfx.passes",
           "kernels": "longfx.kernels", "runtime": "longfx.runtime"}


def packages():
    found = {"longfx": "longfx"}
    for pkg in sorted(p.parent for p in Path("longfx").rglob("__init__.py")):
        found[".".join(pkg.parts)] = str(pkg)
    for folder, name in FOLDERS.items():
        for pkg in sorted(p.parent for p in Path(folder).rglob("__init__.py")):
            found[".".join((name, *pkg.parts[1:]))] = str(pkg)
    return found


PACKAGE_DIR = packages()
setup(packages=sorted(PACKAGE_DIR), package_dir=PACKAGE_DIR)
