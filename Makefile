# `make run`: install (once) and run the pipeline (dvc repro); `make test`: install (once) and run every test.
# `make quick`: the whole pipeline on configs/quick.yaml in runs/quick/ (a copy; no tracked file changes).
#   make quick SET="data.dataset=imagefolder:/abs/path/photos train.image_size=32"   (overrides, space-separated)
PY      := .venv/bin/python
STAMP   := .venv/.installed
QUICK   := runs/quick
# The interpreter that creates .venv: the first of python3.11, python3.12, python3.13 on PATH (3.11 is the one
# every measurement was made with); `make install PYTHON=/path/to/python3.12` chooses another.
PYTHON  ?= $(or $(shell for p in python3.11 python3.12 python3.13; do $$p -c '' 2>/dev/null && command -v $$p && break; done),python3)
export MLFLOW_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1
# Stage commands say `python`, `dvc`, `ray`: the project's environment must come first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache

.PHONY: install run quick lint test unit clean

$(STAMP): pyproject.toml
	@echo "==> [1/4] virtual environment .venv (Python 3.11, 3.12 or 3.13)"
	@test -x $(PY) && $(PY) -V || { echo "creating it with $(PYTHON)"; $(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' || \
	  { echo "make: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null), drtune needs 3.11, 3.12 or 3.13: install one, or make install PYTHON=/path/to/python3.12"; exit 1; }; \
	  $(PYTHON) -m venv .venv; }
	@echo "==> [2/4] upgrading pip"
	$(PY) -m pip install --upgrade pip
	@echo "==> [3/4] installing drtune and its pipeline (torch, Ray, MLflow, DVC, Optuna: about 5 minutes and 6.6 GB the first time)"
	$(PY) -m pip install --progress-bar on -e '.[pipeline,dev]'
	@# Fashion-MNIST (the default dataset) from Debian when we can; otherwise data/raw/ (see README).
	@echo "==> [4/4] Fashion-MNIST, the default dataset"
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "found in /usr/share/datasets/fashion-mnist/"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) || \
	  echo "note: could not install dataset-fashion-mnist; the prepare stage downloads it, or put the files in data/raw/fashion-mnist/"; \
	else \
	  echo "note: not installed (needs root and apt-get); the prepare stage downloads it when online, or put the four .gz files in data/raw/fashion-mnist/"; \
	fi
	touch $(STAMP)
	@echo "==> installed; activate with: source .venv/bin/activate"

install: $(STAMP)

run: $(STAMP)
	dvc repro

# The quick pipeline in a scratch copy: the committed and untracked project files (not the results in
# metrics/, plots/, dvc.lock), configs/quick.yaml as params.yaml, a git repository of its own (DVC needs
# one) and an MLflow store inside it. Nothing outside runs/quick/ is written.
define QUICK_SET_PY
import sys, yaml
from drtune.config import ConfigError
from pipeline.config import load
try:
    config = load(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    sys.exit(f"make quick SET=...: {err}")
open(sys.argv[1], "w").write(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
endef
export QUICK_SET_PY

quick: $(STAMP)
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "make quick: needs a git checkout (git clone ...)"; exit 1; }
	@echo "==> copying the project to $(QUICK)/ with configs/quick.yaml as its params.yaml"
	rm -rf $(QUICK) && mkdir -p $(QUICK)
	git ls-files -co --exclude-standard | grep -vE '^(metrics/|plots/|dvc\.lock$$|params\.yaml$$)' | \
	  while IFS= read -r f; do [ -f "$$f" ] && printf '%s\n' "$$f"; done | tar -cf - -T - | tar -xf - -C $(QUICK)
	cp configs/quick.yaml $(QUICK)/params.yaml
	$(if $(SET),$(PY) -c "$$QUICK_SET_PY" $(QUICK)/params.yaml $(SET))
	cd $(QUICK) && git init -q && git add -A && git -c user.name=drtune -c user.email=drtune@localhost commit -qm "make quick"
	@echo "==> dvc repro in $(QUICK)/ (prepare, baseline, tune, register)"
	cd $(QUICK) && MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/$(QUICK)/mlflow.db \
	  DVC_SITE_CACHE_DIR=$(CURDIR)/$(QUICK)/.dvc/tmp/site-cache dvc repro
	@echo "==> done: $(QUICK)/metrics/test.json, $(QUICK)/models/; browse: mlflow ui --backend-store-uri sqlite:///$(QUICK)/mlflow.db"

# Lint and format check first (seconds), then every test.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest-xdist workers, a test file at a time each (the tests of a file may share a module's fixture, built
# once): the end-to-end tests spend much of their time waiting on Ray, MLflow and DVC processes, so two at once
# keep both cores busy.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
