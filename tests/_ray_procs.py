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
    proc.gcs_port, proc.dashboard_port = gcs, dash
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


def ray_node(env: dict, log: Path, gcs_port: int, num_cpus: int, resources: str, hide: str | None = None) -> subprocess.Popen:
    """A worker node `ray start --address --block` joining the head at `gcs_port`, in its own process
    group (killing that group is losing the node). With `hide`, the node runs in a private mount
    namespace where that directory is an empty tmpfs: on one machine this is what a real cluster's
    separate disks look like (a driver-local path read on this node fails, as it would there)."""
    args = [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={num_cpus}",
            f"--resources={resources}", "--disable-usage-stats", *agent_ports()]
    if hide:
        args = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs -o size=1m none "$0" && exec "$@"',
                hide, *args]
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def can_hide_dirs() -> bool:
    """Whether this machine lets us give a process a private mount namespace (root with CAP_SYS_ADMIN)."""
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def alive_nodes(env: dict, dashboard: str) -> list[dict]:
    """The cluster's alive nodes from the State API (`ray list nodes`), [] while the head is not up."""
    import json

    run = ray_cli(env, "list", "nodes", "--address", dashboard, "--format", "json", "--limit", "100")
    try:
        nodes = json.loads(run.stdout) if run.returncode == 0 else []
    except ValueError:  # the dashboard is up before the State API answers
        return []
    return [n for n in nodes if n.get("state") == "ALIVE"]


def session_processes(sid: int) -> list:
    """The live processes of session `sid`: a `ray start` started with start_new_session=True and all it
    started. (Ray 2.60 makes each worker process its own process-group leader, so a node's process group
    misses its workers; its session does not.)"""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a node lost at once: raylet, agents and workers)."""
    import psutil

    for p in session_processes(sid):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
