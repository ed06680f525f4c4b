"""The test lanes' guard: a test that starts Ray, runs the `ray` CLI or loads the real SmolLM2
teacher must carry the matching marker (`ray`, `real`), or `make test-fast` would silently run it.

tests/conftest.py installs this in the pytest process and puts this directory first on
PYTHONPATH, so Python imports it at start-up in every subprocess the tests start too (`raykd
distill` in a subprocess, Ray's own workers). It wraps `ray.init`, `ray.scripts.scripts.main`
and `raykd.models.fetch_smollm2` when those modules are imported; each wrapper reads the
running test (its node id and markers, written by conftest to $RAYKD_LANE_GUARD/current.json
before every test) and, when the test lacks the marker, records the violation in
$RAYKD_LANE_GUARD/violations (conftest fails the test on it, even if the error was caught) and
raises. Outside a pytest session (no $RAYKD_LANE_GUARD) it does nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from importlib.machinery import PathFinder

ENV = "RAYKD_LANE_GUARD"
# module -> (attribute, marker the running test needs, what the call does)
GUARDED = {
    "ray": ("init", "ray", "started Ray (ray.init)"),
    "ray.scripts.scripts": ("main", "ray", "ran the `ray` command line (ray start / ray job ...)"),
    "raykd.models": ("fetch_smollm2", "real", "loaded the real SmolLM2 teacher (raykd.models.fetch_smollm2)"),
}


def current() -> dict | None:
    """The running test, {"test": node id, "markers": [...]}, or None outside a test."""
    state = os.environ.get(ENV)
    if not state:
        return None
    try:
        with open(os.path.join(state, "current.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def message(test: str, marker: str, what: str) -> str:
    return (f"{test} {what} but is not marked @pytest.mark.{marker}: mark it (or its module: "
            f"pytestmark = pytest.mark.{marker}) so that `make test-fast` leaves it out")


def _guard(fn, marker: str, what: str):
    if getattr(fn, "_lane_guard", False):
        return fn

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        test = current()
        if test is not None and marker not in test["markers"]:
            msg = message(test["test"], marker, what)
            with open(os.path.join(os.environ[ENV], "violations"), "a") as fh:
                fh.write(json.dumps({"test": test["test"], "message": msg}) + "\n")
            raise RuntimeError(f"test lanes: {msg}")
        return fn(*args, **kwargs)

    guarded._lane_guard = True
    return guarded


def _patch(module) -> None:
    attr, marker, what = GUARDED[module.__name__]
    fn = getattr(module, attr, None)
    if fn is not None:
        setattr(module, attr, _guard(fn, marker, what))


class _Finder:
    """Wraps the guarded attributes right after their module has been executed."""

    def find_spec(self, name, path, target=None):
        if name not in GUARDED:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Guard the modules imported from now on, and those already imported."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in GUARDED:
        if name in sys.modules:
            _patch(sys.modules[name])


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one (Debian's python3 does)."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":  # imported at start-up (not as tests._lane_guard.sitecustomize in pytest)
    _chain()
    if os.environ.get(ENV):
        install()
