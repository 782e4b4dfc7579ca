# `make run`: install (once) and run the pipeline (dvc repro); `make test`: install (once) and run every test.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export MLFLOW_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1
# Stage commands say `python`, `dvc`, `ray`: the project's environment must come first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache

.PHONY: install run test unit clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# Fashion-MNIST (the default dataset) from Debian when we can; otherwise data/raw/ (see README).
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "note: could not install dataset-fashion-mnist; put the files in data/raw/fashion-mnist/"; fi
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	dvc repro

test: $(STAMP)
	$(PY) -m pytest -q tests

unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
