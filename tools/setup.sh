#!/usr/bin/env bash
# Create .venv with the exact pins of pyproject.toml. torch is installed first, alone and pinned, so pip takes
# the local CPU build of 2.13.0 and never pulls a CUDA build as a dependency of something else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
.venv/bin/python -c "import torch, transformers, snakemake, lm_eval; print('realign env ready: torch', torch.__version__)"
