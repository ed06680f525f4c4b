"""End to end on local Ray: `raykd distill` of the smoke job with each strategy, resume after a
stopped driver, a killed worker, and joining a `ray start --head` (directly and by `ray job submit`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from _ray_procs import SMOKE, distill_cmd, head_env, ray_head

pytestmark = pytest.mark.ray

KEYS = {"val_perplexity", "teacher_val_perplexity", "init_val_perplexity", "top1_agreement", "student_params",
        "teacher_params", "tokens_seen", "tokens_per_s", "train_wall_s"}


def _cfg(tmp_path, *overrides):
    from raykd.config import load_config

    return load_config(SMOKE, [f"output_dir={tmp_path / 'out'}", *overrides])


def _check_output(out: Path, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["steps"] == steps
    assert metrics["val_perplexity"] < metrics["init_val_perplexity"]
    history = [h["loss"] for h in metrics["history"]]
    assert history[-1] < history[0], history  # falling loss
    student = AutoModelForCausalLM.from_pretrained(out / "student")  # no raykd needed to load it
    assert student.config.num_hidden_layers == 3
    assert sum(p.numel() for p in student.parameters()) > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written leftovers
    assert "init: list" in (out / "config.yaml").read_text()  # the resolved config
    tasks = metrics["tasks"]  # eval.tasks of jobs/smoke.yaml: the three built-ins, 32 examples each
    assert set(tasks) == {"sentiment", "cloze", "cer"}
    assert tasks["sentiment"]["student"]["n"] == 32 and 0 <= tasks["sentiment"]["teacher"]["auc"] <= 1
    assert tasks["cloze"]["student"]["n"] > 0 and tasks["cer"]["student"]["n"] == 4
    assert metrics["task_sentiment_auc"] == tasks["sentiment"]["student"]["auc"]  # flat keys for sweeps
    assert metrics["rougeL"] == tasks["cer"]["student"]["rougeL"]  # one greedy generation serves both
    return metrics


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed"])
def test_smoke_job_each_strategy(strategy, local_ray, tmp_path):
    from raykd.train import distill

    extra = ["scale.zero_stage=3"] if strategy == "deepspeed" else []
    cfg = _cfg(tmp_path, f"scale.strategy={strategy}", "train.max_steps=8", "train.report_every=2", "train.eval_every=4", *extra)
    metrics = distill(cfg)
    checks = [h["val_loss"] for h in metrics["history"] if "val_loss" in h]
    assert len(checks) == 2 and checks[1] < checks[0]  # held-out CE at steps 4 and 8, every worker taking part
    assert metrics["strategy"] == strategy and metrics["num_workers"] == 2
    assert metrics["tokens_seen"] == 8 * 4 * 64 * 2
    _check_output(tmp_path / "out", 8)


def test_ce_only_run_trains_without_teacher_terms(local_ray, tmp_path):
    """A cross-entropy baseline (every KD weight 0) takes the no-teacher branch of the loop."""
    from raykd.train import distill

    zero = [f"loss.weights.{k}=0" for k in ("kd", "hidden", "attention", "relation", "blockwise")]
    metrics = distill(_cfg(tmp_path, "train.max_steps=6", "train.report_every=2", "scale.num_workers=1", *zero))
    assert all(set(h) & {"kd", "hidden", "attention", "relation", "blockwise"} == set() for h in metrics["history"])
    assert all(h["ce"] > 0 for h in metrics["history"])
    assert metrics["num_workers"] == 1
    _check_output(tmp_path / "out", 6)


def test_a_diverging_run_stops_at_its_first_report_with_one_line(local_ray, tmp_path):
    """At lr 1e30 the loss is nan within two steps: the run stops at that report (raykd.errors.Diverged naming the
    step, the terms and train.lr), before any checkpoint of the diverged weights, and exports nothing."""
    from raykd.errors import Diverged
    from raykd.train import distill

    with pytest.raises(Diverged, match=r"^train: the run diverged by step [24] \(.*nan.*\); lower train.lr \(now [0-9.e+]+\)"):
        distill(_cfg(tmp_path, "train.lr=1e30", "train.max_steps=6", "train.report_every=2", "scale.num_workers=1"))
    assert not list((tmp_path / "out").rglob("checkpoint_*")) and not (tmp_path / "out" / "student").exists()
    assert (tmp_path / "out" / "train" / "diverged.txt").read_text().startswith("train: the run diverged by step")  # rank 0's note


def test_final_checkpoint_without_training_state(local_ray, tmp_path):
    """train.final_training_state=false (what sweep trials set): the last checkpoint holds the student and the
    run state but no Distiller/AdamW state; the finished run reruns as finished, and asking it for more steps
    is refused naming the field."""
    import ray.train

    from raykd.train import distill

    light = ["train.max_steps=4", "train.report_every=2", "scale.num_workers=1", "eval.final=light", "train.final_training_state=false"]
    metrics = distill(_cfg(tmp_path, *light))
    (ckpt,) = [d for d in (tmp_path / "out" / "train").glob("checkpoint_*") if d.is_dir()]
    names = {p.name for p in ckpt.iterdir()}
    assert {"student", "metrics.json", "worker0.pt"} <= names and not names & {"distiller.pt", "optimizer.pt"}, names
    assert metrics["steps"] == 4 and metrics["val_perplexity"] < metrics["init_val_perplexity"]
    again = distill(_cfg(tmp_path, *light))  # finished: nothing to train, the export is the same
    assert again["steps"] == 4 and again["val_perplexity"] == metrics["val_perplexity"]
    with pytest.raises(ray.train.TrainingFailedError, match=r"train.max_steps: .*train.final_training_state=false"):
        distill(_cfg(tmp_path, *light[1:], "train.max_steps=6"))

def test_frozen_embeddings_run_trains_every_other_weight(local_ray, tmp_path):
    """student.freeze_embeddings through Ray Train (two DDP workers): the exported student's embeddings (and tied
    head) are the teacher's, bit for bit, while its decoder layers moved and the student learned."""
    import torch
    from safetensors.torch import load_file

    from raykd import models
    from raykd.train import distill

    metrics = distill(_cfg(tmp_path, "student.freeze_embeddings=true", "train.max_steps=6", "train.report_every=2", "eval.final=light"))
    assert metrics["steps"] == 6 and metrics["val_perplexity"] < metrics["init_val_perplexity"]
    saved = load_file(tmp_path / "out" / "student" / "model.safetensors")
    teacher = models.load_model(models.resolve_model("tiny-random"), torch.float32).state_dict()
    assert torch.equal(saved["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


def _ray_workers(since: float):
    """Ray Train worker processes started after `since` (older ones belong to earlier runs)."""
    import psutil

    for p in psutil.process_iter(["cmdline", "create_time"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= since:
            yield p


# The resume tests: an interrupted run must continue exactly where it stopped -- same data position,
# same model, optimizer, schedule -- so its per-step training losses equal those of a run never
# interrupted, and every worker ends at the same place in its shard.
STEPS = 40


def _final_positions(out: Path) -> list[dict]:
    """Each worker's data position {epoch, batch_index} in the run's last checkpoint (one file per worker)."""
    import torch

    saved = {d: [torch.load(d / f"worker{r}.pt", weights_only=True)["state"] for r in range(2)]
             for d in (out / "train").glob("checkpoint_*") if (d / "worker1.pt").is_file()}
    last = max(saved, key=lambda d: saved[d][0]["step"])
    return [{"epoch": w["epoch"], "batch_index": w["batch_index"]} for w in saved[last]]


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory):
    """The smoke job for STEPS steps without a stop, a loss reported every step: the reference."""
    from raykd.train import distill

    tmp = tmp_path_factory.mktemp("uninterrupted")
    metrics = distill(_cfg(tmp, f"train.max_steps={STEPS}", "train.report_every=1"), log=lambda m: None)
    assert metrics["resumed_at"] == [] and [h["step"] for h in metrics["history"]] == list(range(1, STEPS + 1))
    return {"losses": [h["loss"] for h in metrics["history"]], "positions": _final_positions(tmp / "out")}


def _assert_continued(out: Path, metrics: dict, reference: dict) -> None:
    """The resumed run trained on the same blocks in the same order as the uninterrupted one."""
    assert [h["step"] for h in metrics["history"]] == list(range(1, STEPS + 1))  # each step once: none lost or repeated
    losses = [h["loss"] for h in metrics["history"]]
    assert losses == pytest.approx(reference["losses"], rel=1e-4, abs=1e-4), list(zip(losses, reference["losses"]))
    assert _final_positions(out) == reference["positions"]


def test_killed_worker_restarts_from_checkpoint(local_ray, uninterrupted, tmp_path):
    from raykd.train import distill

    cfg = _cfg(tmp_path, f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.report_every=1", "scale.max_failures=2")
    result = {}
    started = time.time() - 1
    run = threading.Thread(target=lambda: result.update(metrics=distill(cfg)))
    run.start()
    deadline = time.time() + 240
    snapshot = tmp_path / "out" / "train" / "checkpoint_manager_snapshot.json"  # written once Ray registered a checkpoint
    while not snapshot.exists() and time.time() < deadline:
        time.sleep(0.1)
    victims = list(_ray_workers(started))
    assert len(victims) == 2, victims  # this run's two workers
    victims[-1].kill()
    run.join(timeout=400)
    assert result, "the run did not finish after a worker was killed"
    assert result["metrics"]["steps"] == STEPS
    assert result["metrics"]["tokens_seen"] == STEPS * 4 * 64 * 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["resumed_at"]) == 1 and 2 <= metrics["resumed_at"][0] < STEPS  # restarted once, from a checkpoint
    _assert_continued(tmp_path / "out", metrics, uninterrupted)


def test_resume_after_stopped_driver(uninterrupted, tmp_path):
    """Ctrl-C the driver of `raykd distill` mid-run, run the same command again: it resumes. (The
    subprocess joins this module's Ray, which the reference run needed.)"""
    out = tmp_path / "out"
    cmd = distill_cmd(out, f"train.max_steps={STEPS}", "train.checkpoint_every=3", "train.report_every=1")
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "train" / "checkpoint_manager_snapshot.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C the driver mid-run
    first.communicate(timeout=120)
    assert not (out / "metrics.json").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "resuming from step" in log, log[-3000:]
    resumed = int(log.split("resuming from step ")[1].split()[0])
    assert 3 <= resumed < STEPS and resumed % 3 == 0
    metrics = _check_output(out, STEPS)
    assert metrics["resumed_at"] == [resumed]
    assert metrics["tokens_seen"] == STEPS * 4 * 64 * 2
    _assert_continued(out, metrics, uninterrupted)


def test_a_ray_head_running_here_is_joined(tmp_path):
    """One `ray start --head` (3 CPUs, its address file under a private RAY_TMPDIR): `raykd distill` with no
    RAY_ADDRESS finds the head and joins it instead of failing on num_cpus; a head too small for the run is
    refused in one line, before any training. (`ray job submit` to a head: test_autoscale, test_multinode.)"""
    env = head_env()
    tmp_root = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    env["RAY_TMPDIR"] = tmp_root
    head_log = tmp_path / "head.log"
    head, _ = ray_head(env, head_log, num_cpus=3)
    try:
        address_file = Path(tmp_root) / "ray" / "ray_current_cluster"
        deadline = time.time() + 120
        while time.time() < deadline and head.poll() is None and not address_file.exists():
            time.sleep(0.5)
        assert address_file.exists() and head.poll() is None, head_log.read_text()[-2000:]
        cmd = [sys.executable, "-m", "raykd.cli", "distill", SMOKE, f"output_dir={tmp_path / 'out'}", "train.max_steps=4",
               "train.report_every=2"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "joined the Ray instance already running on this machine" in run.stdout + run.stderr
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 4
        small = subprocess.run([*cmd[:5], f"output_dir={tmp_path / 'out2'}", "scale.num_workers=8"], env=env,
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
        lines = [ln for ln in small.stderr.splitlines() if "scale: the Ray instance already running here" in ln]
        assert small.returncode != 0 and lines and "has 3 CPUs and this run needs 5" in lines[0], small.stderr[-3000:]
        assert not (tmp_path / "out2" / "metrics.json").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(tmp_root, ignore_errors=True)
