#!/usr/bin/env bash
# Screenshots of the MLflow UI as a person sees it after `make run`: the registered model, its
# champion version, the experiment as it opens and its training runs (headless Chromium; no network).
#   bash bench/registry_screenshots.sh [PROJECT_DIR] [OUT_DIR]
# PROJECT_DIR holds mlflow.db (default: here); PNGs go to OUT_DIR (default: plots/ui).
set -euo pipefail
project="$(cd "${1:-.}" && pwd)"
out="${2:-plots/ui}"
mkdir -p "$out"
mlflow_bin="$(dirname "$0")/../.venv/bin/mlflow"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$mlflow_bin" server --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$project/mlflow.db" --default-artifact-root "$project/mlruns" >/tmp/mlflow-ui.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
model=$(sqlite3 "$project/mlflow.db" "select name from registered_models limit 1" 2>/dev/null || echo drtune-fashion-mnist)
version=$(sqlite3 "$project/mlflow.db" "select version from registered_model_aliases where alias='champion' limit 1" 2>/dev/null || echo 1)
experiment=$(sqlite3 "$project/mlflow.db" "select experiment_id from experiments where name like 'drtune-%' limit 1" 2>/dev/null || echo 1)
shoot() {
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1100 \
    --virtual-time-budget=20000 --screenshot="$out/$1.png" "http://127.0.0.1:$port/#/$2" 2>/dev/null
}
shoot registered_model "models/$model"
shoot model_version "models/$model/versions/$version"
shoot experiment_opened "experiments/$experiment"
shoot experiment_runs "experiments/$experiment/runs?workflowType=machine_learning"
ls -la "$out"
