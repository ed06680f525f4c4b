"""raykd.watchdog without Ray: when the driver dies (SIGKILL), the processes it was told about and their
descendants go too, within seconds; the driver's other children are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

DRIVER = """
import json, subprocess, sys, time
from raykd import watchdog
ray_like = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"])  # a root with a child, like a raylet and its agents
other = subprocess.Popen(["sleep", "301"])  # not Ray's: must survive
time.sleep(0.5)
dog = watchdog.guard([ray_like.pid])
print(json.dumps({"root": ray_like.pid, "other": other.pid, "dog": dog.pid}), flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_watchdog_reaps_the_instance_of_a_killed_driver():
    import psutil

    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = json.loads(driver.stdout.readline())
    root = psutil.Process(pids["root"])
    instance = [root, *root.children(recursive=True)]
    try:
        assert len(instance) >= 2
        time.sleep(1.5)  # the watchdog notes the tree once a second
        assert not _gone(pids["dog"]) and all(not _gone(p.pid) for p in instance)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 10
        while not all(_gone(p.pid) for p in instance) and time.time() < deadline:
            time.sleep(0.1)
        assert all(_gone(p.pid) for p in instance), [p.pid for p in instance if not _gone(p.pid)]
        assert not _gone(pids["other"])  # the driver's other child is none of the watchdog's business
        while not _gone(pids["dog"]) and time.time() < deadline:
            time.sleep(0.1)
        assert _gone(pids["dog"])  # done once it has reaped
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in (pids["other"], pids["dog"], *(p.pid for p in instance)):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
