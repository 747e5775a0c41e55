# make demo: install and run the default experiment end to end.
# make test: install and run the test suite (what CI runs through .ci/run).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs

.PHONY: install demo test lint bench clean

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

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check core sweep tests benchmarks

bench: install
	$(BIN)/python benchmarks/attack.py --quick

clean:
	rm -rf $(VENV) $(OUT)
