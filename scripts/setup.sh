#!/usr/bin/env bash
# Create the virtual environment and install fed-nessa (idempotent).
#   bash scripts/setup.sh                 core + test extras
#   bash scripts/setup.sh --with-extract  also the real speaker models (optional extra), TTS voices and the
#                                         headless Chromium the view's browser tests drive (as root)
# torch 2.13.0 (CPU) is installed FIRST: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FED_NESSA_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
if [[ "${1:-}" == "--with-extract" ]]; then
  PYTHON="$VENV/bin/python" bash .ci/install-extract.sh
  bash .ci/install-browser.sh
fi
"$VENV/bin/python" -c "import fed_nessa, flwr, opacus, torch; print('fed-nessa', fed_nessa.__version__, '| flwr', flwr.__version__, '| opacus', opacus.__version__, '| torch', torch.__version__)"
