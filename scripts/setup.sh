#!/usr/bin/env bash
# The one set-up command: install everything, then serve on the default config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mvm serve --config "${MVM_CONFIG:-configs/dev.toml}"
