"""`raykd distill CONFIG --rounds N`: born-again distillation (Furlanello et al. 2018, "Born-Again
Neural Networks"): round 1 distils the configured teacher; round k + 1 distils round k's student into
a fresh student of the same shape. Every round's student starts from the same weights, the student
round 1 started from (its cut of the original teacher, or `student.model`), saved once as
OUTPUT/init-student, so rounds differ only in their teacher.

Layout: OUTPUT/round1/ ... OUTPUT/roundN/ (each a whole `raykd distill` output: student/,
metrics.json, config.yaml), OUTPUT/init-student/, OUTPUT/rounds.json and OUTPUT/rounds.md (the
summary table). A round whose metrics.json already records every step is not run again, so
re-running the command resumes at the first unfinished round (which resumes from its checkpoint).
Round 1 may read `teacher.cache`; later rounds have another teacher and run it online.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from raykd import models, replace
from raykd.config import Config, ConfigError

KEYS = ("val_perplexity", "teacher_val_perplexity", "top1_agreement", "tokens_seen", "train_wall_s")


def check_rounds(rounds: int) -> None:
    if rounds < 1:
        raise ConfigError(f"--rounds: must be >= 1, got {rounds}; 1 is a plain distillation, N > 1 chains N rounds")


def save_init_student(cfg: Config, dst: Path, log=print) -> Config:
    """Write the student round 1 starts from as a plain HF directory `dst` (once, atomically); returns
    the resolved config (kept layers explicit, so no round searches them again)."""
    from raykd.plan import resolve

    resolved, plan = resolve(cfg, log)
    if (dst / "config.json").exists():
        return resolved
    trc = cfg.teacher.trust_remote_code
    if resolved.student.model:
        student = models.load_model(models.resolve_model(resolved.student.model, "student.model"), torch.float32, trc)
        tok_dir = models.resolve_model(resolved.student.model, "student.model")
    else:
        teacher = models.load_model(plan.teacher_dir, torch.float32, trc, frozen=True)
        student = replace.stand_ins(resolved, plan.teacher_dir, models.cut_student(teacher, resolved.student.layers, dtype=torch.float32), teacher)
        tok_dir = plan.teacher_dir
    tmp = dst.with_name(f".{dst.name}.tmp")
    student.save_pretrained(tmp)
    models.load_tokenizer(tok_dir, trc).save_pretrained(tmp)
    os.replace(tmp, dst)
    return resolved


def round_config(cfg: Config, k: int, out: Path, init: Path) -> Config:
    """Round k's config (k >= 1): round 1 is `cfg`; round k + 1's teacher is round k's student and its
    student starts from `init`, aligned layer to layer (the same depth and width as its teacher)."""
    rc = dataclasses.replace(cfg, output_dir=str(out / f"round{k}"))
    if k == 1:
        return rc
    teacher = dataclasses.replace(cfg.teacher, model=str(out / f"round{k - 1}" / "student"), cache=None, dtype="float32")
    student = dataclasses.replace(cfg.student, model=str(init), init="uniform", layers=None, ends_first=None, dropped="drop")  # init holds the stand-ins
    layer_map = dataclasses.replace(cfg.layer_map, strategy="uniform", pairs=None, num_pairs=None)
    return dataclasses.replace(rc, teacher=teacher, student=student, layer_map=layer_map)


def _finished(path: Path, max_steps: int) -> dict | None:
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("steps") == max_steps else None


def run_rounds(cfg: Config, rounds: int, log=print) -> list[dict]:
    """Run (or resume) `rounds` rounds; returns one summary row per round and writes rounds.json/.md."""
    from raykd.train import distill

    check_rounds(rounds)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a directory; choose a directory path for the run's outputs")
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init-student"
    cfg = save_init_student(cfg, init, log)
    rows = []
    for k in range(1, rounds + 1):
        rc = round_config(cfg, k, out, init)
        metrics = _finished(Path(rc.output_dir), rc.train.max_steps)
        if metrics is None:
            log(f"raykd: round {k}/{rounds}: teacher {rc.teacher.model} -> {rc.output_dir}/student")
            metrics = distill(rc, log=log)
        else:
            log(f"raykd: round {k}/{rounds} already finished in {rc.output_dir}")
        tasks = {k2: v for k2, v in metrics.items() if k2.startswith("task_") and isinstance(v, (int, float))}
        rows.append({"round": k, "teacher": rc.teacher.model, **{key: metrics.get(key) for key in KEYS}, **tasks})
    (out / "rounds.json").write_text(json.dumps(rows, indent=1))
    (out / "rounds.md").write_text(format_rounds(rows))
    return rows


def format_rounds(rows: list[dict]) -> str:
    """The summary table (Markdown): one row per round, the task scores after the fixed columns."""
    extra = sorted({k for r in rows for k in r if k.startswith("task_")})
    cols = ["round", "teacher", *KEYS, *extra]

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
