#!/usr/bin/env bash
# Installs qlora into ./.venv and trains the bundled tiny demo (offline, CPU, about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/qlora train recipes/tiny-demo.yaml --overwrite
