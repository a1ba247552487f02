#!/usr/bin/env bash
# The one-minute demo on the built-in 2M-parameter random-weight model (no model download at all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/qlora train recipes/tiny-demo.yaml --overwrite "$@"
