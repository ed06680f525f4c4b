"""A run outlives damage on a local Ray: a truncated newest checkpoint (resume falls back to the
newest intact one) and a SIGKILLed driver (its local Ray instance goes with it; a rerun resumes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from _ray_procs import alive, distill_cmd, instance_processes

pytestmark = pytest.mark.ray

ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def test_truncated_newest_checkpoint_falls_back_to_an_intact_one(local_ray, tmp_path):
    """Finish a 4-step run (checkpoints at steps 2 and 4), truncate the newest checkpoint's worker0.pt
    (a full disk, a half-copied directory), run the same command again: it says in one line which
    checkpoint it skips, resumes from step 2 and finishes at step 4 with the right token count. (Both
    runs on this module's Ray: the first in this process, the second a CLI that RAY_ADDRESS points at it.)"""
    from raykd.config import load_config
    from raykd.train import distill

    out = tmp_path / "out"
    cmd = distill_cmd(out, "train.max_steps=4", "train.checkpoint_every=2", "train.report_every=2")
    distill(load_config(cmd[4], cmd[5:]), log=lambda m: None)
    older, newest = sorted(p for p in (out / "train").glob("checkpoint_*") if p.is_dir())
    assert {p.name for p in newest.iterdir()} >= {"manifest0.json", "manifest1.json", "worker0.pt", "student"}
    size = (newest / "worker0.pt").stat().st_size
    with open(newest / "worker0.pt", "r+b") as fh:
        fh.truncate(size // 2)
    (out / "metrics.json").unlink()
    run = _run(cmd)
    log = run.stdout + run.stderr
    # one line (Ray 2.60 forwards a worker's stdout to the driver's stdout and again to its stderr)
    notes = [ln for ln in run.stdout.splitlines() if "is damaged" in ln]
    assert len(notes) == 1 and run.stderr.count("is damaged") <= 1, log[-4000:]
    assert notes[0].endswith(f"raykd: checkpoint {newest.name} is damaged (worker0.pt holds {size // 2} bytes, the manifest "
                             f"says {size}); resuming from {older.name}, the newest intact checkpoint of this run"), notes
    assert "PytorchStreamReader" not in log
    assert "resuming from step 2 " in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_at"] == [2]
    assert metrics["tokens_seen"] == 4 * 4 * 64 * 2


def test_sigkilled_driver_takes_its_local_ray_along(tmp_path):
    """SIGKILL a `raykd distill` that started its own local Ray, after its first checkpoint: within 30 s
    no process of that instance is left (its raylet and GCS, found by the instance's private temp dir,
    and every descendant the driver had; Ray 2.60's agents used to stay 1-2 minutes), and the same
    command run again at once resumes from the checkpoint and finishes."""
    import psutil

    tmp_root = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    env = {"RAY_TMPDIR": tmp_root}
    out = tmp_path / "out"
    cmd = distill_cmd(out, "train.max_steps=12", "train.checkpoint_every=4", "train.report_every=4")
    first = subprocess.Popen(cmd, env={**os.environ, **ENV, **env}, stdout=(tmp_path / "first.log").open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    family = []
    try:
        deadline = time.time() + 300
        while not (out / "train" / "checkpoint_manager_snapshot.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        family = psutil.Process(first.pid).children(recursive=True)
        assert {p.name() for p in instance_processes(tmp_root)} == {"raylet", "gcs_server"}
        assert len(family) > 15, [p.name() for p in family]  # the instance: GCS, raylet, dashboard, agents, workers
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.time() + 30
        while (alive(family) or instance_processes(tmp_root)) and time.time() < deadline:
            time.sleep(0.5)
        left = alive(family) + instance_processes(tmp_root)
        assert not left, [(p.pid, p.name()) for p in left]
        assert not (out / "metrics.json").exists()
        run = _run(cmd, env=env)
        log = run.stdout + run.stderr
        assert "resuming from step 4 " in log or "resuming from step 8 " in log, log[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 12 and len(metrics["resumed_at"]) == 1
        assert metrics["tokens_seen"] == 12 * 4 * 64 * 2
    finally:
        for proc in alive(family):  # only what this test's driver started
            proc.kill()
        shutil.rmtree(tmp_root, ignore_errors=True)
