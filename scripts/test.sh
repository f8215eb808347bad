#!/usr/bin/env bash
# The test command: install what is missing, lint, type-check, then unit and end-to-end tests (real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy edge vmm fleet mvm microvm_edge bench
# Two pytest workers (pytest-xdist): tests/workers.py keeps files that share a store or a module fixture on
# one, and tests/e2e/conftest.py runs `exclusive` ones alone.
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
