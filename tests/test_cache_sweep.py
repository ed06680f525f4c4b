"""`raykd sweep` from a teacher cache, as users run it: its own process, its own local Ray.

In a module of its own: a Ray instance left running in the pytest process (test_cache.py's
module fixture) would be found and joined by the subprocess's `ray.init`, which then fails."""

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_sweep_runs_from_a_cache(tmp_path):
    """`raykd sweep` as users run it (it starts its own local Ray): builds the cache, then every
    trial reads it. One whole CPU per worker, one trial at a time: the sizing that once starved
    the trials' Ray Data readers when the cache build started Ray first."""
    import subprocess
    import sys

    cache_dir, out = tmp_path / "cache", tmp_path / "sweep"
    cmd = [sys.executable, "-m", "raykd.cli", "sweep", str(ROOT / "jobs" / "sweep-smoke.yaml"), f"output_dir={out}",
           f"teacher.cache={cache_dir}", "data.max_train_blocks=48", "teacher.cache_shard_blocks=16", "sweep.num_samples=3",
           "train.max_steps=8", "sweep.max_concurrent=1", "scale.cpus_per_worker=1.0"]
    try:  # about 2 minutes alone on 2 cores; the limit leaves room for a loaded machine
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    except subprocess.TimeoutExpired as e:  # say where it stood
        tail = (e.stderr or b"")[-3000:]
        pytest.fail(f"raykd sweep from a cache ran past {e.timeout} s; its stderr ended: {tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read once for every trial" in proc.stdout + proc.stderr  # the trials took their columns from shared rows
    meta = json.loads((cache_dir / "raykd_cache.json").read_text())
    assert meta["complete"] and meta["layers"] == list(range(6)) and meta["topk"] == 0  # depths vary: every layer; dense (the default)
    assert (meta["blocks"], meta["whole"]) == (8 * 4, False)  # what a trial reads (8 steps x 4 blocks) of the 48
    import csv

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and all(r["status"] in ("TERMINATED", "EARLY_STOPPED") and float(r["val_loss"]) > 0 for r in rows), rows
    assert any(r["status"] == "TERMINATED" and float(r["val_perplexity"]) > 0 for r in rows), rows
