#!/usr/bin/env bash
# GPU benchmark: one prepared script for an H100/H200 with no network (at most 5 minutes).
#   bash bench/gpu.sh [OUT_DIR]
# Needs only torch, torchvision and timm (the GPU image has them) and this repository: ResNet-50
# with random weights at 224 px, batch 64 and 128, K = 2048, bf16 autocast, channels_last.
# Prints images/s of CE-tuning and DR-Tune (rotation every 10th step, every step, and with cached
# pretrained features), DR-Tune's step breakdown (the calibration time per step with rotation
# every step is its "calibration" column), the ratio to CE-tuning, and model FLOP utilisation;
# writes OUT_DIR/gpu_step.json.
# Goal: DR-Tune at >= 70% of CE-tuning's images/s.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 280 python3 bench/step.py --device cuda --models resnet50 --image-size 224 --batch-size 64 128 \
  --queue-size 2048 --steps 30 --out "$out/gpu_step.json"
