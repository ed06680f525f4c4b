"""cluster.yaml and jobs/*.yaml: checked offline, with Ray's own autoscaler validation.

`ray up` runs `prepare_config` (merge the provider's defaults.yaml, merge setup commands, fill
per-type min/max workers) and then `validate_config` (the JSON schema in
ray/autoscaler/ray-schema.json, which forbids unknown keys, plus the head-type and min-worker
checks). The same two functions run here; the provider's resource auto-detection (an AWS
call) is skipped, so every node type must state its `resources` itself.
"""

from __future__ import annotations

import copy
import glob
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raykd.cli import main
from raykd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
CLUSTER_LOCAL = ROOT / "jobs" / "cluster-local.yaml"  # an autoscaler config for this machine, not a job
JOBS = sorted(p for p in glob.glob(str(ROOT / "jobs" / "*.yaml")) if Path(p) != CLUSTER_LOCAL)
GPU_LARGE = ROOT / "jobs" / "gpu-large.yaml"
TEACHER_ID = "HuggingFaceTB/SmolLM2-1.7B-Instruct"

# config.json of HuggingFaceTB/SmolLM2-1.7B-Instruct as published on the hub (shape fields are
# what `raykd plan` reads; it builds meta-device models, so no weights or tokenizer are needed).
SMOLLM2_1_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "num_key_value_heads": 32,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 130000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 49152,
}


def ray_validate(config: dict) -> dict:
    """What `ray up` does to the YAML before touching the cloud; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    with open(CLUSTER) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    return ray_validate(cluster)


# --- cluster.yaml ------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation(cluster, prepared):
    assert cluster["cluster_name"] == "raykd"
    assert cluster["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_has_a_cpu_head_and_a_gpu_worker_type(cluster, prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    assert head["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type offers GPUs"
    for name, t in gpu_types.items():
        assert name != prepared["head_node_type"]
        assert t["resources"]["CPU"] > 0
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))


def test_worker_counts_are_consistent(cluster, prepared):
    total = prepared["max_workers"]
    assert total >= 1
    for name, t in prepared["available_node_types"].items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= total, name
    # every type states its bounds in the file itself (no silent default of the global max)
    for name, t in cluster["available_node_types"].items():
        assert "min_workers" in t and "max_workers" in t, name
    assert sum(t["min_workers"] for t in prepared["available_node_types"].values()) <= total
    assert cluster["idle_timeout_minutes"] > 0


def test_setup_installs_pinned_torch_then_raykd(cluster, prepared):
    assert cluster["file_mounts"] == {"~/raykd": "."}
    for key in ("head_setup_commands", "worker_setup_commands"):  # after prepare_config: common + per-role
        cmds = prepared[key]
        torch_i = next(i for i, c in enumerate(cmds) if "torch==2.13.0" in c)
        raykd_i = next(i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/raykd" in c)
        assert torch_i < raykd_i, f"{key}: torch must be pinned before raykd pulls its dependencies"
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cluster["worker_start_ray_commands"])
    # the images carry the same Ray as the client (the version in pyproject.toml)
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = pyproject.split("ray[default,train,tune,data]==", 1)[1].split('"', 1)[0]
    docker = cluster["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert image.startswith(f"rayproject/ray:{version}-"), image


def test_gpu_large_job_fits_the_clusters_gpu_nodes(prepared):
    """A job asks for workers; cluster.yaml's GPU worker type must hold a worker range's minimum on one
    node and its maximum on the nodes it may launch (the 8-GPU, 2-node case)."""
    cfg = load_config(GPU_LARGE)
    assert cfg.scale.use_gpu
    lo, hi = cfg.scale.worker_range

    def holds(t: dict, n: int) -> bool:  # workers of one GPU and cpus_per_worker CPUs each
        return n <= min(t["resources"].get("GPU", 0), t["resources"]["CPU"] // cfg.scale.cpus_per_worker)

    gpu_types = [t for t in prepared["available_node_types"].values() if t["max_workers"] > 0 and t["resources"].get("GPU", 0)]
    assert any(holds(t, lo) for t in gpu_types), "no GPU worker type holds the minimum of scale.num_workers of jobs/gpu-large.yaml"
    per_node = max(min(t["resources"]["GPU"], t["resources"]["CPU"] // cfg.scale.cpus_per_worker) * t["max_workers"] for t in gpu_types)
    assert per_node >= hi, f"cluster.yaml's GPU nodes hold {per_node} workers, jobs/gpu-large.yaml asks for up to {hi}"


def _gpu_worker(config: dict) -> dict:
    types = config["available_node_types"]
    return next(t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0)


def _drop_resources(config: dict) -> None:
    del _gpu_worker(config)["resources"]


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda c: c.update(idle_timeout_minute=5), jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
        (lambda c: _gpu_worker(c).update(max_worker=2), jsonschema.ValidationError, "'max_worker' was unexpected"),
        (_drop_resources, jsonschema.ValidationError, "'resources' is a required property"),
        (lambda c: _gpu_worker(c)["resources"].update(GPU="4"), jsonschema.ValidationError, "'4' is not of type 'integer'"),
        (lambda c: _gpu_worker(c)["resources"].update(GPU=0.5), jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (lambda c: c["docker"].update(imag="rayproject/ray"), jsonschema.ValidationError, "'imag' was unexpected"),
        (lambda c: c.update(head_node_type="ray.head.gpu"), ValueError, "head_node_type"),
        (lambda c: _gpu_worker(c).update(min_workers=c["max_workers"] + 1), ValueError, "min_workers"),
    ],
    ids=["top-level-typo", "node-type-typo", "missing-resources", "string-gpu-count", "fractional-gpu", "docker-typo", "unknown-head-type", "min-above-global-max"],
)
def test_ray_validation_rejects_a_broken_copy(cluster, edit, error, match):
    """The check above can fail: a misspelled or invalid field is caught by Ray's validation."""
    broken = copy.deepcopy(cluster)
    edit(broken)
    with pytest.raises(error, match=match):
        ray_validate(broken)


# --- jobs/cluster-local.yaml (Ray's fake multi-node autoscaler; run by tests/test_autoscale.py) ------


def test_cluster_local_is_complete_as_written(prepared):
    """Ray 2.60's autoscaler reads an autoscaling config of `ray start --head` as it is, no defaults merged
    (and `prepare_config` cannot run on it: the wheel lacks the fake provider's defaults file), so the file
    must pass Ray's validation and carry every field `ray up` would have filled in."""
    with open(CLUSTER_LOCAL) as fh:
        local = yaml.safe_load(fh)
    validate_config(copy.deepcopy(local))
    assert set(local) == set(prepared)
    assert local["provider"]["type"] == "fake_multinode" and local["provider"]["use_node_id_as_ip"]
    types = local["available_node_types"]
    assert local["head_node_type"] == "ray.head.default"  # the fake provider's own name for its head
    assert types["ray.head.default"]["resources"] == {"CPU": 0} and types["ray.head.default"]["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != local["head_node_type"]}
    assert set(workers) == {"ray.worker.cpu"}
    for t in workers.values():
        assert t["min_workers"] == 0 and "GPU" not in t["resources"]  # from zero, and no GPUs on this machine
    assert sum(t["resources"]["CPU"] * t["max_workers"] for t in workers.values()) <= 4  # 2 cores, 2 x oversubscribed at most
    assert 0 < local["idle_timeout_minutes"] < 1
    smoke = load_config(ROOT / "jobs" / "smoke.yaml")
    node_cpus = workers["ray.worker.cpu"]["resources"]["CPU"]
    assert smoke.scale.num_workers * smoke.scale.cpus_per_worker + smoke.data.task_cpus <= node_cpus  # one node runs the smoke job


# --- jobs/*.yaml -------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOBS, ids=[os.path.basename(p) for p in JOBS])
def test_every_job_loads_without_unknown_keys(path):
    cfg = load_config(path)
    assert cfg.output_dir.startswith("runs/")
    assert (ROOT / "jobs" / "README.md").read_text().count(os.path.basename(path)) >= 1, "jobs/README.md should document every job"


@pytest.fixture(scope="module")
def smollm2_1_7b_dir(tmp_path_factory) -> Path:
    """A local directory holding only the real model's config.json (no weights, no tokenizer)."""
    path = tmp_path_factory.mktemp("SmolLM2-1.7B-Instruct")
    (path / "config.json").write_text(json.dumps(SMOLLM2_1_7B_CONFIG, indent=2))
    return path


def test_gpu_large_plans_with_a_local_config(capsys, smollm2_1_7b_dir):
    cfg = load_config(GPU_LARGE)
    assert cfg.teacher.model == TEACHER_ID
    assert cfg.scale.worker_range == (4, 8) and cfg.scale.strategy == "fsdp2" and cfg.scale.shard_teacher and cfg.scale.max_failures >= 1
    assert cfg.train.precision == "bf16" and cfg.output_dir == "runs/gpu-large"

    assert main(["plan", str(GPU_LARGE), f"teacher.model={smollm2_1_7b_dir}"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM: 24 layers, hidden 2048, 32 heads / 32 kv heads, vocab 49152" in out
    assert "student    cut from the teacher (init=ends): 12 layers, hidden 2048" in out
    assert "kept teacher layers [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23]" in out
    assert "scale      4-8 workers (elastic; global batch 32 sequences at any size), fsdp2, gpu; output runs/gpu-large" in out

    assert main(["plan", str(GPU_LARGE), f"teacher.model={smollm2_1_7b_dir}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 1.65e9 < plan["teacher"]["params"] < 1.75e9  # SmolLM2-1.7B: 1.71 B with tied embeddings
    assert 0.85e9 < plan["student"]["params"] < 0.95e9  # 12 of 24 layers + the 0.1 B embedding
    assert plan["pairs"][-1] == [23, 11]
    assert plan["flops_per_token"]["total"] > 9e9


def _hub_id_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def test_gpu_large_offline_hub_id_says_pass_a_local_dir(capsys, monkeypatch):
    if _hub_id_cached(TEACHER_ID):
        pytest.skip(f"{TEACHER_ID} is in the local HF cache: the plan resolves it offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(GPU_LARGE)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"raykd: error: teacher.model: hub id '{TEACHER_ID}'")
    assert "pass a local model directory" in lines[0]
    assert captured.out == ""
