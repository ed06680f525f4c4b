"""Torch C++-extension build locks left by a killed build, cleared so a later run does not wait forever.

DeepSpeed JIT-builds its CPU shared-memory collective (`deepspeed_shm_comm`) the first time it runs on a
machine, under torch's extension root (`TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions/py<ver>_<acc>`),
guarded by a `lock` file that the build removes when it ends (`torch.utils.file_baton.FileBaton`). A build
killed in between (Ctrl-C, a stopped job, the end of a CI run) leaves the lock, and every later DeepSpeed
start on that machine waits on it forever, silently. No Ray, no DeepSpeed here.

The sweeping thread imports nothing: an import in it while `deepspeed.initialize` imports in the main thread
deadlocked both (setuptools' distutils finder imports while holding the interpreter's global import lock, and
the thread held the module lock of `setuptools`, which it was importing through `torch.utils.cpp_extension`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

STALE_BUILD_S = 600  # a C++-extension build directory unchanged this long holds no live build
STUCK_S = 300  # a DeepSpeed start still in deepspeed.initialize after this long prints its threads' stacks


def extensions_root() -> Path:
    """Where torch builds C++ extensions: `TORCH_EXTENSIONS_DIR`, else its default root (imports torch)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(idle_s: float = STALE_BUILD_S, root: Path | None = None) -> list[Path]:
    """Remove the `lock` files of builds that were killed mid-way under `root` (default `extensions_root()`),
    and return them: a build directory in which nothing (lock included) changed for `idle_s` seconds has no
    build running in it. Each removal is said in one line on stderr. With `root` given it imports nothing."""
    root = extensions_root() if root is None else root
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            newest = max(f.stat().st_mtime for f in lock.parent.iterdir())
        except (FileNotFoundError, ValueError):
            continue  # another worker removed it, or its build just finished
        if time.time() - newest > idle_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"raykd: removed {lock}, left by a C++-extension build that was killed "
                  f"(nothing in its directory changed for {idle_s:.0f} s)", file=sys.stderr)
    return removed


@contextlib.contextmanager
def stale_build_locks_cleared(every_s: float = 30.0, idle_s: float = STALE_BUILD_S, stuck_s: float = STUCK_S):
    """Run the body (`deepspeed.initialize`, which may wait on a build lock) while a thread clears stale locks
    every `every_s` seconds: a lock left by a build killed just before this run goes once it is `idle_s` old.
    A body still running after `stuck_s` seconds prints every thread's stack to stderr, and again every `stuck_s`,
    so a hung start says where it waits (from this thread, so not while the body holds the GIL in C).
    The root is resolved here, in the caller's thread, so that the thread never imports (module docstring)."""
    root = extensions_root()
    done = threading.Event()
    t0 = time.monotonic()
    next_dump = t0 + stuck_s

    def sweep():
        nonlocal next_dump
        while True:
            clear_stale_build_locks(idle_s, root)
            if time.monotonic() >= next_dump and not done.is_set():  # a starved thread waking after the body: no dump
                next_dump += stuck_s
                _print_stacks(f"raykd: deepspeed.initialize still running after {time.monotonic() - t0:.0f} s")
            if done.wait(min(every_s, max(0.01, next_dump - time.monotonic()))):
                return

    thread = threading.Thread(target=sweep, name="raykd-build-locks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _print_stacks(headline: str) -> None:
    """`headline`, then every other thread's Python stack, on stderr in one write."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"{headline}; the stacks of this process's threads:\n"]
    for ident, frame in sys._current_frames().items():
        if ident != me:
            parts.append(f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}")
    sys.stderr.write("".join(parts))
    sys.stderr.flush()
