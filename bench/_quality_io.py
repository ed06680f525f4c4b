"""The quality study's steps on disk: a `raykd` CLI run on a local Ray instance of its own, and a finished
step's result recorded beside the config it ran with, so that a rerun keeps it (bench/quality.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C


def run_cli(verb: str, path: Path, *extra: str) -> float:
    """`raykd VERB path extra...` on a local Ray instance of its own; its wall seconds (raises on failure)."""
    t = time.perf_counter()
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray instance per run, whatever the shell says
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", verb, str(path), *extra], cwd=C.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        raise RuntimeError(f"raykd {verb} {path.name}: failed (exit {proc.returncode})")
    return time.perf_counter() - t


def record(path: Path, config: dict, result: dict) -> None:
    """A finished step's result beside the config it ran with (atomically): a rerun with the same config keeps it."""
    from raykd import manifest

    manifest.write_json(path, {"config": config, "result": result})


def finished(path: Path, config: dict, fresh: bool) -> dict | None:
    """The recorded result of a step that finished with this config (None: run it)."""
    if fresh or not path.exists():
        return None
    rec, want = json.loads(path.read_text()), json.loads(json.dumps(config))
    have = rec.get("config")
    if have != want and isinstance(have, dict) and "teacher" in have:  # a run config: compare both as raykd completes them now
        from raykd.config import from_dict  # (a field added since, at its default, is the run that was recorded)

        have, want = from_dict(have).to_dict(), from_dict(want).to_dict()
    return rec["result"] if have == want else None
