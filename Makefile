# `make demo` and `make test` set themselves up: a virtual environment in .venv with the package
# installed (pinned by constraints.txt), created on first use and refreshed when setup.py changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?= -n 2 -m "not slow"

.PHONY: demo test test-all bench clean

$(STAMP): setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=$(DEMO_DIR)
	@echo "Run record: $(DEMO_DIR)/record.json; TensorBoard summaries: $(DEMO_DIR)/tensorboard"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py --size=small --seq_len=512

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
