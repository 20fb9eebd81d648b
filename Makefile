# `make demo` and `make test` set themselves up: a virtual environment in .venv with the package
# installed (pinned by constraints.txt), created on first use and refreshed when setup.py changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?= -n 2 --dist loadfile -m "not slow"

.PHONY: demo study-tiny test test-all bench clean

$(STAMP): setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# The project's main job in miniature: pretrain two tiny models, finetune them by FMT, LoRA and
# prompt tuning over a small grid, fit the scaling laws and write the report (its time on two
# cores: benchmarks/RESULTS_study.md).
demo: $(STAMP)
	$(BIN)/python -m scaling.study --config=configs/studies/demo.py --workdir=$(DEMO_DIR) \
		--executor=pool --workers=2

# The full miniature of the paper (three sizes, two data subsets, 115 runs).
study-tiny: $(STAMP)
	$(BIN)/python -m scaling.study --config=configs/studies/tiny.py --workdir=runs/study_tiny \
		--executor=pool --workers=2

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py --size=small --seq_len=512

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
