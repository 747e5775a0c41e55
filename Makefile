# make demo: install and run the default sweep (quickstart) end to end.
# make test: install and run the test suite (what CI runs through .ci/run).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs

.PHONY: install demo test lint bench clean postgres

install: $(STAMP)

# uv resolves against the project's pins (constraints.txt) and byte-compiles at install, because
# this machine sets PYTHONDONTWRITEBYTECODE=1 and every start would otherwise pay for compiling.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/ntk-sweep run quickstart --out $(OUT)/quickstart

# The multi-node test starts its own PostgreSQL server on loopback; install the Debian package
# when no server program is found (as root, or through sudo).
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; \
	then :; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; \
	fi

test: install postgres
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check core sweep tests benchmarks

bench: install
	$(BIN)/python benchmarks/attack.py --quick
	$(BIN)/python benchmarks/ntk.py --quick
	$(BIN)/python benchmarks/sweep.py --quick

clean:
	rm -rf $(VENV) $(OUT)
