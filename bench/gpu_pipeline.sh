#!/usr/bin/env bash
# The pipeline's tune stage on one GPU, 1, 4 and 8 trials sharing it (one prepared script, at most 10 minutes).
#   bash bench/gpu_pipeline.sh pack        # here, with the package index: the offline bundle + prepared data (about 55 MiB)
#   bash bench/gpu_pipeline.sh run [OUT]   # on the GPU host (no network; its image has torch, torchvision, timm)
# `pack` writes .gpu-bundle/: shared/gpu/bundle.sh's pipeline-site.tar.xz (Ray, Optuna, MLflow, pydantic, …) and
# weights-site.tar.xz (the bundled Lite0 weights), and the default problem prepared here (Fashion-MNIST, 60
# labels per class: .gpu-bundle/prepared/); run the device with `carry: [".gpu-bundle"]`.
# `run` unpacks the bundle (shared/gpu/unpack.py, seconds), checks Tune + Train + MLflow on the GPU
# (shared/gpu/check_bundle.py, about a minute) and runs bench/gpu_pipeline.py: the default search at
# ray.gpus_per_worker 1, 0.25 and 0.125. Writes OUT/gpu_pipeline.json, .png and OUT/gpu_pipeline.log.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared/gpu}"
case "${1:-}" in
  pack)
    rm -rf .gpu-bundle && mkdir -p .gpu-bundle
    bash "$shared/bundle.sh" .gpu-bundle
    cp "$shared/unpack.py" "$shared/check_bundle.py" .gpu-bundle/
    .venv/bin/python -m pipeline.prepare --params params.yaml --set data.prepared_dir=.gpu-bundle/prepared \
      --set data.root=/usr/share/datasets
    du -sh .gpu-bundle
    ;;
  run)
    out="${2:-bench/results/gpu_pipeline}"
    mkdir -p "$out"
    exec > >(tee "$out/gpu_pipeline.log") 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 .gpu-bundle/unpack.py .gpu-bundle/pipeline-site.tar.xz .gpu-bundle/weights-site.tar.xz /tmp/site
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0
    timeout 90 python3 .gpu-bundle/check_bundle.py --project . || echo "bundle check: exit $?"
    # 8 trials of 10 epochs (480 images at 64 px) per search, each under tune.time_budget_s = 100: a search that
    # runs out picks among its finished trials (not yet run on a GPU). JSON is written after each search.
    timeout 450 python3 bench/gpu_pipeline.py --prepared .gpu-bundle/prepared --budget 100 --out "$out" \
      || echo "stopped: exit $?"
    ;;
  *)
    echo "usage: bash bench/gpu_pipeline.sh pack | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
