# make demo: install and run the default sweep (quickstart) end to end.
# make test: install and run the test suite (what CI runs through .ci/run).
# make test-fast: the quick loop, every test not marked slow (no Ray, servers or whole experiments).
#
# Another Python line: `make test PY=3.13` (or 3.12) finds python3.13 on the PATH or under
# pyenv's versions (its shims do not expose it) and installs into .venv-py3.13 from
# locks/py313.txt; `make smoke PY=3.13` runs only the tests marked smoke (what CI runs on 3.13).
PY     ?= 3.11
PYTHON ?= $(or $(shell command -v python$(PY) 2>/dev/null | grep -v shims), \
                $(lastword $(wildcard $(shell pyenv root 2>/dev/null)/versions/$(PY).*/bin/python$(PY))), \
                python$(PY))
VENV   ?= $(if $(filter 3.11,$(PY)),.venv,.venv-py$(PY))
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := locks/py$(subst .,,$(PY)).txt
OUT    ?= runs

.PHONY: install lock demo test test-fast smoke lint bench bench-gpu gpu-wheels clean postgres \
        chromium screenshot

install: $(STAMP)

# The venv is made anew whenever the lock changes, so nothing of an older set (TensorFlow, say)
# stays behind. uv installs exactly the lock's versions; locks/overrides.txt keeps TensorFlow and
# tf2jax out (neural-tangents asks for them, ntk-sweep never uses them). Byte-compiled at
# install, because this machine sets PYTHONDONTWRITEBYTECODE=1 and every start would otherwise
# pay for compiling.
$(STAMP): pyproject.toml $(LOCK) locks/overrides.txt
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; \
	  sys.exit(0 if v == "$(PY)" else "$(PYTHON) is Python " + v + ", not $(PY)")'
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode \
	  -c $(LOCK) --override locks/overrides.txt -e '.[dev]'
	touch $(STAMP)

# Regenerate the locks (after changing a floor in pyproject.toml): one per Python line, with
# every extra, for Linux x86-64 (the CUDA wheels exist only there).
lock: install
	for v in 3.11 3.12 3.13; do \
	  $(BIN)/uv pip compile pyproject.toml --extra dev --extra cuda --extra cuda13 \
	    --override locks/overrides.txt --python-version $$v \
	    --python-platform x86_64-manylinux_2_28 --annotation-style line \
	    --custom-compile-command 'make lock' -o locks/py$$(echo $$v | tr -d .).txt -q; \
	done

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

# The browser test of MLflow's UI drives Debian's Chromium (headless, no driver library);
# installed here when missing, as PostgreSQL is. Where it cannot be, that test is skipped.
chromium:
	@if command -v chromium >/dev/null; then :; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium ) \
	    || echo "chromium not installed: the MLflow UI test will be skipped"; \
	fi

# The README's screenshot of MLflow's compare view, from a real browser.
screenshot: install chromium
	$(BIN)/python -m tests.browser screenshot benchmarks/results/mlflow-compare-view.png

# Two test processes (pytest-xdist): one leaves a core idle for much of the suite (imports,
# Ray's and MLflow's start, single-threaded drivers): on the 2-core CI machine 19 min 47 s
# serial, 13 min 23 s on two (2026-11-27). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: install postgres chromium
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS)

test-fast: install
	$(BIN)/python -m pytest -q --durations=15 -m "not slow"

smoke: install
	$(BIN)/python -m pytest -q -m smoke

lint: install
	$(BIN)/ruff check core sweep tests benchmarks

bench: install
	$(BIN)/python benchmarks/attack.py --quick
	$(BIN)/python benchmarks/evaluate.py --quick
	$(BIN)/python benchmarks/ntk.py --quick
	$(BIN)/python benchmarks/quickstart.py --quick

# The GPU check (benchmarks/gpu.py, core/ only) on a machine with jax and CUDA but no network:
# `make gpu-wheels` here downloads the small pure-Python wheels it needs into .gpu-wheels/;
# copy the repository with that folder there and run `make bench-gpu` (see README).
GPU_ARGS ?= --out gpu.json
bench-gpu:
	sh benchmarks/gpu.sh $(GPU_ARGS)

gpu-wheels:
	sh benchmarks/gpu.sh --download

clean:
	rm -rf $(VENV) .venv-py3.* $(OUT)
