# Every target installs what it needs from nothing: a fresh clone + `make test` works.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# pip prints one warning per local index miss; they are noise on these machines.
QUIET  := 2>&1 | { grep -v -E "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; anything unpinned would pull a CUDA build.
	$(PIP) torch==2.13.0 $(QUIET)
	# every other package at the version the suite passed with (constraints.txt)
	$(PIP) -c constraints.txt -e '.[dev]' $(QUIET)
	$(PY) -c "import torch, ray, transformers, raykd; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/raykd fetch teacher
	$(VENV)/bin/raykd fetch corpus sotu
	$(VENV)/bin/raykd distill jobs/demo.yaml

# bench: the `bench` extra (TRL) next to dev, torch kept at the pinned CPU wheel; then every
# bench/*.py benchmark in turn -> docs/BENCHMARKS.md (non-zero exit if a benchmark failed).
bench: install
	$(PIP) -c constraints.txt torch==2.13.0 -e '.[dev,bench]' $(QUIET)
	$(PY) -c "import torch, trl; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	HF_HUB_OFFLINE=1 $(PY) bench/collect.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
