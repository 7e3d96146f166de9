#!/usr/bin/env bash
# Fetch, here, the wheels the GPU image lacks (benchmarks/gpu_wheels.txt; it has torch, transformers,
# peft, accelerate, timm, tifffile, scikit-image, rich, typer, jinja2...) for the image's Python 3.12,
# and copy the CC0 sample slide (the device cannot download it) into .whl/sample-data/: about 43 MB,
# under the device tool's 64 MiB carry limit. benchmarks/rehearse_gpu_image.sh tries the same set on
# this CPU first. Then, on the device
# (one call of about 8 minutes; docs/performance.md has the budget):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. HTD_CACHE=.whl OUT=$OUT PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py \
#        --shape sd15 --gen-batch 32 --gen-images 96 --train-batch 8 --compile --gen-batch-sweep 64
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
grep -v '^#' benchmarks/gpu_wheels.txt | while read -r requirement; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$requirement"
done
.venv/bin/htd-toolkit sample-data --dest .whl/sample-data >/dev/null
du -sh .whl
