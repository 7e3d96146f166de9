#!/usr/bin/env bash
# Fetch, here, the wheels the GPU image lacks (it has torch, transformers, peft, accelerate, timm,
# tifffile, scikit-image, rich, typer, jinja2...), pinned to the versions the CPU tests use, for the
# image's Python 3.12, and copies the CC0 sample slide (the device cannot download it) into
# .whl/sample-data/: about 43 MB, under the device tool's 64 MiB carry limit. Then, on the device
# (one call of about 8 minutes; docs/performance.md has the budget):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. HTD_CACHE=.whl OUT=$OUT PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py \
#        --shape sd15 --gen-batch 32 --gen-images 96 --train-batch 8 --compile
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for requirement in diffusers==0.42.1 datasets==5.2.0 webdataset==1.0.2 braceexpand==0.1.7 tiffslide==3.0.1 \
    imagecodecs==2026.3.6 platformdirs==4.14.8 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
    google-crc32c==1.9.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$requirement"
done
.venv/bin/htd-toolkit sample-data --dest .whl/sample-data >/dev/null
du -sh .whl
