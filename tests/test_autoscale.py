"""Autoscaling, exercised: a Ray head started with Ray's fake multi-node autoscaler
(`RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=jobs/cluster-local.yaml`), in
its own session, on free ports, with a private RAY_TMPDIR. It starts with no worker nodes and 0 CPUs,
so nothing a job asks for fits until the autoscaler adds `ray.worker.cpu` nodes (2 CPUs each), which are
raylets it starts on this machine, in the head's session and environment (one RAYKD_CACHE for all: the
fake provider has no per-node environment). Idle nodes go after `idle_timeout_minutes` (30 s).

The smoke job goes in with `ray job submit`: raykd's driver waits for the workers (and, by waiting,
asks the autoscaler for them), the autoscaler adds a node, the job succeeds on it, and the node is
removed once idle. Before it, a job without `scale.storage_path` is refused in one line before any node
is asked for (the head alone is one node, but the workers would run on nodes the autoscaler adds).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass

import pytest
import yaml
from _ray_procs import (
    ROOT,
    alive_nodes,
    diagnose,
    free_port,
    head_env,
    list_state,
    ray_head,
    seed_cache,
    start_node,
    stop_nodes,
    submit,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = ROOT / "jobs" / "cluster-local.yaml"
HEAD_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id (its workers count up from ...00001)
WAITING = "raykd: waiting for the cluster to place 2 worker(s) x (0.5 CPU); it has nothing (an autoscaler may be adding nodes"
FAST = ("train.max_steps=4", "train.report_every=2", "eval.tasks=[]", "train.generation_eval=false", "scale.placement_timeout_s=240")


@dataclass
class Fake:
    env: dict  # for `ray` commands: RAY_TMPDIR of this cluster, token auth
    dashboard: str  # http://127.0.0.1:PORT (jobs, State API)
    gcs: str  # 127.0.0.1:PORT


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from ray.util import get_node_ip_address

    base = tmp_path_factory.mktemp("autoscale")
    tmp_root = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    seed_cache(base / "cache")  # the built tiny teacher: no build and no write to this user's cache
    env = {**head_env(), "RAY_TMPDIR": tmp_root}
    # the head's environment is every node's: the autoscaler (a child of the head) starts their raylets
    head = {**env, "RAYKD_CACHE": str(base / "cache"), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    procs: dict = {}

    def start():
        port = free_port()
        config = yaml.safe_load(CONFIG.read_text())
        config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"  # where the provider's nodes find the head
        (base / "cluster-local.yaml").write_text(yaml.safe_dump(config))
        proc, dash = ray_head(head, base / "head.log", num_cpus=0, port=port, extra=(f"--autoscaling-config={base / 'cluster-local.yaml'}",))
        return proc, f"http://127.0.0.1:{dash}"

    try:
        start_node(start, env, 1, base / "head.log", procs, "head")
        yield Fake(env, f"http://127.0.0.1:{procs['head'].dashboard_port}", f"127.0.0.1:{procs['head'].gcs_port}")
    finally:
        # the autoscaled nodes are in the head's session and go with it; a SIGTERMed head drains for up to 30 s
        # before it stops, which a cluster about to go entirely has no use for
        stop_nodes(procs, grace=3)
        shutil.rmtree(tmp_root, ignore_errors=True)


def _only_the_head(c: Fake) -> list[dict]:
    nodes = alive_nodes(c.env, c.dashboard)
    assert [n["node_id"] for n in nodes] == [HEAD_ID], diagnose(c.env, c.dashboard, c.gcs)
    assert "CPU" not in nodes[0]["resources_total"]
    return nodes


def test_storage_path_is_required_before_any_node_is_asked_for(fake, tmp_path):
    """The head alone is one node that cannot hold the workers: without scale.storage_path the job fails in
    one line, and the cluster still has no worker node (the check comes before raykd asks for them)."""
    _only_the_head(fake)
    run = submit(fake.env, fake.dashboard, "distill", "jobs/smoke.yaml", f"output_dir={tmp_path / 'out'}", *FAST)
    lines = {ln for ln in run.stdout.splitlines() if ln.startswith("raykd: error:")}  # (Ray repeats the log's tail on failure)
    assert run.returncode != 0 and len(lines) == 1, (run.stdout + run.stderr)[-3000:]
    lines = sorted(lines)
    assert lines[0].startswith("raykd: error: scale.storage_path: the Ray cluster has 1 node, which cannot hold the workers "
                               "(they would run on nodes an autoscaler adds), and checkpoints would go to "), lines
    assert WAITING not in run.stdout
    assert not (tmp_path / "out").exists()
    _only_the_head(fake)
    assert len(list_state(fake.env, fake.dashboard, "nodes")) == 1  # no node was ever added, not even briefly


def test_a_job_scales_the_cluster_up_and_back_down(fake, tmp_path):
    """From no worker node: the smoke job's driver waits (saying so), the autoscaler adds a 2-CPU node, the
    job succeeds with every step and token, its Train workers ran on the added node(s), and once idle those
    nodes are removed (30 s idle timeout), leaving the head alone."""
    from transformers import AutoModelForCausalLM

    _only_the_head(fake)
    out, storage = tmp_path / "out", tmp_path / "storage"
    started = time.time()
    run = submit(fake.env, fake.dashboard, "distill", "jobs/smoke.yaml", f"output_dir={out}", f"scale.storage_path={storage}", *FAST)
    ran = time.time() - started
    assert run.returncode == 0 and "succeeded" in run.stdout.lower(), (run.stdout + run.stderr)[-4000:] + diagnose(fake.env, fake.dashboard, fake.gcs)
    assert WAITING in run.stdout, run.stdout[-3000:]
    # the driver prints the autoscaler's events: a node added, none removed while the job ran (the idle timeout
    # outlasts the idle stretch between raykd's reservation and Ray Train's placement group)
    assert "Adding 1 node(s) of type ray.worker.cpu" in run.stdout and "Removing" not in run.stdout, run.stdout[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 4 * 64 * 2
    AutoModelForCausalLM.from_pretrained(out / "student")

    added = {n["node_id"]: n for n in list_state(fake.env, fake.dashboard, "nodes") if n["node_id"] != HEAD_ID}
    assert 1 <= len(added) <= 2, added  # one 2-CPU node holds 2 x 0.5 CPU and the Data tasks; max_workers is 2
    assert all(n["resources_total"]["CPU"] == 2 for n in added.values()), added  # the ray.worker.cpu shape
    assert len(metrics["worker_nodes"]) == 2 and set(metrics["worker_nodes"]) <= set(added), (metrics["worker_nodes"], added)

    deadline = time.time() + 120  # idle timeout 30 s, an autoscaler round a second
    while len(alive_nodes(fake.env, fake.dashboard)) > 1 and time.time() < deadline:
        time.sleep(2)
    _only_the_head(fake)
    gone = {n["node_id"]: n["state"] for n in list_state(fake.env, fake.dashboard, "nodes") if n["node_id"] in added}
    assert set(gone.values()) == {"DEAD"}, gone
    print(f"job {ran:.0f} s; idle nodes gone {time.time() - started - ran:.0f} s after it")
