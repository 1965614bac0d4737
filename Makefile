# Two commands on a fresh machine (Linux, Python >= 3.11):  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions the suite passed with (Python 3.11, linux x86_64), made by `make lock` from the
# ranges in requirements*.txt. Library users install the ranges instead (README, Installing).
LOCK := requirements.lock
REQUIREMENTS ?= -r $(LOCK)
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
LOCK_ARGS ?=

.PHONY: install lock test lint format demo cascade quality clean

DEMO_DIR ?= runs/demo
SR_DEMO_DIR ?= runs/sr_demo
QUALITY_DIR ?= runs/quality
QUALITY_NUM ?= 500

# Fails (and leaves no stamp) when the lock no longer satisfies requirements*.txt.
define CHECK_LOCK
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
bad = []
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            try:
                have = version(req.name)
            except PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                bad.append(f"{req} (installed: {have})")
if bad:
    sys.exit("installed set does not satisfy " + ", ".join(bad) + ": run `make lock`")
endef
export CHECK_LOCK

# Before the venv is (re)made: $(PYTHON) must be >= 3.11, and a venv left by another Python (a
# first try with an older python3) is removed, since `venv` over it keeps its old interpreter.
define CHECK_PYTHON
import os, shutil, subprocess, sys
if sys.version_info < (3, 11):
    sys.exit(f"imagen-jax needs Python >= 3.11; {sys.executable} is {sys.version.split()[0]}: "
             "run `make PYTHON=python3.11` (or a newer one)")
venv_python = os.path.join(sys.argv[1], "bin", "python")
if os.path.exists(sys.argv[1]):
    try:
        found = subprocess.run([venv_python, "-c", "import sys; print(sys.version_info[:3])"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        found = ""
    if found != str(tuple(sys.version_info[:3])):
        print(f"{sys.argv[1]} was made by another Python ({found or 'none'}): making it again")
        shutil.rmtree(sys.argv[1])
endef
export CHECK_PYTHON

$(STAMP): $(LOCK) requirements.txt requirements-test.txt pyproject.toml
	@$(PYTHON) -c "$$CHECK_PYTHON" $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(REQUIREMENTS)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "$$CHECK_LOCK" requirements.txt requirements-test.txt
	touch $(STAMP)

install: $(STAMP)

# Re-resolve requirements*.txt into $(LOCK), keeping its current pins where they still satisfy
# the ranges; `make lock LOCK_ARGS=--upgrade` moves everything to the newest versions, then run
# `make test` before committing the lock. torch / CUDA wheels must never enter the lock.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(UV) --version 2>/dev/null | grep -qF "uv $(UV_VERSION)" || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip compile requirements.txt requirements-test.txt -o $(LOCK) --quiet \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	  --custom-compile-command "make lock" $(LOCK_ARGS)
	@if grep -i -E '^(torch|nvidia-|[a-z0-9_.-]*cuda)' $(LOCK); then \
	  echo "$(LOCK) pulls torch/CUDA packages (above): find the requirement that asks for them"; exit 1; fi

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Train a small base model on the embedded OpenMoji data (CPU, minutes), then sample a grid of
# training captions. Re-running resumes / reuses the finished run.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) sample.py --checkpoints=$(DEMO_DIR) --training_prompts=16 \
	  --out=$(DEMO_DIR)/samples --overwrite
	@echo "Demo samples: $(DEMO_DIR)/samples/grid.png (training captions next to each PNG in its .json)"

# The cascade on CPU: the base demo above (reused when $(DEMO_DIR) holds it), a 32 -> 64 px
# super-resolution stage (configs/sr256.py:demo), then sampling through both stages (the same
# seed with --stop_at=1 gives the base stage's 32 px images of the same samples), and the SR gate:
# PSNR / SSIM against bicubic on held-out images, one JSON line. Re-running reuses finished runs.
cascade: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --config=configs/sr256.py:demo --workdir=$(SR_DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) sample.py --checkpoints=$(DEMO_DIR),$(SR_DEMO_DIR) \
	  --stop_at=1 --training_prompts=16 --out=$(SR_DEMO_DIR)/cascade_32px --overwrite
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) sample.py --checkpoints=$(DEMO_DIR),$(SR_DEMO_DIR) \
	  --training_prompts=16 --out=$(SR_DEMO_DIR)/cascade_64px --overwrite
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) bench/sr_quality.py --checkpoints=$(SR_DEMO_DIR) \
	  --grid=$(SR_DEMO_DIR)/sr_grid.png --overwrite
	@echo "Cascade samples: $(SR_DEMO_DIR)/cascade_32px/grid.png (base) -> $(SR_DEMO_DIR)/cascade_64px/grid.png (SR)"
	@echo "Held-out SR grid (input | bicubic | output | real): $(SR_DEMO_DIR)/sr_grid.png"

# Does it learn? Train the digits recipe (configs/digits.py, CPU), then evaluate it on
# seen and held-out prompts and print the table with its calibration rows (and one JSON line).
quality: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --config=configs/digits.py --workdir=$(QUALITY_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) evaluate.py --checkpoints=$(QUALITY_DIR) \
	  --num=$(QUALITY_NUM) --out=$(QUALITY_DIR)/eval.json --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
