"""The quality study's steps on disk: a `raykd` CLI run on a local Ray instance of its own, and a finished
step's result recorded beside the config it ran with, so that a rerun keeps it (bench/quality.py)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

TEACHER_TEXT = "teacher-text"  # a --data source: the teacher's unconditional text, written by the study (general_text)
SECTIONS = ("teacher", "student", "layer_map", "loss", "data", "train")  # a trials.csv column "section.key" is a sampled setting


def run_cli(verb: str, path: Path, *extra: str) -> float:
    """`raykd VERB path extra...` on a local Ray instance of its own; its wall seconds (raises on failure)."""
    t = time.perf_counter()
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray instance per run, whatever the shell says
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", verb, str(path), *extra], cwd=C.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        raise RuntimeError(f"raykd {verb} {path.name}: failed (exit {proc.returncode})")
    return time.perf_counter() - t


def record(path: Path, config: dict, result: dict) -> None:
    """A finished step's result beside the config it ran with (atomically): a rerun with the same config keeps it."""
    from raykd import manifest

    manifest.write_json(path, {"config": config, "result": result})


def finished(path: Path, config: dict, fresh: bool) -> dict | None:
    """The recorded result of a step that finished with this config (None: run it)."""
    if fresh or not path.exists():
        return None
    rec, want = json.loads(path.read_text()), json.loads(json.dumps(config))
    have = rec.get("config")
    if have != want and isinstance(have, dict) and "teacher" in have:  # a run config: compare both as raykd completes them now
        from raykd.config import from_dict  # (a field added since, at its default, is the run that was recorded)

        have, want = from_dict(have).to_dict(), from_dict(want).to_dict()
    return rec["result"] if have == want else None


def sweep_recipe(trials_csv: Path, depth: int) -> tuple[str, dict]:
    """The best trial at `depth` student layers that ran its full budget in a sweep report's trials.csv (lowest
    val_perplexity): its id and its sampled settings as {dotted key: value} (the columns `section.key`)."""
    import yaml

    try:
        with Path(trials_csv).open() as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SystemExit(f"--recipe: cannot read {trials_csv} ({e.strerror}); give a sweep report's trials.csv") from None
    full = [r for r in rows if r.get("student.num_layers") == str(depth) and r.get("val_perplexity")
            and r.get("steps") and r.get("steps") == r.get("max_steps")]
    if not full:
        raise SystemExit(f"--recipe: {trials_csv} has no trial at {depth} student layers that ran to its last step; "
                         "give a sweep whose depth grid holds the study's depth")
    best = min(full, key=lambda r: float(r["val_perplexity"]))
    params = {k: yaml.safe_load(v) for k, v in best.items() if k.split(".")[0] in SECTIONS and v != ""}
    return best["trial_id"], params


def apply_recipe(cfg: dict, params: dict) -> dict:
    """`cfg` (a resolved run config, changed in place and returned) with a sweep trial's settings: a different cut
    (`student.init`) or layer-map strategy is resolved again by raykd distill (explicit layers / pairs cleared)."""
    from raykd.dictconf import set_dotted

    for key, value in params.items():
        if key == "student.num_layers" and value != cfg["student"]["num_layers"]:
            raise SystemExit(f"--recipe: its trial has {value} student layers, the study {cfg['student']['num_layers']}")
        if key == "student.init" and value != cfg["student"]["init"]:
            cfg["student"]["layers"], cfg["layer_map"]["pairs"] = None, None
        if key == "layer_map.strategy":
            cfg["layer_map"]["pairs"] = None
        set_dotted(cfg, key, value)
    return cfg


DEMO = C.ROOT / "jobs" / "demo.yaml"  # the recipe every arm starts from (--config)
BUDGET = 196_608  # training tokens per arm (--tokens): the study's budget


def recipe_file(path: str | Path) -> dict:
    """A run config file (YAML) as a dict: the study's recipe (one-line error when missing or not a mapping)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"--config: cannot read {path} ({e}); give a run config such as jobs/demo.yaml") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict) or not isinstance(cfg.get("loss"), dict):
        raise SystemExit(f"--config: {path} is not a run config with train and loss sections; give one such as jobs/demo.yaml")
    return cfg


def recipe_defaults(cfg: dict) -> dict:
    """The study's flags a recipe file sets (those left unset on the command line take these): batch, block, lr,
    precision, the KD / hidden / attention weights and the data as SOURCE=WEIGHT,... ."""
    train, weights, data = cfg["train"], cfg["loss"].get("weights") or {}, cfg.get("data") or {}
    sources = data.get("mix") or dict.fromkeys(data.get("train") or ["sotu"], 1.0)
    return {"batch": train.get("batch_size", 4), "block": data.get("block_size", 256), "lr": train.get("lr", 3e-4),
            "precision": train.get("precision", "auto"), "kd": weights.get("kd", 1.0), "hidden": weights.get("hidden", 0.0),
            "attention": weights.get("attention", 0.0), "data": ",".join(f"{k}={w:g}" for k, w in sources.items())}


def learning_curve(history: list[dict], tokens_per_step: int) -> list[dict]:
    """[{step, tokens, val_perplexity}] at the run's validation checks (train.eval_every; its val_loss is a mean token NLL)."""
    return [{"step": h["step"], "tokens": h["step"] * tokens_per_step, "val_perplexity": math.exp(h["val_loss"])}
            for h in history if "val_loss" in h]


def mix_weights(text: str) -> dict[str, float]:
    """--data 'sotu=0.75,moby-dick=0.25' -> {'sotu': 0.75, 'moby-dick': 0.25} (the first source gives the validation split)."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        raise SystemExit(f"--data: expected SOURCE=WEIGHT pairs separated by commas, e.g. sotu=0.75,moby-dick=0.25; got {text!r}") from None


def data_sources(text: str, teacher_text_dir: str | None = None) -> dict:
    """The data section's sources for --data: one source is `train` (as the study ran before mixes), several a `mix`;
    the source `teacher-text` is the teacher's unconditional text the study writes (`teacher_text_dir`)."""
    mix = {(teacher_text_dir if k == TEACHER_TEXT else k): w for k, w in mix_weights(text).items()}
    return {"train": list(mix)} if len(mix) == 1 else {"train": None, "mix": mix}
