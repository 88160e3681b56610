#!/usr/bin/env bash
# Create .venv with the exact pins of pyproject.toml. torch is installed first, alone and pinned, so pip takes
# the local CPU build of 2.13.0 and never pulls a CUDA build as a dependency of something else. Then make sure a
# headless Chromium is there for the report's browser test (installed with apt-get when missing; idempotent).
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

# Headless Chromium for tests/test_report_browser.py (the HTML report as a person sees it): the Debian package,
# installed once (as root, with apt-get), without its desktop recommends; fonts so that text is drawn at all.
have_chromium() {
    [ -n "${REALIGN_CHROMIUM:-}" ] && [ -x "$REALIGN_CHROMIUM" ] && return 0
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || command -v google-chrome >/dev/null 2>&1 || command -v google-chrome-stable >/dev/null 2>&1
}
if ! have_chromium; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium (apt-get) for the report's browser test"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null
    else
        echo "tools/setup.sh: headless Chromium is missing and cannot be installed from here (that needs root and" \
             "apt-get). Install it (Debian/Ubuntu: apt-get install chromium), or set REALIGN_CHROMIUM to a Chromium" \
             "or Chrome binary; tests/test_report_browser.py fails without one." >&2
        exit 1
    fi
fi
have_chromium || { echo "tools/setup.sh: chromium was installed but is not on PATH" >&2; exit 1; }
