#!/usr/bin/env bash
# Build the separate virtual environment that benchmarks/compare_kvpress.py runs NVIDIA's kvpress in.
#
# kvpress 0.5.5 pins transformers<5.3,>=4.56 (and pulls datasets, pandas, peft, ...), so it cannot
# share longfx's main venv (transformers 5.23). Usage:
#
#     bash benchmarks/kvpress_env.sh [VENV_DIR]      # default /tmp/kvpress-venv
#
# torch is pinned and installed FIRST (this machine's pip finds the local CPU build,
# torch-2.13.0+cpu, through the find-links of its pip.conf; an unpinned torch would pull
# gigabytes of CUDA packages); kvpress then picks its own transformers (<5.3). gguf and
# accelerate are needed to load SmolLM2's GGUF file with transformers. Idempotent.
set -euo pipefail
VENV="${1:-/tmp/kvpress-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
KVPRESS_VERSION="${KVPRESS_VERSION:-0.5.5}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# 1) torch first, CPU build, pinned
"$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION}"
# 2) kvpress (its transformers<5.3), with torch held at the version above
"$VENV/bin/python" -m pip install --quiet "kvpress==${KVPRESS_VERSION}" gguf accelerate "torch==${TORCH_VERSION}"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers
print("kvpress", md.version("kvpress"), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| cuda", torch.version.cuda)
PY
