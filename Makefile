# Two commands on a fresh machine (Linux, Python >= 3.11):  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo clean

DEMO_DIR ?= runs/demo

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Train a small base model on the embedded OpenMoji data (CPU, minutes), then sample a grid of
# training captions. Re-running resumes / reuses the finished run.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) sample.py --checkpoints=$(DEMO_DIR) --training_prompts=16 \
	  --out=$(DEMO_DIR)/samples --overwrite
	@echo "Demo samples: $(DEMO_DIR)/samples/grid.png (training captions next to each PNG in its .json)"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
