#!/usr/bin/env bash
# Create .venv and install what the project needs (idempotent: a second run installs nothing).
# TORCH_SPEC picks the torch build, e.g. TORCH_SPEC="torch==2.13.0" (default) or "torch>=2.6".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: Python 3.11 or newer is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2; exit 2; }
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OPTIONAL=matplotlib  # the heatmap PNGs of eval_extrapolate.py; everything works without it
stamp=".venv/.installed-$(cat requirements.txt | cksum | cut -d' ' -f1)-${TORCH_SPEC//[^a-zA-Z0-9.=]/_}-$OPTIONAL"
if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    .venv/bin/python -m pip install --quiet -r requirements.txt
    .venv/bin/python -m pip install --quiet "$OPTIONAL" \
        || echo "note: optional $OPTIONAL not installed; eval_extrapolate.py will skip its heatmap PNG" >&2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
