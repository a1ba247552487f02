#!/usr/bin/env bash
# Installs qlora into ./.venv without pulling a CUDA build of torch on a machine without a GPU.
#   bash scripts/install.sh          # the tool
#   bash scripts/install.sh dev      # the tool + test and lint tools
# torch: kept if the venv already has it; otherwise a CUDA build where `nvidia-smi` works, else the
# CPU build $TORCH_SPEC (default torch==2.13.0). Extra pip arguments for that step go in $TORCH_PIP_ARGS,
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" on hosts where PyPI's torch is CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q "torch>=2.6,<2.15"
  else
    # shellcheck disable=SC2086
    $py -m pip install -q ${TORCH_PIP_ARGS:-} "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
if [ "$extra" = "dev" ]; then
  $py -m pip install -q -e ".[dev]"
else
  $py -m pip install -q -e .
fi
$py -c "import torch, transformers, trl, peft, bitsandbytes; print(f'torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
