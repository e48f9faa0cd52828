# Two commands on a fresh machine: `make run` (the main job) and `make test`. Both install what they need.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: install run sweep test lint ui bench bench-smoke bench-gpu clean

# Re-installs only when pyproject.toml changes; the package itself is editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The report's six trials as one sweep (first time: synthetic data and a one-time pretraining, both cached per
# user in ~/.cache/masksweep, or $$XDG_CACHE_HOME/masksweep; MASKSWEEP_CACHE_DIR=DIR moves it), then its tables.
# WORKERS sweep workers share the study, each with its share of the cores: on a 2-core CPU two one-thread
# workers train 1.4x faster than one two-thread worker. The one-time pretraining uses every core.
WORKERS ?= 2
THREADS = $(shell n=$$(( $$(nproc) / $(WORKERS) )); echo $$(( n > 0 ? n : 1 )))
run: install
	@pids=""; for i in $$(seq $(WORKERS)); do \
	  OMP_NUM_THREADS=$(THREADS) $(BIN)/masksweep-train -m sweep=seed_table & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=$$?; done; exit $$status
	$(BIN)/masksweep compare

# An Optuna TPE search with pruning, at a small budget.
sweep: install
	$(BIN)/masksweep-train -m sweep=tpe
	$(BIN)/masksweep compare

test: install
	$(BIN)/pytest

# The MLflow UI on ./mlruns, on 127.0.0.1 (PORT=5001 make ui for another port).
ui: install
	$(BIN)/masksweep ui --port $(or $(PORT),5000)

# The benchmark (issue 5): every figure, results in bench/results/latest.{md,json} (~20 min on a 2-core CPU).
# bench-smoke runs the same harness on tiny sizes (~4 min, figure 9 on its own SLURM cluster when SLURM is installed)
# into bench/results/smoke/, as the CI test does.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--threads 1" on a machine shared with other CPU-bound jobs.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: install
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)

# On a fresh GPU machine (no network there): figure 6 and a 2-trial CUDA sweep with a diverging trial, in under
# 8 min, results in bench/results/gpu/. First, where pip is online: `bench/gpu_check.sh --fetch-wheels` (the
# packages that machine lacks, into .cache/masksweep/gpu-wheels, which must travel with the tree).
# GPU_ARGS=--dry-run runs the same script on the CPU at tiny sizes (the CI test).
bench-gpu:
	bench/gpu_check.sh $(GPU_ARGS)

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf outputs multirun .pytest_cache
