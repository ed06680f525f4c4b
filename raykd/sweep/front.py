"""A sweep's full evaluation, on the trials that matter (`sweep.evaluate: front`, the default).

A trial of such a sweep ends with `eval.final: light`: its student is exported and scored alone
(validation perplexity, prefill speed and so latency, size), which is all the report's
size/latency/perplexity fronts need, and no teacher is loaded at its end. After the sweep the
trials a user would pick from — those on either Pareto front (perplexity against parameters and
against latency) and the best of each student size — are scored fully, as `raykd distill` scores
its student (`raykd.tasks.score_run`: teacher perplexity, top-1 agreement, generation overlap and
`eval.tasks`), one Ray task each, from the student their last checkpoint holds. The scores are kept
in `OUTPUT/front.json` (so `raykd report DIR` shows them again) and merged into the trials.

On a multi-node cluster the checkpoints are under `scale.storage_path` (shared storage, required
there) and the task reads them through `ray.train.Checkpoint`, so it may run on any node.
"""

from __future__ import annotations

import json
from pathlib import Path

from raykd import manifest
from raykd.fronts import coordinates, pareto_front
from raykd.report import FRONTS, METRIC_COLUMNS

FILE = "front.json"
_SKIP = ("history", "tasks", "worker_phases", "worker_nodes")  # per-run details the sweep's tables do not show


def chosen(trials: list[dict]) -> list[int]:
    """Indices of the finished trials on either front, plus the best (lowest val_perplexity) of each size."""
    done = [i for i, t in enumerate(trials) if t["status"] == "TERMINATED" and t["metrics"].get("val_perplexity") is not None]
    pick: set[int] = set()
    for key in FRONTS.values():
        xs = coordinates(trials, key)  # latency: its size's median, as the report counts it
        front = pareto_front([(trials[i]["metrics"]["val_perplexity"], xs[i]) for i in done])
        pick.update(done[j] for j in front)
    best: dict = {}
    for i in done:
        size = trials[i]["metrics"].get("student_params")
        if size not in best or trials[i]["metrics"]["val_perplexity"] < trials[best[size]]["metrics"]["val_perplexity"]:
            best[size] = i
    return sorted(pick | set(best.values()))


def last_export(storage: str, name: str):
    """(`pyarrow` filesystem, path) of the newest checkpoint under `storage`/`name` that holds an exported
    student (`student/` and `metrics.json`), or None."""
    import pyarrow.fs as pafs

    fs, base = manifest.run_dir(storage, name)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    for info in sorted((i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                       key=lambda i: i.base_name, reverse=True):
        if fs.get_file_info(f"{info.path}/metrics.json").type == pafs.FileType.File:
            return fs, info.path
    return None


def _score(cfg_dict: dict, storage: str, name: str, val_blocks) -> dict:
    """In a Ray task: the full scores of the student in the trial's last checkpoint (`raykd.tasks.score_run`)."""
    import ray.train
    import torch

    from raykd import models, tasks
    from raykd.config import from_dict

    cfg = from_dict(cfg_dict)
    found = last_export(storage, name)
    if found is None:
        raise FileNotFoundError(f"no checkpoint with an exported student under {storage}/{name}")
    device = torch.device("cuda" if cfg.scale.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log=lambda m: None)
    trc = cfg.teacher.trust_remote_code
    with ray.train.Checkpoint(path=found[1], filesystem=found[0]).as_directory() as d:
        student = models.load_model(Path(d) / "student", torch.float32, trc, frozen=True).to(device)
    teacher = models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), trc, frozen=True).to(device)
    tok = models.load_tokenizer(teacher_dir, trc)
    metrics = tasks.score_run(cfg, student, teacher, tok, val_blocks.to(device), teacher_dir, log=lambda m: None)
    metrics["student_latency_ms"] = 1000.0 * val_blocks.shape[1] / metrics["student_tokens_per_s"]
    return {k: v for k, v in metrics.items() if k not in _SKIP}


def evaluate(trials: list[dict], runs: dict[str, tuple[dict, str, str]], val_blocks, out: Path, log=print) -> dict:
    """Score the `chosen` trials fully (those not already in `out/front.json`), merge every saved score into
    `trials` (their metrics, `scored: full`) and return {trial_id: scores}. `runs`: trial_id -> (the trial's
    config dict, its checkpoint storage, its run name). A trial whose scoring fails keeps its light metrics."""
    import ray

    path = out / FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    todo = [trials[i]["trial_id"] for i in chosen(trials) if trials[i]["trial_id"] not in saved and trials[i]["trial_id"] in runs]
    if todo:
        log(f"raykd: scoring {len(todo)} trial(s) on the fronts fully (teacher, agreement, tasks): {', '.join(todo)}")
        cfg = runs[todo[0]][0]
        opts = {"num_cpus": cfg["scale"]["cpus_per_worker"], "num_gpus": 1 if cfg["scale"]["use_gpu"] else 0, "max_retries": 0}
        score = ray.remote(_score).options(**opts)
        blocks = ray.put(val_blocks)
        refs = {}
        for n, tid in enumerate(todo):
            refs[tid] = score.remote(*runs[tid], blocks)
            if n == 0:  # the first fills this node's teacher memo; the rest reuse it
                ray.wait([refs[tid]])
        for tid, ref in refs.items():
            try:
                saved[tid] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one trial's failure must not lose the sweep's report
                log(f"raykd: trial {tid}: full scoring failed ({str(e).strip().splitlines()[-1][:200]}); its light scores stay")
        manifest.write_json(path, saved)
    merge(trials, saved)
    return saved


def merge(trials: list[dict], saved: dict) -> None:
    """Put the full scores of `saved` (trial_id -> metrics) into the trial dicts, marked `scored: full`. What the
    light evaluation measured for every trial (perplexity, latency, size) stays as measured there: the fronts
    compare every trial on the same measurement."""
    for t in trials:
        if t["trial_id"] in saved:
            t["metrics"].update({k: v for k, v in saved[t["trial_id"]].items()
                                 if (k in METRIC_COLUMNS or k.startswith("task_")) and t["metrics"].get(k) is None})
            t["scored"] = "full"
