#!/usr/bin/env bash
# Installs qlora with its dev tools into ./.venv, then lints and runs the whole test suite (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/ruff check qlora_cli tests scripts
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
