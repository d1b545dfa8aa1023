# The two commands a newcomer needs:
#   make demo   set everything up, then build a synthetic dataset, preprocess it, train, register and predict
#   make test   set everything up, check lint and formatting (ruff), then run the test suite
SHELL := /bin/bash
VENV := .venv

.PHONY: setup demo test lint bench clean

setup:
	@bash infra/setup.sh

demo: setup
	$(VENV)/bin/msata demo

test: setup lint
	$(VENV)/bin/python -m pytest -q

# [tool.ruff] in pyproject.toml; `$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .` repairs most findings.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python bench/bench_preprocess.py
	$(VENV)/bin/python bench/bench_encoder.py

clean:
	rm -rf .msata .pytest_cache
