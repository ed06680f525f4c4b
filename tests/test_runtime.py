"""raykd.runtime without starting Ray: placement waits are visible, ask the cluster for the workers, and end
in one line."""

import time

import pytest

from raykd import runtime
from raykd.config import ConfigError, load_config


@pytest.fixture
def cluster(monkeypatch):
    """A fake cluster's resources (CPU and GPU are what raykd reads)."""
    import ray

    have = {"CPU": 2.0, "memory": 1e9}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(have))
    return have


@pytest.fixture
def asked(cluster, monkeypatch):
    """A fake reservation of the workers' bundles, placed once the cluster has the CPUs they ask for; records
    what was asked for and how often it was released (`on_ask`: what the cluster does when asked)."""
    record = {"bundles": [], "released": 0, "on_ask": None}

    def reserve(bundles):
        record["bundles"].append(bundles)
        if record["on_ask"]:
            record["on_ask"]()

        def wait(timeout_s):
            placed = cluster.get("CPU", 0.0) >= sum(b["CPU"] for b in bundles)
            if not placed:
                time.sleep(timeout_s)
            return placed

        def release():
            record["released"] += 1

        return wait, release

    monkeypatch.setattr(runtime, "_reserve", reserve)
    return record


def test_gpu_run_on_a_local_instance_without_gpus_fails_at_once(cluster, asked):
    cfg = load_config("jobs/smoke.yaml", ["scale.use_gpu=true", "scale.num_workers=2"])
    with pytest.raises(ConfigError, match=r"^scale\.use_gpu: this machine's Ray instance has CPU 2 and cannot place 2 worker\(s\)") as e:
        runtime.wait_for_workers(cfg, "local", log=lambda m: None)
    assert "\n" not in str(e.value)
    assert asked["bundles"] == []  # a local instance cannot grow: nothing to ask for


def test_a_cluster_that_never_grows_is_reported_then_given_up(cluster, asked):
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=4", "scale.cpus_per_worker=1.0", "scale.placement_timeout_s=0.3"])
    said = []
    with pytest.raises(ConfigError, match=r"^scale\.num_workers: the cluster still has CPU 2 after 0\.3 s"):
        runtime.wait_for_workers(cfg, "cluster", log=said.append, poll_s=0.1)
    assert said and said[0].startswith("raykd: waiting for the cluster to place 4 worker(s) x (1 CPU); it has CPU 2")
    assert asked["bundles"] == [[{"CPU": 1.0}] * 4] and asked["released"] == 1  # asked once, released on giving up


def test_a_cluster_that_grows_is_waited_for(cluster, asked):
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=3", "scale.cpus_per_worker=1.0", "scale.placement_timeout_s=30"])
    said = []

    def grow(msg):  # the autoscaler adds a node while raykd waits
        said.append(msg)
        cluster["CPU"] = 4.0

    runtime.wait_for_workers(cfg, "cluster", log=grow, poll_s=0.05)
    assert len(said) == 1
    assert asked["bundles"] == [[{"CPU": 1.0}] * 3] and asked["released"] == 1


def test_a_cluster_that_grows_only_when_asked_is_asked(cluster, asked):
    """An autoscaler adds nodes for demand, not for a driver that polls the cluster's size: a cluster scaled to
    zero grows only because raykd reserves the workers' bundles (one per worker, GPU included), and the
    reservation is released once they fit, for Ray Train to place its own."""
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=2", "scale.use_gpu=true", "scale.placement_timeout_s=30"])
    del cluster["CPU"]
    said = []

    def autoscaler():  # a node with what was asked for appears (only) once it is asked for
        cluster.update(CPU=1.0, GPU=2.0)

    asked["on_ask"] = autoscaler
    runtime.wait_for_workers(cfg, "cluster", log=said.append, poll_s=0.05)
    assert len(said) == 1 and "it has nothing" in said[0]
    assert asked["bundles"] == [[{"CPU": 0.5, "GPU": 1.0}] * 2] and asked["released"] == 1


def test_a_cluster_that_fits_is_not_asked(cluster, asked):
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=2"])
    said = []
    runtime.wait_for_workers(cfg, "cluster", log=said.append)
    assert said == [] and asked["bundles"] == []


@pytest.mark.parametrize("nodes, cpus, fails", [(3, 4.0, True), (1, 0.0, True), (1, 2.0, False)], ids=["several-nodes", "one-node-too-small", "one-node-that-holds-them"])
def test_storage_path_is_required_where_the_workers_run_off_the_drivers_node(cluster, monkeypatch, nodes, cpus, fails):
    """A head that cannot hold the workers (0 CPUs, an autoscaler adding worker nodes) is one node now and
    several once they run: checkpoints under OUTPUT/ on its disk would be out of their reach, as with 3 nodes."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * nodes + [{"Alive": False}])
    cluster["CPU"] = cpus
    cfg = load_config("jobs/smoke.yaml", ["output_dir=/tmp/out"])
    if not fails:
        runtime.require_shared_storage(cfg, "cluster")
        return
    with pytest.raises(ConfigError, match=r"^scale\.storage_path: the Ray cluster has ") as e:
        runtime.require_shared_storage(cfg, "cluster")
    assert "\n" not in str(e.value) and str(e.value).endswith("(s3://bucket/prefix or a shared file system path)")
    assert ("has 3 nodes and checkpoints" in str(e.value)) == (nodes == 3)
    assert ("has 1 node, which cannot hold the workers (they would run on nodes an autoscaler adds), and checkpoints" in str(e.value)) == (nodes == 1)
    runtime.require_shared_storage(load_config("jobs/smoke.yaml", ["scale.storage_path=/shared"]), "cluster")
    runtime.require_shared_storage(cfg, "local")  # a local instance raykd started is one node


def test_a_worker_range_waits_for_its_minimum_and_keeps_the_global_batch(cluster, asked):
    """`scale.num_workers: [min, max]`: the placement wait asks for min workers; a group of w workers
    accumulates grad_accum x max / w micro-batches (rounded up), so a step sees the same global batch."""
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=[2,6]", "scale.max_failures=1", "scale.cpus_per_worker=1.0",
                                          "train.grad_accum=2", "scale.placement_timeout_s=0.2"])
    assert cfg.scale.elastic and cfg.scale.worker_range == (2, 6)
    runtime.wait_for_workers(cfg, "cluster", log=lambda m: None)  # 2 CPUs hold the minimum of 2 workers
    accum = {w: runtime.for_world(cfg, w).train.grad_accum for w in range(1, 7)}
    assert accum == {1: 12, 2: 6, 3: 4, 4: 3, 5: 3, 6: 2}  # 5 does not divide 12: 15 micro-batches, the least >= 12
    assert runtime.for_world(cfg, 6) is cfg and cfg.train.grad_accum == 2
    fixed = load_config("jobs/smoke.yaml", ["scale.num_workers=2"])
    assert not fixed.scale.elastic and fixed.scale.worker_range == (2, 2) and runtime.for_world(fixed, 2) is fixed


class _Dies:
    """A trainer whose worker died before the controller read its error (what Ray Train reports under load)."""

    def fit(self):
        from ray.exceptions import ActorDiedError
        from ray.train import WorkerGroupError

        raise WorkerGroupError("A worker health check failed.", {0: ActorDiedError()})


def test_a_divergence_whose_worker_died_is_still_one_line(tmp_path):
    """Rank 0's note (raykd.runtime.note_diverged) turns a lost Diverged back into the one line; without a note the
    worker's death stays Ray's error, and a note left by an earlier run is removed before the run starts."""
    from ray.train import WorkerGroupError

    from raykd.errors import Diverged

    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}"])
    line = "train: the run diverged by step 2 (grad_norm nan); lower train.lr (now 1e+30)"

    class DiesAfterNote(_Dies):
        def fit(self):
            runtime.note_diverged(cfg, line)
            super().fit()

    with pytest.raises(Diverged) as e:
        runtime.fit_or_why(DiesAfterNote(), cfg)
    assert str(e.value) == line and (tmp_path / "out" / "train" / runtime.DIVERGED_NOTE).read_text() == line
    with pytest.raises(WorkerGroupError):  # the earlier run's note is not this run's reason
        runtime.fit_or_why(_Dies(), cfg)
    assert not (tmp_path / "out" / "train" / runtime.DIVERGED_NOTE).exists()
