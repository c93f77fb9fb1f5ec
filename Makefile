# Set-up and entry points. `make setup` creates .venv with torch==2.13.0 installed first
# (the CPU wheel on a machine without CUDA; set TORCH_SPEC to use your own build), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast lint clean demo demo-stop

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel
	$(PY) -m pip install "$(TORCH_SPEC)"

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# End-to-end demo on this machine (Ray cluster, preprocessing, training, evaluation, Serve, MLflow UI);
# outputs in outputs/demo/. `make demo-stop` stops the cluster and the MLflow server it started.
demo: setup
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo_stop.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
