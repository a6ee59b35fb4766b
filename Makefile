# Set-up and the two commands README.md documents. Everything runs in an isolated
# virtual environment (.venv) that installs the package from setup.py.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUICKSTART_DIR ?= runs/quickstart

.PHONY: quickstart test test-slow benchmark venv

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,report]'
	touch $@

venv: $(BIN)/.installed

# DGMw, 10 one-class tasks on the embedded Fashion-MNIST sample. A run never
# overwrites an earlier one, and an earlier quickstart may be one a user wants to
# --resume: it is moved aside (never deleted) and the new run starts in an empty folder.
quickstart: $(BIN)/.installed
	@if [ -d $(QUICKSTART_DIR) ] && [ -n "$$(ls -A $(QUICKSTART_DIR))" ]; then \
	  aside=$(QUICKSTART_DIR).$$(date +%Y%m%d-%H%M%S); \
	  mv $(QUICKSTART_DIR) $$aside && \
	  echo "make quickstart: moved the earlier run to $$aside (continue it with: $(BIN)/python -m dgm_tf.main --flagfile=$$aside/flags.txt --workdir=$$aside --resume)"; \
	fi
	$(BIN)/python -m dgm_tf.main --flagfile=configs/quickstart.cfg --workdir=$(QUICKSTART_DIR)

# One pytest process per core, the modules split between them (tools/run_tests.py).
test: $(BIN)/.installed
	$(BIN)/python tools/run_tests.py

test-slow: $(BIN)/.installed
	$(BIN)/python tools/run_tests.py -m slow

# Speed of one DGM iteration, its phases and its floor (tools/benchmark.py).
benchmark: $(BIN)/.installed
	mkdir -p runs
	$(BIN)/python tools/benchmark.py --flagfile=configs/mnist_dgmw.cfg --output=runs/benchmark.json
