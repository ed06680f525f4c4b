"""Student quality against `teacher.cache_topk`: the same run trained from caches keeping the teacher's
top 16 / 64 / 256 log-probs per token or its final hidden state (k = 0: the dense cache), and from the
teacher itself (online, every step).

The run: SmolLM2-135M-Instruct teacher (the PyPI wheel), a 10-layer student cut from it
(`student.init: ends`), the demo's loss (CE + forward KL + cosine hidden alignment on the kept layers),
`--steps` steps x 4 x 256 tokens of SOTU (one epoch over the first `--steps` x 4 shuffled blocks), same
seed, LR schedule and block order in every arm; one worker, `raykd.train.distill` in its own child
process with its own local Ray, one arm after the other. A cached arm builds its cache first (a fresh
directory; build time printed apart, not in the training figures).

Figures: val_ppl_dense and val_ppl_k{K} (the student's validation perplexity on `--val-blocks` held-out
blocks), ppl_ratio_k{K} = cached / dense (1 = no loss from keeping only the top K), the ratio at the
default k (`ppl_ratio_default`, goal <= 1.02), and step_speedup_k{K} (training tokens/s, cached / dense).
`--temperature` sets loss.temperature in every arm (top-k targets pool the tail, which T > 1 makes heavy).

    .venv/bin/python bench/topk.py [--ks 0,16,64,256] [--steps 48] [--val-blocks 64] [--temperature 1.0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def run_config(a, out: str) -> dict:
    return {
        "teacher": {"model": "smollm2-135m", "dtype": "float32"},
        "student": {"num_layers": 10, "init": "ends"},
        "loss": {"kd": "forward_kl", "hidden": "cosine", "chunk_size": 1024, "temperature": a.temperature,
                 "weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.0, "relation": 0.0, "blockwise": 0.0}},
        "data": {"train": ["sotu"], "block_size": 256, "max_train_blocks": a.steps * 4, "max_val_blocks": a.val_blocks},
        "train": {"max_steps": a.steps, "batch_size": 4, "lr": 3e-4, "warmup_steps": max(1, a.steps // 10), "report_every": 8,
                  "checkpoint_every": 0, "generation_eval": False, "precision": "fp32"},
        "eval": {"final": "light"},
        "scale": {"num_workers": 1, "cpus_per_worker": 2.0},
        "output_dir": out,
        "seed": 0,
    }


def child(a) -> None:
    from raykd.config import load_config
    from raykd.train import distill

    cfg = load_config(a.config, [f"teacher.cache={a.cache}", f"teacher.cache_topk={a.arm[1:]}"] if a.arm != "dense" else [])
    m = distill(cfg, log=C.progress)
    build = json.load(open(os.path.join(a.cache, "raykd_cache.json"))).get("build_wall_s") if a.arm != "dense" else None
    mib = sum(os.path.getsize(os.path.join(a.cache, f)) for f in os.listdir(a.cache)) / 2**20 if a.arm != "dense" else None
    C.report({"val_perplexity": m["val_perplexity"], "tokens_per_s": m["tokens_per_s"], "train_wall_s": m["train_wall_s"],
              "build_wall_s": build, "cache_mib": mib})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", default="")
    p.add_argument("--config", default="")
    p.add_argument("--cache", default="")
    p.add_argument("--ks", default="0,16,64,256", help="cache_topk values, comma-separated (0: the dense cache)")
    p.add_argument("--temperature", type=float, default=1.0, help="loss.temperature of every arm")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--val-blocks", type=int, default=64)
    a = p.parse_args()
    if a.arm:
        child(a)
        return 0
    from raykd.config import TeacherConfig

    ks = [int(k) for k in a.ks.split(",")]
    default_k = TeacherConfig.cache_topk
    C.header(f"teacher.cache_topk vs the dense teacher: SmolLM2-135M -> 10-layer student, {a.steps} steps x 4 x 256 tokens, T {a.temperature:g}",
             os.cpu_count(), "fp32", [
                 "one config, seed and block order in every arm; only teacher.cache / cache_topk differ",
                 "each arm is `raykd distill` in its own child process with its own local Ray, one after the other",
                 "val perplexity on the same held-out SOTU blocks (eval.final: light); a cache's build is timed apart",
             ])
    print(f"machine: load average at start {C.loadavg()}", flush=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    script, runs = os.path.abspath(__file__), {}
    with tempfile.TemporaryDirectory(prefix="bench-topk-") as tmp:
        for arm in ["dense", *(f"k{k}" for k in ks)]:
            cfg_path = os.path.join(tmp, f"{arm}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(run_config(a, os.path.join(tmp, f"run-{arm}")), f)
            r = runs[arm] = C.run_arm(script, arm, [f"--config={cfg_path}", f"--cache={os.path.join(tmp, 'cache-' + arm)}"], timeout=3600)
            extra = f", cache {r['cache_mib']:.0f} MiB built in {r['build_wall_s']:.0f} s" if r["cache_mib"] else ""
            print(f"{arm}: val ppl {r['val_perplexity']:.2f}, {r['tokens_per_s']:.0f} tok/s, training {r['train_wall_s']:.0f} s{extra}", flush=True)
    print(f"machine: load average at end {C.loadavg()}", flush=True)
    dense = runs["dense"]
    out = {"val_ppl_dense": dense["val_perplexity"]}
    for k in ks:
        r = runs[f"k{k}"]
        out[f"val_ppl_k{k}"] = r["val_perplexity"]
        out[f"ppl_ratio_k{k}"] = r["val_perplexity"] / dense["val_perplexity"]
        out[f"step_speedup_k{k}"] = r["tokens_per_s"] / dense["tokens_per_s"]
    if default_k in ks:
        out["ppl_ratio_default"] = out[f"ppl_ratio_k{default_k}"]
    out.update(default_k=default_k, steps=a.steps, temperature=a.temperature)
    C.figures(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
