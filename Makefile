# Verbs people use. Every target installs what it needs first (`make install` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines here install these two from local disk; on a CUDA box pick the build you want, e.g.
#   make install TORCH="torch==2.6.0 torchvision==0.21.0"
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Exact version of every other dependency, as CI tested them (torch, torchvision and their triton/nvidia/cuda
# wheels are left to TORCH). `make lock` writes it from .venv; `make install LOCK=` installs without it.
LOCK ?= requirements.lock
CONSTRAINTS = $(if $(wildcard $(LOCK)),-c $(LOCK))
LOCK_EXCLUDE := ^(torch|torchvision|triton|nvidia-[^=]*|cuda-[^=]*)==
ARGS ?=

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml $(wildcard $(LOCK))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) $(TORCH)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install -q $(CONSTRAINTS) --no-deps "latex2sympy2==1.9.1"  # setup.cfg: its antlr pin clashes with hydra's
	touch $@

install: $(VENV)/.installed ## Create .venv with torch, the package and the dev tools (versions from requirements.lock)

lock: install ## Pin .venv's packages in requirements.lock (upgrade all: rm -rf .venv requirements.lock; make lock)
	{ echo "# pip constraints for \`make install\`, written by \`make lock\` (pip freeze of the tested venv)."; \
	  echo "# torch, torchvision and their triton/nvidia/cuda wheels are not pinned here: the Makefile's TORCH picks them."; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '$(LOCK_EXCLUDE)'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	touch $(VENV)/.installed  # .venv is what the new lock says

run: install ## Prune + evaluate the embedded tiny Qwen2.5-VL (pass overrides with ARGS="pruner=... sparsity=...")
	$(PY) run.py $(ARGS)

test: install ## Fast test suite (what CI runs)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-full: install ## All tests, slow ones included
	$(PY) -m pytest $(ARGS)

lint: install ## ruff on the package, tests and benchmarks
	$(VENV)/bin/ruff check --line-length 120 mmprune_exp tests bench run.py

# `make sweep`: one experiment's sweep on this machine, then its report. The sweep dir is fixed here, once, in
# Hydra's layout (outputs/multirun/<date>/<time>), so the report reads the folder the jobs wrote and the W&B group
# is <task_name>-<date>_<time>.
EXPERIMENT ?= pruner_curve
ifndef SWEEP_DIR
SWEEP_DIR := outputs/multirun/$(shell date +%Y-%m-%d/%H-%M-%S)
endif
SYNC_DIR ?= outputs
SYNC_ARGS ?=

sweep: install ## A sweep and its report: EXPERIMENT=pruner_curve (25 jobs, ~60 min on 2 idle CPU cores), ARGS=overrides
	$(PY) run.py experiment=$(EXPERIMENT) hydra.mode=MULTIRUN hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)
	$(PY) -m mmprune_exp.report $(SWEEP_DIR)

wandb-sync: install ## Upload the offline W&B runs below SYNC_DIR (outputs): jobs and reports; already synced ones are skipped
	@runs=$$(find $(SYNC_DIR) -type d -name 'offline-run-*' -path '*/wandb/*' | sort); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs below $(SYNC_DIR)"; exit 0; fi; \
	echo "$$runs" | xargs $(VENV)/bin/wandb sync $(SYNC_ARGS)

tiny-model: install ## Retrain the embedded tiny model from scratch (deterministic, ~60 min on 2 idle CPU cores)
	$(PY) -m mmprune_exp.tiny.train --out mmprune_exp/assets/qwen2_5_vl_tiny --seed 0 $(ARGS)

glimpse-model: install ## Train the tiny model's GlimpsePrune module (token_pruner=glimpse) into mmprune_exp/assets/qwen2_5_vl_tiny/glimpse (deterministic)
	$(PY) -m mmprune_exp.train_glimpse model.device=cpu threads=1 seed=0 $(ARGS)

# Where `make slurm-up` keeps the local cluster's config, state and logs (launchers/slurm_local.sh).
SLURM_DIR ?= /tmp/mmprune-slurm

slurm-up: ## Start a one-node SLURM cluster here (root; installs its Debian packages if missing); prints the SLURM_CONF to export
	@bash launchers/slurm_local.sh install
	@bash launchers/slurm_local.sh up $(SLURM_DIR)

slurm-down: ## Stop the cluster `make slurm-up` started (its jobs are cancelled; logs stay in SLURM_DIR)
	@bash launchers/slurm_local.sh down $(SLURM_DIR)

clean: ## Remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs/runs outputs/multirun outputs/cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

.PHONY: help install lock run test test-full lint tiny-model glimpse-model slurm-up slurm-down clean sweep wandb-sync
