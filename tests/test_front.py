"""A sweep's light trials and the full scoring of its front (raykd.sweep.front), without Ray: which trials are
chosen, where their exported students are found, what a light evaluation holds, and the config checks."""

import json

import pytest
import torch

from raykd.config import ConfigError, from_dict, load_config
from raykd.evaluate import evaluate_pair, evaluate_student
from raykd.sweep import front, trial_config
from raykd.sweep_config import SweepConfig


def _trial(tid, ppl, params, latency, status="TERMINATED"):
    return {"trial_id": tid, "status": status, "metrics": {"val_perplexity": ppl, "student_params": params, "student_latency_ms": latency}}


def test_chosen_is_both_fronts_and_the_best_of_each_size():
    trials = [
        _trial("a", 10.0, 100, 5.0),  # smallest: on the params front
        _trial("b", 12.0, 100, 4.0),  # same size, worse, the fastest by timing: its size counts at the median, not chosen
        _trial("c", 11.0, 100, 6.0),  # dominated on both: not chosen
        _trial("d", 8.0, 200, 9.0),  # best overall: on both fronts
        _trial("e", 8.5, 300, 12.0),  # bigger and worse than d on both: only as the best of its size
        _trial("f", 5.0, 300, 1.0, status="EARLY_STOPPED"),  # never finished: never scored
        _trial("g", None, 50, 1.0),  # finished without a perplexity (an error path): never scored
    ]
    assert front.chosen(trials) == [0, 3, 4]


def test_last_export_is_the_newest_checkpoint_holding_a_student(tmp_path):
    run = tmp_path / "storage" / "train"
    for name, done in (("checkpoint_2026-12-02_00-00-01", True), ("checkpoint_2026-12-02_00-00-09", True),
                       ("checkpoint_2026-12-02_00-00-20", False)):  # the newest holds no export (a mid-run checkpoint)
        (run / name).mkdir(parents=True)
        if done:
            (run / name / "metrics.json").write_text("{}")
    fs, path = front.last_export(str(tmp_path / "storage"), "train")
    assert path.endswith("checkpoint_2026-12-02_00-00-09")
    assert front.last_export(str(tmp_path / "storage"), "other") is None


def test_merge_marks_full_scores_and_keeps_only_report_metrics():
    trials = [_trial("a", 10.0, 100, 5.0), _trial("b", 12.0, 100, 4.0)]
    front.merge(trials, {"a": {"val_perplexity": 9.9, "top1_agreement": 0.4, "task_sentiment_auc": 0.7, "teacher_params": 5}})
    assert trials[0]["scored"] == "full" and "scored" not in trials[1]
    assert trials[0]["metrics"]["top1_agreement"] == 0.4 and trials[0]["metrics"]["task_sentiment_auc"] == 0.7
    assert trials[0]["metrics"]["val_perplexity"] == 10.0  # every trial keeps its own light measurement
    assert "teacher_params" not in trials[0]["metrics"]


def test_light_evaluation_is_the_student_half_of_the_full_one(tiny_teacher):
    from raykd.models import cut_student

    student = cut_student(tiny_teacher, [0, 1])
    blocks = torch.randint(0, tiny_teacher.config.vocab_size, (4, 16))
    light = evaluate_student(student, blocks, batch_size=2)
    full = evaluate_pair(student, tiny_teacher, None, blocks, batch_size=2, generation=False)
    assert set(light) == {"val_perplexity", "student_tokens_per_s", "student_params", "val_tokens"}
    assert light["val_perplexity"] == pytest.approx(full["val_perplexity"], rel=1e-6)
    assert light["student_params"] == full["student_params"] and light["val_tokens"] == 64


def test_sweep_trials_are_light_unless_a_task_objective_or_evaluate_all():
    base = load_config("jobs/sweep-smoke.yaml").to_dict()
    sw = SweepConfig(**base["sweep"])
    assert sw.evaluate == "front" and trial_config(base, {}, sw, "t").eval.final == "light"
    assert trial_config(base, {}, SweepConfig(**{**base["sweep"], "evaluate": "all"}), "t").eval.final == "full"
    tasks = SweepConfig(**{**base["sweep"], "search": "optuna", "objectives": ["val_loss", "task:sentiment_auc"]})
    assert not tasks.light_trials and trial_config(base, {}, tasks, "t").eval.final == "full"
    assert from_dict(base).eval.final == "full"  # `raykd distill` keeps the full evaluation


@pytest.mark.parametrize("override, message", [
    ({"eval": {"final": "quick"}}, "eval.final"),
    ({"sweep": {"evaluate": "best"}}, "sweep.evaluate"),
])
def test_bad_values_name_their_field(override, message):
    base = load_config("jobs/sweep-smoke.yaml").to_dict()
    for key, value in override.items():
        base[key] = {**(base[key] or {}), **value}
    with pytest.raises(ConfigError) as e:
        from_dict(json.loads(json.dumps(base)))
    assert str(e.value).startswith(message + ":"), str(e.value)
