"""A C++-extension build killed mid-way (DeepSpeed JIT-builds its CPU collective on first use) leaves a
lock that torch waits on forever: a DeepSpeed run clears locks whose build directory has been idle
for `STALE_BUILD_S`, and leaves a live build's lock alone. Real torch FileBaton, no Ray."""
import os
import threading
import time

from torch.utils.file_baton import FileBaton

from raykd.build_locks import STALE_BUILD_S, clear_stale_build_locks, stale_build_locks_cleared


def _build_dir(root, name, age_s):
    """A build directory as torch leaves it: build.ninja and the lock, all last touched `age_s` ago."""
    d = root / name
    d.mkdir(parents=True)
    then = time.time() - age_s
    for f in ("build.ninja", "lock"):
        (d / f).touch()
        os.utime(d / f, (then, then))
    return d / "lock"


def test_a_killed_builds_lock_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    killed = _build_dir(tmp_path, "deepspeed_shm_comm", STALE_BUILD_S + 60)
    live = _build_dir(tmp_path, "other_op", 5)
    assert not FileBaton(str(killed)).try_acquire()  # what made every later DeepSpeed start wait forever

    assert clear_stale_build_locks() == [killed]
    assert not killed.exists() and live.exists()
    assert "deepspeed_shm_comm/lock" in capsys.readouterr().err
    baton = FileBaton(str(killed))
    assert baton.try_acquire()  # the next build takes the lock and runs
    baton.release()


def test_a_build_still_writing_keeps_its_lock(tmp_path, monkeypatch):
    """An old lock in a directory where the compiler just wrote an object file is a live build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _build_dir(tmp_path, "deepspeed_shm_comm", STALE_BUILD_S + 60)
    (lock.parent / "shm.o").touch()
    assert clear_stale_build_locks() == [] and lock.exists()


def test_the_default_root_layout_is_searched(tmp_path, monkeypatch):
    """Without TORCH_EXTENSIONS_DIR torch builds under <default root>/py<ver>_<accelerator>/<name>."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
    lock = _build_dir(tmp_path / "py311_cpu", "deepspeed_shm_comm", STALE_BUILD_S + 60)
    assert clear_stale_build_locks() == [lock] and not lock.exists()


def test_a_wait_on_a_lock_that_goes_stale_during_the_run_ends(tmp_path, monkeypatch):
    """A build killed just before the run: its lock is fresh when the run starts, and torch's wait would never
    end; under `stale_build_locks_cleared` the wait ends once the lock has been idle `idle_s`."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _build_dir(tmp_path, "deepspeed_shm_comm", 0)
    waited = threading.Event()

    def build():
        with stale_build_locks_cleared(every_s=0.05, idle_s=0.5):
            FileBaton(str(lock), wait_seconds=0.05).wait()  # what torch does while another process holds the lock
        waited.set()

    threading.Thread(target=build, daemon=True).start()
    assert waited.wait(timeout=20), "the wait on a stale lock did not end"
    assert not lock.exists()


def test_a_start_that_stays_stuck_prints_where_it_waits(tmp_path, monkeypatch):
    """A body still running after `stuck_s` prints every thread's stack, again every `stuck_s`, and never after
    the body has returned. The body waits for the second print itself rather than for a fixed time, so a
    loaded machine (a starved thread) cannot change what is asserted."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    import subprocess
    import sys

    code = ("import sys, threading, time\nimport raykd.build_locks as bl\n"
            "printed, two = [], threading.Event()\nreal = bl._print_stacks\n"
            "def counting(headline):\n    real(headline)\n    printed.append(headline)\n"
            "    if len(printed) >= 2:\n        two.set()\n"
            "bl._print_stacks = counting\n"
            "def waiting_for_peers():\n    assert two.wait(60), 'no second print in 60 s'\n"
            "with bl.stale_build_locks_cleared(every_s=0.05, stuck_s=0.2):\n    waiting_for_peers()\n"
            "print('BODY RETURNED', file=sys.stderr, flush=True)\ntime.sleep(1.0)\nprint('done')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    during, after = out.stderr.split("BODY RETURNED", 1)
    assert during.count("in waiting_for_peers") >= 2, out.stderr  # the stack names where the body waits
    assert "still running after" not in after, out.stderr  # five stuck_s periods later: no print


def test_the_sweeping_thread_imports_nothing(tmp_path, monkeypatch):
    """An import in the sweeping thread while `deepspeed.initialize` imports in the main thread deadlocked both
    (CI hung 20 min in test_parallel's DeepSpeed start: the thread imported torch.utils.cpp_extension, hence
    setuptools, as setuptools' distutils finder in the main thread held the global import lock). In a fresh
    interpreter (torch not yet imported) every import the thread would make is seen by a recording finder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    import subprocess
    import sys

    code = ("import sys, threading\n"
            "seen = []\n"
            "class Recorder:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        seen.append((threading.current_thread().name, name))\n"
            "        return None\n"
            "sys.meta_path.insert(0, Recorder())\n"
            "import raykd.build_locks as bl\n"
            "assert 'torch' not in sys.modules\n"
            "real, swept = bl.clear_stale_build_locks, threading.Event()\n"
            "def counting(*a, **k):\n    out = real(*a, **k)\n    swept.set()\n    return out\n"
            "bl.clear_stale_build_locks = counting\n"
            "with bl.stale_build_locks_cleared(every_s=0.05):\n    assert swept.wait(60), 'no sweep in 60 s'\n"
            "names = sorted({n for t, n in seen if t == 'raykd-build-locks'})\n"
            "print(len(names), names[:5])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 []", out.stdout  # before: 800-odd modules, torch and setuptools among them
