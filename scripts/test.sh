#!/usr/bin/env bash
# The test command: install what is missing, lint, then unit and end-to-end tests (real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
