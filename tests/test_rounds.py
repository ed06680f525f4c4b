"""`raykd distill --rounds N` (born-again distillation): round configs chain teacher -> student, every
round starts from the same saved student, and two real rounds of the smoke job run end to end."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raykd.config import load_config
from raykd.rounds import round_config

ROOT = Path(__file__).resolve().parents[1]


def test_round_configs_chain_the_teachers(tmp_path):
    cfg = load_config(ROOT / "jobs" / "smoke.yaml", [f"output_dir={tmp_path}", "teacher.cache=/some/cache", "loss.weights.attention=0",
                                                     "loss.weights.relation=0", "loss.weights.blockwise=0"])
    init = tmp_path / "init-student"
    first = round_config(cfg, 1, tmp_path, init)
    assert first.output_dir == str(tmp_path / "round1") and first.teacher == cfg.teacher and first.student == cfg.student
    third = round_config(cfg, 3, tmp_path, init)
    assert third.output_dir == str(tmp_path / "round3")
    assert third.teacher.model == str(tmp_path / "round2" / "student") and third.teacher.cache is None  # the cache is round 1's teacher's
    assert third.student.model == str(init) and third.layer_map.strategy == "uniform"
    assert third.loss == cfg.loss and third.train == cfg.train and third.data == cfg.data
    linear = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, dropped="linear"))
    assert round_config(linear, 2, tmp_path, init).student.dropped == "drop"  # init already holds round 1's stand-ins


def test_rounds_below_one_are_refused_before_anything_runs(tmp_path):
    run = subprocess.run([sys.executable, "-m", "raykd.cli", "distill", str(ROOT / "jobs" / "smoke.yaml"), f"output_dir={tmp_path / 'out'}",
                          "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "raykd: error: --rounds: must be >= 1, got 0; 1 is a plain distillation, N > 1 chains N rounds"]
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_two_rounds_distil_the_first_students_into_the_second(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ban"
    args = [sys.executable, "-m", "raykd.cli", "distill", str(ROOT / "jobs" / "smoke.yaml"), f"output_dir={out}", "--rounds", "2",
            "train.max_steps=4", "train.report_every=2", "train.generation_eval=false", "eval.tasks=[]", "scale.num_workers=1"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["teacher"] == str(out / "round1" / "student")
    assert all(r["val_perplexity"] > 0 and r["tokens_seen"] == 4 * 4 * 64 for r in rows)
    # round 2 learnt from round 1's student: its teacher perplexity is round 1's student's
    assert rows[1]["teacher_val_perplexity"] == pytest.approx(rows[0]["val_perplexity"], rel=1e-3)
    assert "| round | teacher | val_perplexity |" in run.stdout and (out / "rounds.md").read_text() in run.stdout
    init = AutoModelForCausalLM.from_pretrained(out / "init-student")
    second = AutoModelForCausalLM.from_pretrained(out / "round2" / "student")
    first = AutoModelForCausalLM.from_pretrained(out / "round1" / "student")
    assert init.config.num_hidden_layers == first.config.num_hidden_layers == second.config.num_hidden_layers == 3
    key = "model.layers.0.mlp.up_proj.weight"  # both rounds moved away from the same start, each its own way
    w0, w1, w2 = (m.state_dict()[key] for m in (init, first, second))
    assert not torch.equal(w0, w1) and not torch.equal(w0, w2) and not torch.equal(w1, w2)
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)  # finished rounds are not run again
    assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr[-2000:]
