# mailpipe — the two commands the README opens with are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-installs when pyproject.toml changes; every install step lives here so CI (a clean clone) runs it.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "mailpipe needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Discover the demo tenant, back it up, change it, back it up again incrementally, print a summary.
demo: setup
	$(BIN)/mailpipe demo

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mailpipe .pytest_cache
