"""Ray processes the end-to-end tests start themselves: `ray start` heads and nodes on free local
ports, each in its own process group (stopped with os.killpg, never by name), and finding the
processes of one Ray instance by its private temp directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "smoke.yaml")


def distill_cmd(out: Path, *extra) -> list[str]:
    """`raykd distill` of the smoke job into `out` (the CLI as users run it, in this interpreter)."""
    return [sys.executable, "-m", "raykd.cli", "distill", SMOKE, f"output_dir={out}", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Free ports for a node's agents: another Ray on this machine may hold the defaults (52365, ...)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def ray_head(env: dict, log: Path, num_cpus: int, temp_dir: str | None = None, extra: tuple = ()) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` on free ports in its own process group (stop it with os.killpg);
    returns (process, dashboard port)."""
    gcs, dash = free_port(), free_port()
    args = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats", *agent_ports(), *extra]
    if temp_dir:
        args.append(f"--temp-dir={temp_dir}")
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    proc.gcs_port = gcs
    return proc, dash


def head_env() -> dict:
    """The environment for `ray start` and `ray job`: this virtualenv first on PATH, no RAY_ADDRESS,
    token auth when this machine has a Ray token (Ray 2.60 then requires it)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def instance_processes(temp_dir: str) -> list:
    """The raylets and GCS servers whose command line names `temp_dir` (a Ray instance's own)."""
    import psutil

    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] in ("raylet", "gcs_server") and temp_dir in cmd:
            found.append(p)
    return found


def alive(procs) -> list:
    """Those of `procs` (psutil.Process) still running (zombies count as gone)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
