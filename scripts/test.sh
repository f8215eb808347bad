#!/usr/bin/env bash
# The test command: install what is missing, lint, type-check, then unit and end-to-end tests (real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy edge vmm fleet mvm microvm_edge bench
# `bash scripts/test.sh -n 2` runs the tests on two workers (pytest-xdist; tests/workers.py says which files
# share one, tests/e2e/conftest.py runs `exclusive` ones alone). Not the default yet: on a machine busy with
# other runs, tests with tight timers failed under it (README, "Two commands").
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
