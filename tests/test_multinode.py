"""A real multi-node Ray cluster on this one machine: `ray start --head --num-cpus=0` plus two worker
nodes (`ray start --address`, 2 CPUs and a resource of its own each, started one after the other),
every node in its own session (SIGKILL to a session is a lost node). The jobs go in with `ray job
submit`, the driver pinned to the head; Train workers and Ray Data tasks can only run on the worker
nodes (the head has no CPU).

Each worker node runs in a private mount namespace where the head's RAYKD_CACHE is an empty
directory, as on a real cluster where nodes do not share a disk: a named teacher (`tiny-random`) or
corpus (`sotu`) that was resolved to the driver's cache path instead of on the reading node fails
here instead of passing by luck. Each node has its own RAYKD_CACHE, seeded with the same small
slice of the corpus and the built tiny teacher (no downloads).

One cluster serves the whole module (about 35 s to start on 2 cores).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _ray_procs import (
    can_hide_dirs,
    diagnose,
    distill_cmd,
    head_env,
    job_status,
    kill_session,
    list_state,
    ray_cli,
    ray_head,
    ray_node,
    seed_cache,
    session_processes,
    start_node,
    stop_nodes,
    submit,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODES = ("a", "b")  # worker nodes, each with resource node_<name>
SOTU_SLICE = {"train": 8, "validation": 2}  # speeches per split in every node's cache


@dataclass
class Cluster:
    env: dict  # for `ray` commands and drivers: RAY_TMPDIR of this cluster, token auth
    dashboard: str  # http://127.0.0.1:PORT (jobs, State API)
    gcs: str  # 127.0.0.1:PORT (what a driver's RAY_ADDRESS names)
    caches: dict[str, Path]  # RAYKD_CACHE per node: head, a, b
    procs: dict[str, subprocess.Popen]  # `ray start --block` per node (its session is the node)
    node_ids: dict[str, str]  # head / a / b -> Ray node id
    hidden: bool  # the worker nodes cannot see the head's cache (mount namespaces available)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    tmp_root = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    env = {**head_env(), "RAY_TMPDIR": tmp_root}
    caches = {name: base / f"cache-{name}" for name in ("head", *NODES)}
    for cache in caches.values():
        seed_cache(cache, SOTU_SLICE)
    hidden = can_hide_dirs()
    procs: dict[str, subprocess.Popen] = {}
    try:
        def head():
            proc, dash = ray_head({**env, "RAYKD_CACHE": str(caches["head"])}, base / "head.log", num_cpus=0, extra=('--resources={"head": 1}',))
            return proc, f"http://127.0.0.1:{dash}"

        start_node(head, env, 1, base / "head.log", procs, "head")
        dashboard, gcs_port = f"http://127.0.0.1:{procs['head'].dashboard_port}", procs["head"].gcs_port
        for i, name in enumerate(NODES, start=2):  # one at a time: raylets started together timed out on 2 cores
            def node(name=name):
                return ray_node({**env, "RAYKD_CACHE": str(caches[name])}, base / f"node-{name}.log", gcs_port, num_cpus=2,
                                resources=json.dumps({f"node_{name}": 1}), hide=str(caches["head"]) if hidden else None), dashboard

            nodes = start_node(node, env, i, base / f"node-{name}.log", procs, name)
        ids = {}
        for n in nodes:
            res = n["resources_total"]
            ids["head" if "head" in res else next(k[5:] for k in res if k.startswith("node_"))] = n["node_id"]
        yield Cluster(env, dashboard, f"127.0.0.1:{procs['head'].gcs_port}", caches, procs, ids, hidden)
    finally:
        stop_nodes(procs)
        shutil.rmtree(tmp_root, ignore_errors=True)


def _submit(c: Cluster, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit` of `raykd ...` from this checkout, the driver pinned to the head."""
    return submit(c.env, c.dashboard, *args, wait=wait, options=("--entrypoint-resources", '{"head": 1}'))


def _list(c: Cluster, kind: str, *filters: str) -> list[dict]:
    return list_state(c.env, c.dashboard, kind, *filters)


def test_storage_path_is_required_on_a_cluster_of_several_nodes(cluster, tmp_path):
    """A driver joining the 3-node cluster without scale.storage_path: exit 2 and one line, before any
    Train worker starts (checkpoints under OUTPUT/ on the driver's disk would be out of the workers' reach)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs, "RAYKD_CACHE": str(cluster.caches["head"])}
    run = subprocess.run(distill_cmd(tmp_path / "out", "train.max_steps=2"), env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("raykd: error:")]
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith("raykd: error: scale.storage_path: the Ray cluster has 3 nodes and checkpoints would go to "), lines
    assert lines[0].endswith("set scale.storage_path to storage every node sees (s3://bucket/prefix or a shared file system path)")
    assert _list(cluster, "actors", "class_name=RayTrainWorker") == []
    assert not (tmp_path / "out").exists()


def test_smoke_job_runs_on_the_worker_nodes(cluster, tmp_path):
    """`ray job submit ... raykd distill jobs/smoke.yaml` on the named corpus `sotu`: it succeeds, its Train
    workers and Ray Data tasks ran on the worker nodes only, the checkpoints are under the shared storage
    in the run's own directory, and the named teacher and corpus were found in each reading node's cache."""
    from transformers import AutoModelForCausalLM

    from raykd.runtime import run_name

    out, storage = tmp_path / "out", tmp_path / "storage"
    run = _submit(cluster, "distill", "jobs/smoke.yaml", f"output_dir={out}", f"scale.storage_path={storage}",
                  "data.train=[sotu]", "train.max_steps=4", "train.report_every=2")
    assert run.returncode == 0 and "succeeded" in run.stdout.lower(), (run.stdout + run.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 4 * 64 * 2
    workers = {cluster.node_ids["a"], cluster.node_ids["b"]}
    assert len(metrics["worker_nodes"]) == 2 and set(metrics["worker_nodes"]) <= workers, (metrics["worker_nodes"], cluster.node_ids)
    tokenize = [t for t in _list(cluster, "tasks", "type=NORMAL_TASK") if "_tokenize_pack" in t["name"]]
    ran = [t for t in tokenize if t["node_id"]]  # a task the stream no longer needed may end unscheduled (node_id None)
    assert ran and {t["node_id"] for t in ran} <= workers, {t["node_id"] for t in ran}
    assert all(t["state"] != "FINISHED" for t in tokenize if not t["node_id"]), [t for t in tokenize if not t["node_id"]]
    assert sorted(p.name for p in (storage / run_name(out)).glob("checkpoint_*") if p.is_dir())
    assert not (out / "train").exists()  # nothing checkpointed on the driver's disk
    AutoModelForCausalLM.from_pretrained(out / "student")
    if not cluster.hidden:
        pytest.skip("no mount namespaces here: the nodes could see the head's cache, so reading on the node is unproven")


def _job_status(c: Cluster, job: str) -> str:
    return job_status(c.env, c.dashboard, job)


def _diagnose(c: Cluster, job: str) -> str:
    return diagnose(c.env, c.dashboard, c.gcs, job)


def _train_worker_nodes(c: Cluster) -> set[str]:
    """The worker nodes running RayTrainWorker processes now, from the process table (instant, unlike the
    State API's CLI): a node's processes are in the session of its `ray start`."""
    import psutil

    found = set()
    for name, proc in c.procs.items():
        for p in session_processes(proc.pid):
            try:
                if p.name() == "ray::RayTrainWorker":
                    found.add(name)
            except psutil.NoSuchProcess:
                pass
    return found


def test_losing_a_node_the_worker_range_goes_on_with_one_worker(cluster, tmp_path):
    """An elastic run, `scale.num_workers=[1, 2]`, one Train worker per node (1.5 of each node's 2 CPUs).
    After the first checkpoint, SIGKILL every process of one worker node (its raylet, agents and workers:
    the node is lost). Ray Train restarts the group from the last checkpoint with the one worker that fits
    on the surviving node; that worker accumulates two micro-batches per step, so the global batch, the step
    count and the tokens seen are those of the 2-worker run, the phases say who ran which steps, and the
    student is exported. The job sets scale.worker_start_timeout_s=20 (Ray Train's default is 60 s)."""
    from transformers import AutoModelForCausalLM

    from raykd.runtime import run_name

    out, storage, steps = tmp_path / "out", tmp_path / "storage", 16
    run = _submit(cluster, "distill", "jobs/smoke.yaml", f"output_dir={out}", f"scale.storage_path={storage}", f"train.max_steps={steps}",
                  "train.checkpoint_every=4", "train.report_every=4", "scale.max_failures=3", "scale.num_workers=[1,2]",
                  "scale.cpus_per_worker=1.5", "data.dedupe=false", "train.generation_eval=false", "scale.worker_start_timeout_s=20", wait=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    job = re.search(r"raysubmit_\w+", run.stdout + run.stderr).group(0)
    snapshot = storage / run_name(out) / "checkpoint_manager_snapshot.json"  # written once Ray registered a checkpoint
    deadline, asked = time.time() + 400, time.time()
    while not snapshot.exists() and time.time() < deadline:
        if time.time() - asked > 15:  # the status CLI takes seconds: ask now and then, watch the file often
            assert _job_status(cluster, job) == "running", _diagnose(cluster, job)
            asked = time.time()
        time.sleep(0.2)
    assert snapshot.exists(), _diagnose(cluster, job)
    assert _train_worker_nodes(cluster) == set(NODES)  # one worker on each worker node
    victim, survivor = NODES
    kill_session(cluster.procs[victim].pid)  # its raylet, agents and workers, at once
    deadline = time.time() + 420
    while _job_status(cluster, job) == "running" and time.time() < deadline:
        time.sleep(3)
    assert _job_status(cluster, job) == "succeeded", _diagnose(cluster, job)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["tokens_seen"] == steps * 4 * 64 * 2
    assert len(metrics["resumed_at"]) == 1 and 4 <= metrics["resumed_at"][0] < steps and metrics["resumed_at"][0] % 4 == 0
    resumed = metrics["resumed_at"][0]
    assert metrics["worker_phases"] == [{"from_step": 0, "workers": 2, "grad_accum": 1},
                                        {"from_step": resumed, "workers": 1, "grad_accum": 2}], metrics["worker_phases"]
    assert set(metrics["worker_nodes"]) == {cluster.node_ids[survivor]}, (metrics["worker_nodes"], cluster.node_ids)
    logs = ray_cli(cluster.env, "job", "logs", job, "--address", cluster.dashboard).stdout
    assert f"raykd: 1 worker(s) from step {resumed} (was 2); grad_accum 2 keeps the global batch at 8 sequences" in logs, logs[-3000:]
    assert f"workers                  2 (steps 0-{resumed}), 1 (steps {resumed}-{steps})" in logs, logs[-3000:]
    # after the lost node Ray Train first asks for 2 workers again (it still counts the dead node) and gives up on
    # them after scale.worker_start_timeout_s, not its default 60 s (the test 121 -> 83 s)
    waits = re.findall(r"worker group startup timed out after ([\d.]+) seconds", logs)
    assert set(waits) <= {"20.0"}, waits
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 3
