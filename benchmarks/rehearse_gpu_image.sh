#!/usr/bin/env bash
# Rehearse the GPU run here, on the CPU, before spending device time: a virtual environment with the
# GPU image's versions of the libraries it shares with us (huggingface_hub 1.33.0, transformers
# 5.17.0, accelerate 1.15.0, ...; the image's torch 2.11 is not installable here, so torch 2.14.1),
# plus exactly the carried set (benchmarks/gpu_wheels.txt) installed with --no-deps as on the device,
# then benchmarks/gpu_suite.py at toy shapes. A package the image lacks and the list forgets shows
# up as a failed check here. About 2 minutes the first time, then the environment is reused.
#   bash benchmarks/rehearse_gpu_image.sh [gpu_suite.py options]     (default: --shape toy)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${HTD_REHEARSAL_ENV:-/tmp/htd-gpu-image}
if [ ! -x "$ENV/bin/python" ]; then
  python3.11 -m venv "$ENV"
  "$ENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 huggingface_hub==1.33.0 transformers==5.17.0 \
    accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2 peft timm scikit-image scikit-learn scipy pandas \
    pyarrow rich typer jinja2 pyyaml tqdm tensorboard tifffile requests opencv-python-headless
  grep -v '^#' benchmarks/gpu_wheels.txt | xargs "$ENV/bin/pip" install --quiet --no-deps
fi
.venv/bin/htd-toolkit sample-data >/dev/null  # the CC0 slide, from the cache the tests use
[ $# -gt 0 ] || set -- --shape toy
OUT=$(mktemp -d)
PYTHONPATH=. OUT=$OUT HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 "$ENV/bin/python" benchmarks/gpu_suite.py "$@"
echo "results: $OUT/gpu_suite.json"
