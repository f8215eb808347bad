#!/usr/bin/env bash
# The test command: install what is missing, lint, type-check, then unit and end-to-end tests (real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy edge vmm fleet mvm microvm_edge bench
# Two workers (pytest-xdist): most e2e tests wait on guests and timers, not on both cores. Files sharing a
# store run on one worker (tests/workers.py), and `exclusive` ones alone (tests/e2e/conftest.py).
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
