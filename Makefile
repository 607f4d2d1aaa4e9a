# unirank: the two commands a user needs on a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test test-unit lint format bench clean

venv: $(VENV)/.installed

# torch first, from the local CPU wheel: a loose torch requirement in a fresh venv pulls a
# multi-GB CUDA build. pip is upgraded first: the venv's pip 23.2 backtracks for 15+ minutes.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,kubeflow]'
	touch $@

## Run the main job end to end on the embedded defaults (local Ray, local storage, local MLflow).
demo: venv
	$(PY) -m ray_jobs.demo

## Run the whole test suite (what CI runs).
test: venv
	$(VENV)/bin/pytest -q --timeout=900 --durations=30

test-unit: venv
	$(VENV)/bin/pytest -q -m unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Every benchmark (BENCH_ARGS=--quick: seconds each; `make bench BENCH_ARGS=` for the full
## sizes): each one's JSON line goes to out/bench/<name>.json, its output to out/bench/<name>.log;
## a failure is reported and the rest still run; the target fails at the end if any did.
BENCH_ARGS ?= --quick
bench: venv
	@mkdir -p out/bench; failed=""; \
	for b in benchmarks/[!_]*.py; do \
	  n=$$(basename $$b .py); rm -f out/bench/$$n.json; echo "== $$n $(BENCH_ARGS)"; \
	  BENCH_JSON=out/bench/$$n.json $(PY) $$b $(BENCH_ARGS) > out/bench/$$n.log 2>&1; rc=$$?; \
	  if [ $$rc -eq 0 ] && [ -s out/bench/$$n.json ]; then cat out/bench/$$n.json; \
	  else failed="$$failed $$n"; tail -n 20 out/bench/$$n.log; \
	    echo "FAILED: $$n (exit $$rc; log: out/bench/$$n.log)"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks failed:$$failed"; exit 1; fi

clean:
	rm -rf out .pytest_cache .ruff_cache
