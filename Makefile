# mailpipe — the two commands the README opens with are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup services demo test bench clean

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

# The servers the tests start for themselves (a throwaway PostgreSQL and Redis, mailpipe_tests/servers.py)
# need Debian's postgresql and redis-server packages: installed when missing (as root, with apt-get).
# Nothing is started here and no system service is used.
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing postgresql and redis-server (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql redis-server >/dev/null; \
	else echo "the tests need PostgreSQL (initdb, pg_ctl) and redis-server: install Debian's postgresql and redis-server" >&2; exit 1; fi

test: setup services
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup services
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mailpipe .pytest_cache
