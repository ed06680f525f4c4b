"""Checkpoint manifests (no Ray): a damaged checkpoint is told from an intact one, and a resume falls
back to the newest intact checkpoint of the run."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from pyarrow.fs import LocalFileSystem

from raykd import manifest


def _checkpoint(root, name: str, step: int, world: int = 2):
    """A checkpoint as Ray Train merges it: every worker's part, each with its manifest."""
    d = root / name
    for rank in range(world):
        part = root / f"part-{name}-{rank}"
        (part / "sub").mkdir(parents=True)
        (part / f"worker{rank}.pt").write_bytes(os.urandom(3000 + rank))
        if rank == 0:
            (part / "distiller.pt").write_bytes(os.urandom(5000))
            (part / "sub" / "metrics.json").write_text(json.dumps({"step": step}))
        manifest.write(part, rank, world, step)
        shutil.copytree(part, d, dirs_exist_ok=True)
    return d


def test_intact_damaged_and_legacy_checkpoints(tmp_path):
    fs = LocalFileSystem()
    d = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 4)
    assert manifest.problem(fs, str(d)) is None
    data = (d / "worker0.pt").read_bytes()
    (d / "worker0.pt").write_bytes(data[:1000])  # truncated
    assert manifest.problem(fs, str(d)) == "worker0.pt holds 1000 bytes, the manifest says 3000"
    (d / "worker0.pt").write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert manifest.problem(fs, str(d)) == "worker0.pt does not match its SHA-256"
    (d / "worker0.pt").write_bytes(data)
    (d / "sub" / "metrics.json").unlink()
    assert manifest.problem(fs, str(d)) == "sub/metrics.json is missing"
    (d / "manifest1.json").unlink()  # worker 1's part never arrived
    assert manifest.problem(fs, str(d)) == "manifest1.json of worker 1 (of 2) is missing"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "worker0.pt").write_bytes(b"x")
    assert manifest.problem(fs, str(legacy)) is None  # written before manifests: resumed unverified


def test_choose_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    fs = LocalFileSystem()
    run = tmp_path / "run"
    oldest = _checkpoint(run, "checkpoint_2026-01-01_00-00-01.000000", 2)
    middle = _checkpoint(run, "checkpoint_2026-01-01_00-00-02.000000", 4)
    newest = _checkpoint(run, "checkpoint_2026-01-01_00-00-03.000000", 6)
    assert manifest.choose(fs, str(newest)) == (str(newest), None)
    (newest / "worker0.pt").write_bytes(b"")
    (middle / "distiller.pt").write_bytes(b"short")
    path, note = manifest.choose(fs, str(newest))
    assert path == str(oldest)
    assert note == (f"raykd: checkpoint {newest.name} is damaged (worker0.pt holds 0 bytes, the manifest says 3000); "
                    f"resuming from {oldest.name}, the newest intact checkpoint of this run")
    (oldest / "worker1.pt").unlink()
    with pytest.raises(RuntimeError, match="no older checkpoint of this run is intact; delete"):
        manifest.choose(fs, str(newest))
