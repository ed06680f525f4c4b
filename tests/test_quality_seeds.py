"""bench/quality.py across seeds: the summary's means and spreads, the paired lead's noise call, the
figures collect.py checks against the goals, and reusing a seed scored earlier."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _quality_seeds as S  # noqa: E402
import quality  # noqa: E402


def seed_results(seed: int, ppl: dict, auc: dict) -> dict:
    """A results.json as bench/quality.py writes it, for models init/ce/logit/feature/teacher."""
    models = list(ppl)
    tasks = {m: {"sentiment_acc": 0.5, "sentiment_auc": auc[m], "cloze_acc": 0.1 if m != "teacher" else 0.4, "cer": 0.7,
                 "sentiment_retained": (auc[m] - 0.5) / (auc["teacher"] - 0.5), "cloze_retained": 0.25 if m != "teacher" else 1.0,
                 "cer_retained": 0.3} for m in models}
    return {"seed": seed, "val_blocks": 128, "perplexity": ppl,
            "perplexity_out_of_domain": {"pydoc": {m: 10 * v for m, v in ppl.items()}, "emails": {m: 5 * v for m, v in ppl.items()}},
            "tasks": tasks, "runs": {m: {"wall_s": 100.0 + seed, "tokens_per_s": 300.0} for m in models if m not in ("init", "teacher")}}


def study(feature: list[float], logit: list[float]) -> dict:
    return {s: seed_results(s, {"init": 5000.0, "ce": 130.0 + s, "logit": lo, "feature": fe, "teacher": 30.0},
                            {"init": 0.55, "ce": 0.70, "logit": 0.72, "feature": 0.74 + 0.01 * s, "teacher": 0.95})
            for s, (fe, lo) in enumerate(zip(feature, logit))}


def test_means_spreads_and_figures():
    summary = S.summarize(study(feature=[108.0, 110.0, 112.0], logit=[109.0, 111.0, 113.0]))
    f = summary["models"]["feature"]["ppl"]
    assert (f["n"], f["mean"], f["sd"], f["min"], f["max"]) == (3, 110.0, 2.0, 108.0, 112.0)
    assert f["spread"] == pytest.approx(4 / 110)
    assert summary["arms"] == ["ce", "logit", "feature"]
    figs = S.figures(summary)
    assert figs["ppl_feature"] == 110.0 and figs["ppl_feature_sd"] == 2.0 and "ppl_teacher_sd" not in figs
    assert figs["feature_over_teacher"] == pytest.approx(110 / 30)
    assert figs["ood_over_teacher_feature"] == figs["emails_over_teacher_feature"] == pytest.approx(110 / 30)
    assert figs["feature_beats_both"] == 1 and figs["seeds"] == 3
    # task share: mean of the sentiment-AUC and cloze retained shares, averaged over seeds
    assert figs["task_share_feature"] == pytest.approx((0.25 / 0.45 + 0.25) / 2)
    assert figs["feature_sentiment_auc"] == pytest.approx(0.75) and figs["wall_s_feature"] == 101.0


def test_a_lead_under_the_seed_spread_is_within_noise():
    # feature ahead of logit by ~0.9% in every seed, but its own perplexity moves 3.6% between seeds
    small = S.summarize(study(feature=[108.0, 110.0, 112.0], logit=[109.0, 111.0, 113.0]))["leads"]["feature"]
    assert all(x > 0 for x in small["per_seed"]) and small["within_noise"]
    assert S.figures(S.summarize(study([108.0, 110.0, 112.0], [109.0, 111.0, 113.0])))["feature_lead_within_noise"] == 1
    # a 10% lead, consistent over seeds and larger than the spread, is not
    big = S.summarize(study(feature=[99.0, 100.0, 101.0], logit=[110.0, 111.0, 112.0]))["leads"]["feature"]
    assert not big["within_noise"] and big["mean"] == pytest.approx(1 - (99 / 110 + 100 / 111 + 101 / 112) / 3)
    # a lead that flips sign between seeds is within noise whatever the spread
    flip = S.summarize(study(feature=[100.0, 100.5, 99.5], logit=[105.0, 96.0, 100.0]))["leads"]["feature"]
    assert flip["within_noise"] and flip["ci95"] > abs(flip["mean"])
    table = S.markdown(S.summarize(study([108.0, 110.0, 112.0], [109.0, 111.0, 113.0])))
    assert "| feature | 110.0 ± 2.0 (108.0–112.0) |" in table and "within noise (no win)" in table


def test_one_seed_has_no_spread():
    summary = S.summarize(study(feature=[108.0], logit=[109.0]))
    figs = S.figures(summary)
    assert "ppl_feature_sd" not in figs and "feature_lead_within_noise" not in figs and figs["seeds"] == 1
    assert "one seed: no spread" in S.markdown(summary)


def args(**kw) -> argparse.Namespace:
    base = dict(data="sotu=1", lr=3e-4, seed=0, steps=4, batch=2, block=64, task_limit=8, val_blocks=8, ood_blocks=4,
                arms=["ce", "logit"], kd=1.0, hidden=0.5, attention=0.1, fresh=False)
    return argparse.Namespace(**{**base, **kw})


def test_a_seed_scored_with_the_same_settings_is_reused(tmp_path):
    a = args()
    res = {"data": "sotu=1", "lr": 3e-4, "seed": 0, "tokens_per_arm": 512, "block_size": 64, "task_limit": 8, "val_blocks": 8,
           "ood_blocks": {"pydoc": 4, "emails": 4}, "weights": {arm: quality.arm_weights(arm, a) for arm in a.arms}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    assert quality.scored_earlier(path, a, runs_kept=True) == res
    assert quality.scored_earlier(path, a, runs_kept=False) is None  # an arm trained again: score again
    assert quality.scored_earlier(path, args(fresh=True), runs_kept=True) is None
    for change in ({"task_limit": 16}, {"ood_blocks": 8}, {"arms": ["ce", "logit", "feature"]}, {"kd": 0.5},
                   {"seed": 1}, {"data": "sotu=0.75,moby-dick=0.25"}):
        assert quality.scored_earlier(path, args(**change), runs_kept=True) is None, change


@pytest.mark.parametrize("argv, message", [(["--seeds", "0,x"], r"^--seeds: expected integers"), (["--seeds", ","], r"^--seeds: give at least one"),
                                           (["--arms", "ce,kd"], r"^--arms: unknown arm"), (["--data", "sotu"], r"^--data: expected SOURCE=WEIGHT"),
                                           (["--data", "teacher-text=1"], r"^--data: the first source gives the held-out validation")])
def test_bad_flags_are_one_line(monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
    with pytest.raises(SystemExit, match=message):
        quality.parse_args()


def test_teacher_text_source_is_the_directory_the_study_writes():
    assert quality.data_sources("sotu=0.75,teacher-text=0.25", "/r/teacher-text") == {
        "train": None, "mix": {"sotu": 0.75, "/r/teacher-text": 0.25}}
    assert quality.data_sources("sotu=1") == {"train": ["sotu"]}


def test_an_arm_recorded_before_a_config_field_existed_is_kept(tmp_path):
    """A run recorded before raykd grew a field (here generate.prompts) ran with that field's default: it is kept;
    a setting that differs (the LR) trains the arm again."""
    from raykd.config import from_dict

    a = args(precision="fp32", data="sotu=1")
    cfg = from_dict(quality.base_config(a, tmp_path)).to_dict()
    old = json.loads(json.dumps(cfg))
    del old["generate"]["prompts"]
    quality.record(tmp_path / "arm.json", old, {"wall_s": 1.0})
    assert quality.finished(tmp_path / "arm.json", cfg, fresh=False) == {"wall_s": 1.0}
    assert quality.finished(tmp_path / "arm.json", cfg, fresh=True) is None
    cfg["train"]["lr"] = 1e-3
    assert quality.finished(tmp_path / "arm.json", cfg, fresh=False) is None


TRIALS_HEADER = ("trial_id,status,layer_map.strategy,loss.hidden,loss.kd,loss.temperature,loss.weights.attention,loss.weights.ce,"
                 "loss.weights.hidden,student.init,student.num_layers,train.lr,val_perplexity,steps,max_steps,last_val_perplexity")


def test_the_recipe_arm_is_the_sweeps_best_full_trial_at_the_studys_depth(tmp_path, monkeypatch):
    """--recipe: among a report's trials at 10 layers that ran all their steps, the lowest val perplexity gives the
    recipe arm's cut, map, loss mix and LR; a stopped trial (lower last perplexity) and a better 12-layer trial are
    passed over; the changed cut and map are left for raykd distill to resolve; raykd's config accepts the result."""
    from raykd.config import from_dict

    rows = ["t0,TERMINATED,kept,cosine,forward_kl,1.0,0.1,1.0,0.5,importance,10,0.0003,300.0,32,32,",
            "t1,TERMINATED,bridge,mse,reverse_kl,2.0,0.0,0.0,0.25,ends,10,0.0009,250.0,32,32,",
            "t2,TERMINATED,kept,cosine,jsd,1.0,0.0,1.0,0.0,uniform,10,0.0005,,8,32,200.0",
            "t3,TERMINATED,kept,cosine,jsd,1.0,0.0,1.0,0.0,uniform,12,0.0005,150.0,32,32,"]
    csv_path = tmp_path / "trials.csv"
    csv_path.write_text("\n".join([TRIALS_HEADER, *rows]) + "\n")
    monkeypatch.setattr(sys, "argv", ["quality.py", "--arms", "feature,recipe", "--recipe", str(csv_path), "--out", str(tmp_path)])
    a = quality.parse_args()
    assert a.recipe_trial == "t1"
    a.seed = 0
    base = from_dict(quality.base_config(a, tmp_path)).to_dict()
    base["student"]["layers"] = [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]
    base["layer_map"]["pairs"] = [[i, i] for i in range(10)]
    cfg = quality.arm_config("recipe", base, a, tmp_path, tmp_path / "gen")
    assert cfg["student"]["init"] == "ends" and cfg["student"]["layers"] is None and cfg["layer_map"]["pairs"] is None
    assert (cfg["layer_map"]["strategy"], cfg["loss"]["hidden"], cfg["loss"]["kd"], cfg["loss"]["temperature"]) == ("bridge", "mse", "reverse_kl", 2.0)
    assert cfg["loss"]["weights"] == {**quality.arm_weights("feature", a), "ce": 0.0, "hidden": 0.25, "attention": 0.0}
    assert cfg["train"]["lr"] == 0.0009 and cfg["data"] == base["data"] and cfg["train"]["max_steps"] == base["train"]["max_steps"]
    from_dict(cfg)
    feature = quality.arm_config("feature", base, a, tmp_path, tmp_path / "gen")
    assert feature["student"]["layers"] == base["student"]["layers"] and feature["loss"]["hidden"] == "cosine"

    csv_path.write_text("\n".join([TRIALS_HEADER, rows[2], rows[3]]) + "\n")
    with pytest.raises(SystemExit, match=r"^--recipe: .* has no trial at 10 student layers that ran to its last step"):
        quality.parse_args()
