"""Task names and sweep objectives: the checks a config runs at load time (no models, no data).

A leaf module (only raykd.errors): `raykd.config` validates `eval.tasks` and `sweep.objectives`
with it without importing the scorers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from raykd.errors import ConfigError, suggest

BUILTIN = ("sentiment", "cloze", "cer")


def is_builtin(name: str) -> bool:
    return name in BUILTIN


def check_names(names: list[str], field: str = "eval.tasks") -> None:
    """Cheap checks that need no model or data: known built-ins, existing task files, no duplicates."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{field}: expected a list of task names, e.g. [sentiment, cloze, cer]")
    if len(set(names)) != len(names):
        raise ConfigError(f"{field}: {names} names a task twice; list each task once")
    for name in names:
        if is_builtin(name):
            continue
        if "/" in name or name.endswith((".yaml", ".yml")):
            if not Path(name).expanduser().exists():
                raise ConfigError(f"{field}: task file or directory {name} does not exist; give an lm-eval task YAML file or a directory of them")
            continue
        near = suggest(name, BUILTIN)
        if near or importlib.util.find_spec("lm_eval") is None:  # a misspelt built-in, or no lm-eval to know other names
            raise ConfigError(f"{field}: unknown task {name!r}{near} built-in tasks are {', '.join(BUILTIN)}; "
                              "other names are lm-eval tasks (pip install 'raykd[lmeval]')")


LOWER_IS_BETTER = ("cer", "cer_text", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def objective_metric(objective: str) -> tuple[str, str]:
    """A sweep objective `task:NAME_METRIC` -> (the reported metric key `task_NAME_METRIC`, "max" | "min")."""
    body = objective[len("task:"):]
    mode = "min" if any(body.endswith("_" + m) for m in LOWER_IS_BETTER) else "max"
    return f"task_{body}", mode


def check_objective(objective: str, names: list[str], field: str = "sweep.objectives") -> None:
    """`task:NAME_METRIC` must name a task that `eval.tasks` runs (built-ins: their known metrics)."""
    body = objective[len("task:"):]
    metrics = {"sentiment": ("acc", "auc", "retained"), "cloze": ("acc", "logprob", "retained"),
               "cer": ("cer", "cer_text", "rougeL", "bleu", "retained")}
    known = [f"{n}_{m}" for n in names if n in metrics for m in metrics[n]]
    if body in known or any(body.startswith(n.replace("/", "_").replace(".", "_") + "_") for n in names if not is_builtin(n)):
        return
    raise ConfigError(f"{field}: {objective!r} is not a score of eval.tasks {names}{suggest(body, known)} "
                      f"use task:NAME_METRIC, e.g. task:sentiment_auc, and list the task in eval.tasks")
