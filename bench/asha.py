"""ASHA vs FIFO on the same raykd sweep: trial-steps saved and whether the best trial is the same.

The sweep is jobs/sweep-smoke.yaml (the seeded tiny random teacher, the stdlib pydoc corpus,
random trials over student depth, hidden-state weight, logit loss and LR), shaped like a real
sweep by the defaults below: 24 trials (about 8 per student depth: one ASHA bracket per depth
needs several trials to stop any) of 72 steps, `val_loss` every 4 steps, reduction factor 3,
grace period 8 steps (two evaluations): rungs at 8 and 24 steps and the end at 72 = grace x rf^2,
ASHA's usual geometric shape (with 32 steps the rung at 24 saved 8 steps a trial at most); loaded
with `raykd.config.load_config` and run with `raykd.sweep.sweep(cfg)` twice, each in its own child
process with its own local Ray:

* `sweep.scheduler=asha` (one bracket per depth, verdicts by trial order: raykd's defaults): poor
  trials stop early;
* `sweep.scheduler=fifo`: every trial runs all its steps.

Same seed: raykd seeds Tune's search from the config's `seed` (`raykd.sweep.searcher`), so
both runs sample the same trials in the same order; the sampled trial configurations are
compared (`same_trials`).
Figures: trial_steps_saved = 1 - ASHA's total trial-steps / FIFO's (goal >= 0.5);
same_best = 1 when both pick the same configuration as best by final val_perplexity
among the trials that ran to the end (else 0); wall_time_saved = 1 - ASHA's sweep wall / FIFO's
(goal >= 0.4: the whole `sweep()` call, Ray's start, the shared data and the front's full scoring
included) and fit_time_saved, the same for Tune's fit alone (the trials).

    .venv/bin/python bench/asha.py [--config jobs/sweep-smoke.yaml] [--samples N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def child(a) -> None:
    from raykd.config import load_config
    from raykd.sweep import sweep

    overrides = [f"output_dir={a.out}", f"sweep.scheduler={a.arm}", *shape(a)]
    cfg = load_config(a.config, overrides)
    t0 = time.perf_counter()
    res = sweep(cfg, log=lambda m: C.progress(m))
    wall = time.perf_counter() - t0
    trials = [{"params": t["params"], "status": t["status"], "steps": t["steps"], "max_steps": t["max_steps"],
               "val_perplexity": t["metrics"].get("val_perplexity"), "val_loss": t["metrics"].get("val_loss"),
               "error": t["error"]} for t in res["trials"]]
    C.report({"trials": trials, "sweep_wall_s": wall, "tune_fit_s": res["meta"].get("wall_s")})


def shape(a) -> list[str]:
    """The overrides that size the sweep (empty values keep the YAML's)."""
    out = [f"sweep.num_samples={a.samples}"] if a.samples else []
    out += [f"sweep.reduction_factor={a.rf}", f"sweep.grace_period={a.grace}", f"sweep.eval_every={a.eval_every}",
            f"train.max_steps={a.steps}"] if a.steps else []
    return out


def best(trials: list[dict]) -> dict | None:
    done = [t for t in trials if t["status"] == "TERMINATED" and t["val_perplexity"] is not None]
    return min(done, key=lambda t: t["val_perplexity"]) if done else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=["asha", "fifo"])
    p.add_argument("--config", default=str(C.ROOT / "jobs" / "sweep-smoke.yaml"))
    p.add_argument("--samples", type=int, default=24, help="sweep.num_samples (0: the YAML's)")
    p.add_argument("--steps", type=int, default=72, help="train.max_steps (0: the YAML's shape: steps, rf, grace, eval_every)")
    p.add_argument("--rf", type=int, default=3, help="sweep.reduction_factor")
    p.add_argument("--grace", type=int, default=8, help="sweep.grace_period (steps)")
    p.add_argument("--eval-every", type=int, default=4, help="sweep.eval_every (steps)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.arm:
        child(a)
        return 0
    from raykd.config import load_config
    from raykd.models import bf16_is_fast

    cfg = load_config(a.config, shape(a))
    sw = cfg.sweep
    precision = cfg.train.precision
    if precision == "auto":
        precision = f"auto -> {'bf16' if bf16_is_fast() else 'fp32'} on this CPU (train.precision)"
    threads = cfg.scale.torch_threads or max(1, (os.cpu_count() or 1) // cfg.scale.num_workers)
    C.header(f"raykd sweep with ASHA vs FIFO: {os.path.relpath(a.config, C.ROOT)} "
             f"({a.samples or sw['num_samples']} trials x {cfg.train.max_steps} steps, max {sw['max_concurrent']} at once, "
             f"reduction factor {sw['reduction_factor']}, grace {sw['grace_period']} steps, "
             f"teacher {cfg.teacher.model})",
             threads, f"{precision}; threads are per trial, {sw['max_concurrent']} trials share the cores", [
                 "the same config, search space and seed in both runs; only sweep.scheduler differs (asha vs fifo)",
                 "Tune's search seeded by raykd from cfg.seed in both runs; the sampled trials are compared (same_trials)",
                 "each sweep runs in its own child process with its own local Ray instance, one after the other, output under a tempdir",
                 "trial-steps = sum over trials of the last step each trial reported (an ASHA-stopped trial counts the steps up to its "
                 "last report); both sweeps' wall times are given too (wall_time_saved), which include any steps run after a stop decision",
                 "best = lowest final val_perplexity among trials that ran to the end (FIFO: all)",
             ])
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # as the test suite: reports do not block ~2 s
    script = os.path.abspath(__file__)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
        for arm in ("asha", "fifo"):
            extra = [f"--config={a.config}", f"--out={os.path.join(tmp, arm)}", f"--samples={a.samples}", f"--steps={a.steps}",
                     f"--rf={a.rf}", f"--grace={a.grace}", f"--eval-every={a.eval_every}"]
            r = C.run_arm(script, arm, extra, timeout=2400)
            runs[arm] = r
            print(f"{arm}: {len(r['trials'])} trials, {sum(t['steps'] for t in r['trials'])} trial-steps, wall {r['wall_s']:.0f} s", flush=True)
            for t in r["trials"]:
                vp = t["val_perplexity"]
                print(f"    {t['status']:13s} steps {t['steps']:3d}  val_ppl {vp if vp is None else round(vp, 2)}  {C.params_key(t['params'])}"
                      + (f"  error: {t['error']}" if t["error"] else ""), flush=True)
    steps = {k: sum(t["steps"] for t in r["trials"]) for k, r in runs.items()}
    same_trials = sorted(C.params_key(t["params"]) for t in runs["asha"]["trials"]) == sorted(C.params_key(t["params"]) for t in runs["fifo"]["trials"])
    b = {k: best(r["trials"]) for k, r in runs.items()}
    same_best = int(all(b.values()) and C.params_key(b["asha"]["params"]) == C.params_key(b["fifo"]["params"]))
    for k, t in b.items():
        print(f"best by {k}: " + ("none finished" if t is None else f"val_ppl {t['val_perplexity']:.3f} {C.params_key(t['params'])}"), flush=True)
    if not same_trials:
        print("warning: the two sweeps sampled different trial configurations", flush=True)
    C.figures({
        "trial_steps_saved": 1 - steps["asha"] / steps["fifo"], "same_best": same_best, "same_trials": int(same_trials),
        "asha_trial_steps": steps["asha"], "fifo_trial_steps": steps["fifo"],
        "wall_time_saved": 1 - runs["asha"]["sweep_wall_s"] / runs["fifo"]["sweep_wall_s"],
        "asha_wall_s": runs["asha"]["sweep_wall_s"], "fifo_wall_s": runs["fifo"]["sweep_wall_s"],
        "fit_time_saved": 1 - runs["asha"]["tune_fit_s"] / runs["fifo"]["tune_fit_s"],
        "asha_fit_s": runs["asha"]["tune_fit_s"], "fifo_fit_s": runs["fifo"]["tune_fit_s"],
        "trials": len(runs["fifo"]["trials"]),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
