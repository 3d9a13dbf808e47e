# cnnjax: `make train` runs the default experiment, `make test` the default test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORKDIR ?= workdirs/lenet5_digits
PYTEST_WORKERS ?= 2

.PHONY: install train test test-all lint clean help

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m experiments.train --config=experiments/configs/lenet5_digits.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

help:
	@echo "make install   create $(VENV) and install cnnjax with its test extras"
	@echo "make train     the default experiment: LeNet-5 on digits into WORKDIR=$(WORKDIR)"
	@echo "make test      the default (fast) test suite on PYTEST_WORKERS=$(PYTEST_WORKERS) workers"
	@echo "make test-all  every test, the slow ones included"
	@echo "make lint      ruff check ."
	@echo "make clean     remove $(VENV) and the caches"
