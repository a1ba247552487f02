#!/usr/bin/env bash
# The GPU image has transformers 5.17; a clean `pip install` (and CI) gets 5.25, which checkpoints layers
# differently and depends on `kernels` (docs/performance.md, fourth H200 session). To benchmark what users run,
# upgrade transformers on the GPU machine first. Its set (26 MB: huggingface_hub 2.4 also needs httpx2, click 8.4+,
# hf-xet) and qlora's `.whl` (45 MB, 43 of it bitsandbytes' libraries for every CUDA and ROCm version) do not fit
# one call's 64 MiB carry; with bitsandbytes cut to the CUDA 13 libraries the GPU image's torch (cu130) loads, all
# of it is 37 MB, one call:
#   bash docs/bench/transformers-gpu.sh fetch          # here: transformers 5.25 and what it needs -> ./.t525
#   bash docs/bench/transformers-gpu.sh pack           # here: .whl (bitsandbytes cut) + .t525 -> ./.gpu
#   device call, carry .gpu:  bash docs/bench/transformers-gpu.sh run c   # installs, then a mode of issue14-gpu.sh
# Without .gpu, `run` expects an earlier call on the same warm machine to have installed .whl into /tmp/site
# (../shared/gpu/README.md) and carries .t525.
set -euo pipefail
if [ "$1" = fetch ]; then
  grep -qx '/.t525/' .git/info/exclude 2>/dev/null || echo '/.t525/' >> .git/info/exclude
  mkdir -p .t525
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .t525 transformers==5.25.0 kernels==0.19.1 tomlkit huggingface-hub==2.4.0 tokenizers==0.23.3 \
    safetensors==0.8.0 regex httpx2==2.16.2 httpcore2 truststore anyio h11 idna click==8.5.1 hf-xet==1.8.0
  du -sh .t525
elif [ "$1" = pack ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu && cp .t525/*.whl .gpu/ && cp .whl/*.whl .gpu/
  python3 - .gpu/bitsandbytes-*.whl <<'PY'
import re, sys, zipfile
from pathlib import Path
path = Path(sys.argv[1])  # rewritten in place without the libraries for CUDA 11/12 and ROCm (and their RECORD lines)
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm)\w*\.so$")
tmp = path.with_suffix(".tmp")
with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if drop.search(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if not drop.search(line.decode().split(",")[0]))
        zout.writestr(info, data)
tmp.replace(path)
PY
  du -sh .gpu
elif [ "$1" = run ]; then
  if [ -d .gpu ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl
  else
    [ -d /tmp/site/bitsandbytes ] || { echo "no .gpu and no /tmp/site: install .whl first, on this same machine"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .t525/*.whl
  fi
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  bash docs/bench/issue14-gpu.sh "$2"
fi
