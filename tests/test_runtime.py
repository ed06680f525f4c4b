"""raykd.runtime without starting Ray: placement waits are visible and end in one line."""

import pytest

from raykd import runtime
from raykd.config import ConfigError, load_config


@pytest.fixture
def cluster(monkeypatch):
    import ray

    have = {"CPU": 2.0, "memory": 1e9}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(have))
    return have


def test_gpu_run_on_a_local_instance_without_gpus_fails_at_once(cluster):
    cfg = load_config("jobs/smoke.yaml", ["scale.use_gpu=true", "scale.num_workers=2"])
    with pytest.raises(ConfigError, match=r"^scale\.use_gpu: this machine's Ray instance has CPU 2 and cannot place 2 worker\(s\)") as e:
        runtime.wait_for_workers(cfg, "local", log=lambda m: None)
    assert "\n" not in str(e.value)


def test_a_cluster_that_never_grows_is_reported_then_given_up(cluster):
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=4", "scale.cpus_per_worker=1.0", "scale.placement_timeout_s=0.3"])
    said = []
    with pytest.raises(ConfigError, match=r"^scale\.num_workers: the cluster still has CPU 2 after 0\.3 s"):
        runtime.wait_for_workers(cfg, "cluster", log=said.append, poll_s=0.1)
    assert said and said[0].startswith("raykd: waiting for the cluster to place 4 worker(s) x (1 CPU); it has CPU 2")


def test_a_cluster_that_grows_is_waited_for(cluster):
    cfg = load_config("jobs/smoke.yaml", ["scale.num_workers=3", "scale.cpus_per_worker=1.0", "scale.placement_timeout_s=30"])
    said = []

    def grow(msg):  # the autoscaler adds a node while raykd waits
        said.append(msg)
        cluster["CPU"] = 4.0

    runtime.wait_for_workers(cfg, "cluster", log=grow, poll_s=0.05)
    assert len(said) == 1


def test_a_worker_range_waits_for_its_minimum_and_keeps_the_global_batch(cluster):
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
