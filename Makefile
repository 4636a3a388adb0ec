# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: setup test demo bench clean

$(BIN)/moecompress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .[dev]
	touch $@

setup: $(BIN)/moecompress

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: setup
	$(BIN)/moecompress demo

clean:
	rm -rf $(VENV) build *.egg-info
