#!/usr/bin/env bash
# The GPU image has transformers 5.17; a clean `pip install` (and CI) gets 5.25, which checkpoints layers
# differently and depends on `kernels` (docs/performance.md, fourth H200 session). To benchmark what users run,
# upgrade transformers on the GPU machine first. Its set (26 MB: huggingface_hub 2.4 also needs httpx2, click 8.4+, hf-xet) and qlora's `.whl` (47 MB) do not fit one call's
# 64 MiB carry, so, as with unsloth, two calls on one warm machine:
#   bash docs/bench/transformers-gpu.sh fetch          # here: transformers 5.25 and what it needs -> ./.t525
#   device call 1, carry .whl:   python3 -m pip install ... --target /tmp/site .whl/*.whl   (../shared/gpu/README.md)
#   device call 2, carry .t525, right after (the machine is kept 30 s):
#       bash docs/bench/transformers-gpu.sh run c       # then any mode of docs/bench/issue14-gpu.sh
set -euo pipefail
if [ "$1" = fetch ]; then
  grep -qx '/.t525/' .git/info/exclude 2>/dev/null || echo '/.t525/' >> .git/info/exclude
  mkdir -p .t525
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .t525 transformers==5.25.0 kernels==0.19.1 tomlkit huggingface-hub==2.4.0 tokenizers==0.23.3 \
    safetensors==0.8.0 regex httpx2==2.16.2 httpcore2 truststore anyio h11 idna click==8.5.1 hf-xet==1.8.0
  du -sh .t525
elif [ "$1" = run ]; then
  [ -d /tmp/site/bitsandbytes ] || { echo "no /tmp/site: run the .whl install call first, on this same machine"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .t525/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  bash docs/bench/issue14-gpu.sh "$2"
fi
