# The two commands a newcomer needs:
#   make demo   set everything up, then build a synthetic dataset, preprocess it, train, register and predict
#   make test   set everything up, then run the test suite
SHELL := /bin/bash
VENV := .venv

.PHONY: setup demo test bench clean

setup:
	@bash infra/setup.sh

demo: setup
	$(VENV)/bin/msata demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/bench_preprocess.py
	$(VENV)/bin/python bench/bench_encoder.py

clean:
	rm -rf .msata .pytest_cache
