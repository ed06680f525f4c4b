"""Any lm-evaluation-harness task as a raykd task (EleutherAI's `lm-eval`, offline).

A task is named as lm-eval knows it (a task under its own task tree, usable only when its data
is already in the local `datasets` cache: the hub is never contacted) or given as a YAML file /
directory of custom task YAMLs whose data are local files (`dataset_path: json`,
`dataset_kwargs: {data_files: ...}`). Both models run in memory through lm-eval's `HFLM`; the
reported metrics are lm-eval's own (`acc`, `acc_norm`, `perplexity`, ...; stderr dropped).
`retained` uses `acc` (else the first higher-is-better metric) with chance 0 (lm-eval does not
state chance).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

from raykd.errors import ConfigError, suggest


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


class _AnyTagLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs for checking: `!function module.fn` and other tags load as their text."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: getattr(node, "value", None))


def _task_names(path: Path, field: str) -> list[str]:
    files = sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml")) if path.is_dir() else [path]
    names = []
    for f in files:
        try:
            doc = yaml.load(f.read_text(), Loader=_AnyTagLoader)  # noqa: S506 (a SafeLoader subclass)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{field}: task file {f} is not valid YAML ({first}); fix the file") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("task", doc.get("group")), str):
            raise ConfigError(f"{field}: task file {f} has no `task:` name; an lm-eval task YAML starts with `task: NAME`")
        names.append(doc.get("task", doc.get("group")))
    if not names:
        raise ConfigError(f"{field}: {path} holds no task YAML files; give an lm-eval task YAML or a directory of them")
    return names


def check(names: list[str], field: str = "eval.tasks") -> dict:
    """Resolve `names` (lm-eval task names or YAML paths) -> {"by_name": {name: [lm-eval task names]},
    "include": [dirs], "defaults": bool}, after checking that lm-eval knows every task (one-line errors)."""
    if not available():
        raise ConfigError(f"{field}: {names[0]!r} is an lm-eval task, and lm-eval is not installed; pip install 'raykd[lmeval]'")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never the hub: local task data only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    include, by_name, named = [], {}, False
    for name in names:
        if "/" in name or name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser().resolve()
            if not path.exists():
                raise ConfigError(f"{field}: task file or directory {name} does not exist; give an lm-eval task YAML or a directory of them")
            include.append(str(path if path.is_dir() else path.parent))
            by_name[name] = _task_names(path, field)
        else:
            named, by_name[name] = True, [name]
    manager = task_manager({"include": include, "defaults": named})
    known = set(manager.all_tasks)
    for task in (t for tasks in by_name.values() for t in tasks):
        if task not in known:
            raise ConfigError(f"{field}: unknown task {task!r}{suggest(task, sorted(known))} built-in tasks are sentiment, cloze, cer; "
                              "lm-eval tasks are its task names or YAML paths")
    return {"by_name": by_name, "include": include, "defaults": named}


def task_manager(spec: dict):
    from lm_eval.tasks import TaskManager

    # lm-eval's own ~14k task YAMLs take 10-20 s to index: only when a task is named, not given as a file
    return TaskManager(include_path=spec["include"] or None, include_defaults=spec["defaults"])


def score(model, tokenizer, task: str, spec: dict, limit: int, batch_size: int, manager=None) -> dict:
    """lm-eval's metrics of `model` (in memory) on one task: {metric: value, ..., "n": documents}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    device = next(model.parameters()).device
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager or task_manager(spec), limit=limit,
                                      bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    except Exception as e:  # a task whose data is not local fails here (lm-eval's hub lookup, offline)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"eval.tasks: lm-eval could not run {task!r} ({type(e).__name__}: {first}); "
                          "use a task whose data are local files (dataset_path: json)") from None
    finally:
        model.train(was_training)  # HFLM puts the model in eval mode
    out, better = {}, res.get("higher_is_better", {}).get(task, {})
    for key, value in res["results"][task].items():
        metric, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric not in ("sample_len",):
            out[metric] = float(value)
    out["n"] = int(res.get("n-samples", {}).get(task, {}).get("effective", 0))
    # the metric `retained` uses: acc where reported, else the first higher-is-better one
    out["_main"] = "acc" if "acc" in out else next((m for m in out if better.get(m) is True), None)
    return out


def run_pair(student, teacher, tokenizer, task: str, spec: dict, limit: int, batch_size: int) -> dict:
    """{"student", "teacher", "retained"} on one lm-eval task (a name from `spec["by_name"]`)."""
    from raykd.tasks.scoring import retained

    manager = task_manager(spec)
    s = score(student, tokenizer, task, spec, limit, batch_size, manager)
    t = score(teacher, tokenizer, task, spec, limit, batch_size, manager)
    main = s.pop("_main")
    t.pop("_main")
    return {"student": s, "teacher": t, "retained": retained(s.get(main), t.get(main), 0.0) if main else None, "main": main}
