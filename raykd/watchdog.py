"""A local Ray instance must not outlive the `raykd` driver that started it.

`ray.init()` starts the instance's processes as children of the driver and ties the direct ones
(GCS, raylet, dashboard, log monitor) to it with PR_SET_PDEATHSIG, but the raylet's own children
are not tied to anything: after a SIGKILLed driver (an OOM kill, `kill -9`, a CI timeout) Ray
2.60's DashboardAgent and RuntimeEnvAgent stayed up for one to two minutes (waiting on the dead
GCS), holding the agent ports (52365, ...). So `runtime.init_ray` starts this watchdog next to a
local instance: a small process in its own session, given the pids of the processes Ray started
(GCS, raylet, ...) and holding the read end of a pipe whose write end only the driver has. While
the driver lives the watchdog notes those processes and all their descendants every second (pid
and start time); when the pipe reaches end-of-file (the driver has exited, however it died) it
SIGKILLs those still running, then exits. Nothing else is touched (not the driver's other
children); a pid reused since is recognised by its start time.

It runs as `python -m raykd.watchdog PID...` and imports only the standard library and psutil (no
torch, no Ray), so it starts in well under a second.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

_WATCHDOG: subprocess.Popen | None = None  # the driver keeps the pipe's write end open through this


def guard(roots: list[int]) -> subprocess.Popen:
    """In the driver, right after `ray.init` started a local instance whose processes are `roots`
    (and their descendants): start the watchdog over them (a new one for a new instance)."""
    global _WATCHDOG
    if _WATCHDOG is not None and _WATCHDOG.poll() is None:
        _WATCHDOG.stdin.close()  # the previous instance is shut down: let its watchdog reap and go
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this raykd, whatever sys.path says
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}
    _WATCHDOG = subprocess.Popen(
        [sys.executable, "-m", "raykd.watchdog", *map(str, roots)], stdin=subprocess.PIPE, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )
    return _WATCHDOG


def _note(roots: list, seen: dict[int, float]) -> None:
    """Add the live `roots` (psutil.Process) and their descendants to `seen` (pid -> start time)."""
    import psutil

    for root in roots:
        try:
            for proc in (root, *root.children(recursive=True)):
                seen.setdefault(proc.pid, proc.create_time())
        except psutil.NoSuchProcess:
            pass


def _reap(seen: dict[int, float]) -> int:
    """SIGKILL every process in `seen` still running (same pid and start time); returns how many."""
    import psutil

    killed = 0
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


def watch(pids: list[int], poll_s: float = 1.0) -> int:
    """Track `pids` and their descendants until stdin (the driver's pipe) closes, then reap them."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the driver; its exit is what we wait for
    roots, seen = [], {}
    for pid in pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    while True:
        _note(roots, seen)
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver has exited (or started another instance)
    return _reap(seen)


if __name__ == "__main__":
    watch([int(a) for a in sys.argv[1:]])
