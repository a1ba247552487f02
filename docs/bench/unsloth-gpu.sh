#!/usr/bin/env bash
# unsloth side by side with the usual recipe and `qlora train` (issue #14, item 6), in two device calls on one warm
# machine: unsloth's wheels and qlora's (bitsandbytes alone is 43 MB) do not fit one call's 64 MiB carry.
#   bash docs/bench/unsloth-gpu.sh fetch     # here: unsloth and what it needs that the GPU image lacks -> ./.uwhl
#   device call 1, carry .whl:   python3 -m pip install ... --target /tmp/site .whl/*.whl   (../shared/gpu/README.md)
#   device call 2, carry .uwhl, right after (the machine is kept 30 s):  bash docs/bench/unsloth-gpu.sh run
#   (VARIANTS=unsloth runs it alone, next to a baseline/qlora run made earlier on the same machine)
# unsloth pins trl <= 1.15, datasets < 5 and transformers <= 5.17: they go into /tmp/usite, which only the unsloth
# variant's process puts first on its path (UNSLOTH_PATH in scripts/bench_train.py).
set -euo pipefail
if [ "$1" = fetch ]; then
  grep -qx '/.uwhl/' .git/info/exclude 2>/dev/null || echo '/.uwhl/' >> .git/info/exclude
  mkdir -p .uwhl
  for p in unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 xformers==0.0.35 torchao==0.18.0 \
           torchvision==0.26.0 diffusers==0.42.1 cut_cross_entropy tyro msgspec einops json5 nest-asyncio structlog \
           sentencepiece docstring-parser shtab typeguard; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .uwhl "$p"
  done
  mkdir -p .uwhl/extra  # datasets 4.x imports httpx; installed on the GPU only if its image lacks it
  python3 -m pip download -q --no-deps --only-binary=:all: -d .uwhl/extra httpx httpcore h11 anyio sniffio
  du -sh .uwhl
elif [ "$1" = run ]; then
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  [ -d /tmp/site/bitsandbytes ] || { echo "no /tmp/site: run the .whl install call first, on this same machine"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite .uwhl/*.whl
  python3 -c "import httpx" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/usite .uwhl/extra/*.whl
  export PYTHONPATH=/tmp/site:$PWD UNSLOTH_PATH=/tmp/usite
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir /tmp/qlora-bench --variants "${VARIANTS:-baseline,qlora,unsloth}" --out "$OUT/mistral7b-unsloth-h200.json" \
    2>&1 | tee "$OUT/unsloth.log"
fi
