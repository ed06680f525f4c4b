"""Ray processes the end-to-end tests start themselves: `ray start` heads and nodes on free local
ports, each in its own process group (stopped with os.killpg, never by name), and finding the
processes of one Ray instance by its private temp directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def ray_head(env: dict, log: Path, num_cpus: int, temp_dir: str | None = None, extra: tuple = (), port: int | None = None) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` on free ports (its GCS on `port` when given) in its own process group
    (stop it with os.killpg); returns (process, dashboard port)."""
    gcs, dash = port or free_port(), free_port()
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


# --- clusters of `ray start` nodes: started one at a time, stopped by session; jobs and the State API ---


def seed_cache(cache: Path, sotu: dict[str, int] | None = None) -> None:
    """A node's own RAYKD_CACHE: the built tiny teachers and `sotu` speeches per split of the sotu corpus
    (its named layout), copied from this user's cache (no downloads)."""
    from raykd.models import cache_root

    home = cache_root()
    for teacher in (home / "teachers").glob("tiny-random-*"):
        shutil.copytree(teacher, cache / "teachers" / teacher.name)
    if sotu:  # fetched here unless an earlier test or run already did (fetch_corpus returns at once then)
        from raykd.data.corpora import fetch_corpus

        fetch_corpus("sotu", log=lambda m: None)
    for split, n in (sotu or {}).items():
        (cache / "corpora" / "sotu" / split).mkdir(parents=True)
        for f in sorted((home / "corpora" / "sotu" / split).glob("*.txt"))[:n]:
            shutil.copy(f, cache / "corpora" / "sotu" / split / f.name)


def wait_for_nodes(env: dict, dashboard: str, count: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> list[dict] | None:
    """The alive nodes once there are `count`; None when `proc` (the node starting) gave up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        nodes = alive_nodes(env, dashboard)
        if len(nodes) >= count:
            return nodes
        time.sleep(1)
    raise AssertionError(f"{count} nodes did not come up in {timeout} s: {log.read_text()[-3000:]}")


def start_node(start, env: dict, count: int, log: Path, procs: dict, name: str, attempts: int = 3) -> list[dict]:
    """Start a node with `start()` -> (process, dashboard url) until the cluster has `count` alive nodes.
    Ray gives a raylet 30 s to register (hard-coded in 2.60); on 2 busy cores that can pass, and `ray start`
    exits with "The current node timed out during startup": then its session goes and it starts again."""
    for _ in range(attempts):
        procs[name], dashboard = start()
        nodes = wait_for_nodes(env, dashboard, count, procs[name], log)
        if nodes is not None:
            return nodes
        assert "timed out during startup" in log.read_text(), log.read_text()[-3000:]
        stop_nodes({name: procs.pop(name)})
    raise AssertionError(f"node {name} did not start in {attempts} attempts: {log.read_text()[-3000:]}")


def stop_nodes(procs: dict, grace: float = 20) -> None:
    """Stop the nodes, worker nodes first (a node drains through the head's GCS on SIGTERM; with the GCS
    gone it waits 30 s for it): SIGTERM to each `ray start`, then after `grace` seconds SIGKILL to what is
    left of its session."""
    for proc in reversed(list(procs.values())):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        kill_session(proc.pid)


def submit(env: dict, dashboard: str, *args: str, wait: bool = True, options: tuple = ()) -> subprocess.CompletedProcess:
    """`ray job submit ... -- raykd ARGS` of this checkout (`options`: more `ray job submit` flags)."""
    cmd = ["job", "submit", "--address", dashboard, "--working-dir", str(ROOT), *options,
           *([] if wait else ["--no-wait"]), "--", "raykd", *args]
    for _ in range(30):  # the dashboard answers before its job agent is up
        run = ray_cli(env, *cmd, timeout=600)
        if "No available agent" not in run.stderr:
            return run
        time.sleep(2)
    return run


def list_state(env: dict, dashboard: str, kind: str, *filters: str) -> list[dict]:
    """`ray list actors|tasks|nodes` (State API, JSON) with `--filter key=value` filters."""
    args = ["list", kind, "--address", dashboard, "--format", "json", "--limit", "10000", "--detail"]
    run = ray_cli(env, *args, *(a for f in filters for a in ("--filter", f)))
    assert run.returncode == 0, run.stderr[-2000:]
    # Ray 2.60 prints this sentence instead of a JSON [] when nothing matches, --format json or not
    return [] if run.stdout.strip() == "No resource in the cluster" else json.loads(run.stdout)


def job_status(env: dict, dashboard: str, job: str) -> str:
    run = ray_cli(env, "job", "status", job, "--address", dashboard)
    text = (run.stdout + run.stderr).lower()  # Ray 2.60 prints "Job 'raysubmit_…' succeeded", lower case
    return next((s for s in ("succeeded", "failed", "stopped") if f"job '{job.lower()}' {s}" in text), "running")


def diagnose(env: dict, dashboard: str, gcs: str, job: str | None = None) -> str:
    """What a failed assertion shows: the job's status and log tail (when given), and the cluster's resources."""
    parts = []
    if job:
        parts += [ray_cli(env, "job", "status", job, "--address", dashboard).stdout[-1000:],
                  ray_cli(env, "job", "logs", job, "--address", dashboard).stdout[-4000:]]
    usage = ray_cli(env, "status", "--address", gcs)
    return "\n".join([*parts, usage.stdout[-2000:] + usage.stderr[-500:]])
