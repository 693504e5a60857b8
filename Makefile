# Two commands matter: `make run` (the main job) and `make test` (the test suite).
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export RAY_USAGE_STATS_ENABLED ?= 0
ARGS ?=
PORT ?= 5001
# `make run` logs to the experiment `fer2013` unless one is named (ARGS or MLflow's variables).
EXPERIMENT_ARGS := $(if $(findstring --experiment-,$(ARGS))$(MLFLOW_EXPERIMENT_NAME)$(MLFLOW_EXPERIMENT_ID),,--experiment-name fer2013)

.PHONY: run test test-slow test-integration test-e2e test-reliability test-infra lint bench device-wheels ui serve clean

# uv (pinned in requirements-dev.txt) installs the same pins as pip about 4x faster; where it
# cannot (an index only pip is configured for), pip does.
UV_PIN = $(shell grep -m1 '^uv==' requirements-dev.txt)
INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python
PIP_INSTALL = $(BIN)/python -m pip install --quiet

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(UV_PIN)"
	$(INSTALL) --upgrade pip -r requirements-dev.txt || $(PIP_INSTALL) --upgrade pip -r requirements-dev.txt
	touch $@

run: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local $(EXPERIMENT_ARGS) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

test-integration: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m integration

test-e2e: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m e2e

test-reliability: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m reliability

test-infra: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m infra

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(BIN)/.bench-installed: $(BIN)/.installed requirements-bench.txt
	$(INSTALL) -r requirements-bench.txt || $(PIP_INSTALL) -r requirements-bench.txt
	touch $@

bench: $(BIN)/.bench-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.run_all $(ARGS)

# The wheels the lent GPU machine lacks for bench/device/gpu_check.sh (it has Python 3.12);
# any pip downloads them, so this needs (and touches) no venv.
device-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d bench/device/wheels -r bench/device/wheels.txt

ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

# The champion over HTTP on loopback (the venv's bin on PATH: the server needs its uvicorn).
serve: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow models serve -m "models:/fer2013-expression@champion" --env-manager local --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV) tune_results mlruns mlflow.db
