#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
.venv/bin/python -m pytest -q tests "$@"
