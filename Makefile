# seeds_tf: the two commands of a fresh machine are `make serve` and `make test`.
# Everything is installed into .venv by these targets; nothing is assumed on the machine but Python 3.11.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
SERVING := $(VENV)/.installed-serving
TESTING := $(VENV)/.installed-testing
SERVING_EXTRAS := cpu
TESTING_EXTRAS := cpu,test,mlflow
MLFLOW_SERVER := $(VENV)/mlflow-server
MLFLOW_SERVER_VERSION := 3.17.2
# Named by the version: a new version installs the server again.
MLFLOW_SERVING := $(MLFLOW_SERVER)/.installed-$(MLFLOW_SERVER_VERSION)
FUZZ_EXAMPLES ?= 1000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test system lint demo bench learning fuzz load audit clean

# The environment: what serving needs (`make serve`), plus the test and lint tools (`make test`);
# each is reinstalled whenever the package metadata changes.
# setuptools and wheel: the packaging test builds the wheel as pip does, without build isolation.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel uv

# uv (Astral's pip-compatible installer) installs what pip would, from PyPI, unpacking the wheels
# and byte-compiling their 20,000 files on every core: 30-37 s on 2 cores, against pip's 52 s plus
# 41 s of compiling (benchmarks/NOTES.md). uv reads UV_* settings, not pip's configuration.
INSTALL := $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e

$(SERVING): setup.cfg setup.py | $(BIN)/python
	$(INSTALL) ".[$(SERVING_EXTRAS)]"
	touch $@

$(TESTING): setup.cfg setup.py | $(BIN)/python
	$(INSTALL) ".[$(TESTING_EXTRAS)]"
	touch $@ $(SERVING)

# The real MLflow server that tests/test_tracking.py starts, in an environment of its own, as the
# platform runs it beside the module; the tests' environment has the client alone (the mlflow
# extra), as the image does. The server's package brings scikit-learn, which Keras imports wherever
# it is installed: 1.5 CPU-s in each of the suite's 37 processes that import Keras (benchmarks/NOTES.md).
$(MLFLOW_SERVING): | $(BIN)/python
	$(BIN)/uv venv --quiet --allow-existing --python $(PYTHON) $(MLFLOW_SERVER)
	$(BIN)/uv pip install --python $(MLFLOW_SERVER)/bin/python "mlflow[auth]==$(MLFLOW_SERVER_VERSION)"
	touch $@

## serve: set up, make sure a model exists (training the demo run if models/ has none), run DEEPaaS
## with the image's settings (etc/deepaas.conf: upload cap, workers), on $(HOST):$(PORT)
serve: $(SERVING)
	$(BIN)/seeds-tf demo
	$(BIN)/deepaas-run --config-file etc/deepaas.conf --listen-ip $(HOST) --listen-port $(PORT)

## demo: train the demo run even if runs exist
demo: $(SERVING)
	$(BIN)/seeds-tf demo --force

## bench: benchmarks, figures as ratios measured side by side (benchmarks/results.json), then the table
bench: $(TESTING)
	$(BIN)/seeds-tf demo
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/tta.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/identify.py
	$(BIN)/python benchmarks/tensorboard_cost.py
	cd benchmarks && ../$(BIN)/python table.py

## learning: the >= 90% top-1 check on the synthetic seeds dataset, through the CLI (~20 min)
learning: $(TESTING)
	$(BIN)/python benchmarks/learning.py

## fuzz: schemathesis against a live deepaas-run, many more examples than the suite's run
fuzz: $(TESTING)
	SEEDS_TF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py

## load: concurrent clients against deepaas-run with 1 and 2 workers: failures, p50/p99, memory
load: $(TESTING)
	$(BIN)/seeds-tf demo
	$(BIN)/python benchmarks/load.py

## audit: known vulnerabilities of the installed dependencies (pip-audit; its database changes daily),
## the service's environment and the MLflow server's that the tests run
audit: $(TESTING) $(MLFLOW_SERVING)
	$(BIN)/pip-audit --strict --skip-editable --progress-spinner off
	$(BIN)/uv pip freeze --python $(MLFLOW_SERVER)/bin/python > $(MLFLOW_SERVER)/requirements.txt
	$(BIN)/pip-audit --strict --progress-spinner off --disable-pip --no-deps -r $(MLFLOW_SERVER)/requirements.txt

## lint: ruff (style, bugs, bandit rules) and bandit itself
lint: $(TESTING)
	$(BIN)/ruff check seeds_tf tests benchmarks
	$(BIN)/ruff format --check seeds_tf tests benchmarks
	$(BIN)/bandit -q -c pyproject.toml -r seeds_tf

## system: Debian packages the tests run for real (rclone: copies to a WebDAV server on loopback;
## chromium and chromium-driver: the Swagger UI in a headless browser)
system:
	command -v rclone >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends rclone chromium chromium-driver; }

## test: set up, lint, and run the whole suite
test: system lint $(MLFLOW_SERVING)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
