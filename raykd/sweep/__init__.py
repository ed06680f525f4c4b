"""Ray Tune sweeps over loss weights, layer maps, student depths, LR ... (`raykd sweep`).

Train V2 pattern: a Tune *function trainable* builds and fits one `TorchTrainer` per trial
(`raykd.train.build_trainer`, the same code as `raykd distill`) and forwards every report
of rank 0 to Tune with `TuneReportCallback`; a one-worker trial instead runs the same
`train_loop_per_worker` in its own process (`sweep.in_process`, raykd.sweep.inproc), with no
Train controller or worker process to start. Every report of a sweep trial carries
`val_loss` (student CE on held-out blocks, `sweep.eval_every` steps apart), which ASHA
(Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") uses to stop
poor trials early, one bracket per student depth (`DepthASHA`: a deeper, slower-starting
student competes only with students of its depth); the final report adds `val_perplexity`, `top1_agreement`,
`student_params` and the measured `student_latency_ms`. A sampled combination that is not
a valid config (or crashes, or runs out of memory) fails only its own trial: Tune records
the error and the sweep goes on. Results go to `raykd.report.write_report`.

Layout of `output_dir`: `tune/` (the Tune experiment; `--resume` restores it), `trials/ID/`
(each trial's Train checkpoints), and the report files.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raykd import models
from raykd.config import Config, ConfigError, _build, from_dict, set_dotted
from raykd.data import cache, cache_read
from raykd.sweep.asha import DepthASHA, OrderedASHA
from raykd.sweep_config import SweepConfig

EXPERIMENT = "tune"


def search_space(sweep: SweepConfig) -> dict:
    """`sweep.params` as Tune domains, keyed by the dotted config key."""
    from ray import tune

    space = {}
    for key, spec in sweep.params.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and sweep.search == "grid"):
            space[key] = tune.grid_search(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(values[0], values[1] + 1)
    return space


def searcher(sweep: SweepConfig, seed: int):
    """(search algorithm, param_space) for `sweep`, seeded from the run's `seed`, so that the same
    sweep samples the same trials in the same order (random/grid: Tune's BasicVariantGenerator, its
    `constant_grid_search` with `sweep.paired`;
    Optuna TPE, multi-objective when `sweep.objectives` has several metrics). The algorithm carries
    `sweep.max_concurrent` itself (Tune ignores TuneConfig's limit for a generator it is handed)."""
    space = search_space(sweep)
    if sweep.search != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=seed, constant_grid_search=sweep.paired), space
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if len(sweep.objectives) > 1:  # multi-objective TPE: the searcher owns the space and its metrics
        from raykd.tasks.names import objective_metric

        keys = [objective_metric(o) if o.startswith("task:") else (o, "min") for o in sweep.objectives]
        alg, space = OptunaSearch(space=space, metric=[k for k, _ in keys], mode=[m for _, m in keys], seed=seed), {}
    else:
        alg = OptunaSearch(seed=seed)
    return ConcurrencyLimiter(alg, max_concurrent=sweep.max_concurrent), space


def rerun_config(base: dict, params: dict, output_dir: str) -> dict:
    """base + sampled params as a plain config dict without the sweep (what best_config.yaml holds)."""
    d = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(d, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from Tune's samplers
    d["sweep"] = None
    d["output_dir"] = output_dir
    return d


def trial_config(base: dict, params: dict, sweep: SweepConfig, trial_dir: str) -> Config:
    """The complete config of one trial: base + sampled params, evaluating every `eval_every` steps."""
    d = rerun_config(base, params, trial_dir)
    # every report carries val_loss (Tune's metric); one checkpoint at the end, the student without the
    # training state (a trial is never continued; AdamW's moments would double its bytes); no generation metrics
    d["train"].update(eval_every=sweep.eval_every, report_every=sweep.eval_every, checkpoint_every=0, generation_eval=False,
                      final_training_state=False)
    if sweep.light_trials:  # the student alone at the end; raykd.sweep.front scores the trials that matter fully
        d["eval"]["final"] = "light"
    return from_dict(d)


def _check_space(base: dict, sweep: SweepConfig, log=print) -> None:
    """Every listed choice must make a valid config on its own, and one the teacher can take (its depth, its
    positions, the layer map: raykd.plan.check_static), caught here, before Ray and before any trial."""
    from raykd.plan import check_static

    t_configs: dict = {}
    for key, spec in sweep.params.items():
        kind, values = next(iter(spec.items()))
        for value in values if kind in ("choice", "grid") else values[:2]:
            try:
                cfg = trial_config(base, {key: value}, sweep, "check")
                if cfg.teacher.model not in t_configs:
                    t_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log)
                    t_configs[cfg.teacher.model] = models.load_config(t_dir, cfg.teacher.trust_remote_code)
                check_static(cfg, t_configs[cfg.teacher.model])
            except ConfigError as e:
                raise ConfigError(f"sweep.params.{key}: the value {value!r} makes an invalid config ({e})") from None


_READS = ("train.max_steps", "train.batch_size", "train.grad_accum", "scale.num_workers")  # what sets the blocks a trial reads


class _CacheRun(NamedTuple):
    cfg: Config  # the resolved config the cache is built from
    plan: object  # its plan (raykd.plan.resolve)
    blocks: int  # train blocks to hold (raykd.data.cache.reads; 0: all)


def _cache_config(cfg: Config, sw: SweepConfig, log) -> _CacheRun:
    """The resolved config, plan and train blocks (`raykd.data.cache.reads`; 0: all) of the shared teacher cache
    (an existing one is checked). When trials change the student or the layer map, a `mapped` cache stores every
    teacher layer; when they change how many blocks they read, the cache holds the whole train set."""
    from raykd.plan import resolve

    d = cfg.to_dict()
    if d["teacher"]["cache_layers"] == "mapped" and any(k.startswith(("student.", "layer_map.")) for k in sw.params):
        d["teacher"]["cache_layers"] = "all"
        log("raykd: the sweep changes the student or the layer map: the teacher cache stores every teacher layer")
    resolved, plan = resolve(from_dict(d), log=lambda m: None)
    cache.status(resolved, plan)
    return _CacheRun(resolved, plan, 0 if any(k in _READS for k in sw.params) else cache.reads(resolved))


def _trainable(params: dict, base: dict, sweep_dict: dict, trials_root: str, datasets: tuple | None = None) -> None:
    """One Tune trial: a whole `raykd distill` run whose reports become Tune results (on the sweep's shared
    `datasets` when it built them)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd import runtime, train
    from raykd.plan import resolve

    sweep = _build(SweepConfig, sweep_dict, "sweep")
    trial_dir = os.path.join(trials_root, tune.get_context().get_trial_id())
    cfg = trial_config(base, params, sweep, trial_dir)
    resolved, plan = resolve(cfg, log=lambda m: None)
    if in_process(resolved, sweep):  # no Train controller or worker process to start (raykd.sweep.inproc)
        from raykd.sweep.inproc import run_trial

        run_trial(train.train_loop_per_worker, resolved.to_dict(), train.run_datasets(resolved, plan, datasets), *runtime.run_storage(resolved))
        return
    train.build_trainer(resolved, plan, callbacks=[TuneReportCallback()], datasets=datasets).fit()


def in_process(cfg: Config, sw: SweepConfig) -> bool:
    """Whether a trial of `cfg` trains in the Tune trial's own process: `sweep.in_process`, one worker, not elastic,
    DDP (FSDP2 / DeepSpeed want a process group even for one rank), and no `scale.*` among the searched keys (so the
    base config decides it for every trial, and their resources)."""
    fixed = not any(k.startswith("scale.") for k in sw.params)
    return sw.in_process and fixed and cfg.scale.strategy == "ddp" and cfg.scale.worker_range == (1, 1)


def trial_scheduler(sw: SweepConfig, max_steps: int):
    """Tune's trial scheduler for `sw.scheduler`: ASHA on `step` (rungs from grace_period below max_steps), one
    bracket per student depth unless `sw.asha_brackets` is `one`, deciding by trial order unless `sw.asha_order`
    is `arrival` (raykd.sweep.asha); or FIFO."""
    if sw.scheduler != "asha":
        return FIFOScheduler()
    asha = dict(time_attr="step", max_t=max_steps, grace_period=sw.grace_period, reduction_factor=sw.reduction_factor)
    ordered = sw.asha_order == "trial"
    if sw.asha_brackets == "depth":
        return DepthASHA(ordered=ordered, **asha)
    return OrderedASHA(**asha) if ordered else ASHAScheduler(**asha)


def _tuner(cfg: Config, sw: SweepConfig, trainable, out: Path, resume: bool):
    """(A new Tuner (ASHA or FIFO, the seeded search), its scheduler), or (the one restored from `out` with --resume, None)."""
    from ray import tune

    path = out / EXPERIMENT
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: no sweep to resume in {path}; run without --resume to start one")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=False, restart_errored=False), None
    if path.exists():
        raise ConfigError(f"output_dir: {out} already holds a sweep; pass --resume to continue it or choose another output_dir")
    scheduler = trial_scheduler(sw, cfg.train.max_steps)
    search_alg, space = searcher(sw, cfg.seed)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, search_alg=search_alg,
                                    num_samples=sw.num_samples,  # the search algorithm carries max_concurrent
                                    reuse_actors=sw.reuse_processes and in_process(cfg, sw)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    return tuner, scheduler


def sweep(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run (or resume) the sweep in `cfg.sweep`; write the report into `cfg.output_dir`."""
    from ray import tune

    from raykd import runtime
    from raykd.plan import check_inputs
    from raykd.report import write_report
    from raykd.runtime import init_ray, require_shared_storage

    if cfg.sweep is None:
        raise ConfigError("sweep: the config has no sweep: section; add sweep.params (see jobs/sweep-smoke.yaml)")
    sw = _build(SweepConfig, cfg.sweep, "sweep")
    base = cfg.to_dict()
    _check_space(base, sw, log)  # fetches/converts each teacher once, before trials race for it
    check_inputs(cfg, cfg.teacher.model, log=log)  # the corpus and the task data (fetched once), before Ray starts
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache_run = _cache_config(cfg, sw, log) if cfg.teacher.cache else None  # a mismatching cache is refused here, before Ray
    how = init_ray(cfg, runs=sw.max_concurrent, per_run_extra=sw.trial_cpus, log=log)  # sized for the sweep before the cache build can start Ray smaller
    require_shared_storage(cfg, how)  # every trial's checkpoints
    if cache_run is not None:
        cache.ensure(cache_run.cfg, cache_run.plan, log, blocks=cache_run.blocks)  # built once for every trial
    datasets = _shared_datasets(cfg, sw, cache_run.cfg if cache_run else None, log)
    # an in-process trial holds its worker's resources itself; otherwise its Train worker asks for them
    here = runtime.worker_resources(cfg.scale) if in_process(cfg, sw) else {"CPU": sw.trial_cpus}
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=base, sweep_dict=cfg.sweep, trials_root=str(out / "trials"), datasets=datasets), here)
    t0 = time.time()
    path = out / EXPERIMENT
    record = out / "sweep.json"  # what `raykd report DIR` needs to rebuild the report later
    tuner, scheduler = _tuner(cfg, sw, trainable, out, resume)
    meta = {"experiment": str(path), "scheduler": sw.scheduler, "search": sw.search, "metric": "val_loss", "objectives": list(sw.objectives)}
    if sw.scheduler == "asha":
        meta["asha_brackets"] = sw.asha_brackets
    if not resume:
        record.write_text(json.dumps({"config": base, "meta": meta}, indent=1))
    results = tuner.fit()
    trials = collect_trials(results, base, sw, cfg.train.max_steps)
    judged = scheduler.verdicts() if hasattr(scheduler, "verdicts") else {}
    for t in trials:  # judged stopped by trial order only after it had reached its last step: stopped, as in any other run
        t["status"] = "EARLY_STOPPED" if t["status"] == "TERMINATED" and t["trial_id"] in judged else t["status"]
    meta["wall_s"] = time.time() - t0
    unfinished = max(_unfinished(results, path), expected_trials(sw) - len(trials))
    meta["interrupted"] = bool(unfinished)
    if unfinished:
        log(f"raykd: sweep interrupted with {unfinished} trial(s) unfinished; `raykd sweep CONFIG --resume` continues it")
    if sw.light_trials and not unfinished:  # an interrupted sweep is scored when --resume finishes it
        _score_front(cfg, sw, trials, datasets, out, meta, log)
    record.write_text(json.dumps({"config": base, "meta": meta}, indent=1))
    paths = write_report(out, trials, meta)
    return {"trials": trials, "paths": paths, "meta": meta}


def _shared_datasets(cfg: Config, sw: SweepConfig, cache_cfg: Config | None, log) -> tuple | None:
    """(train, validation) tokenized, packed, checked and materialized in the object store once for every trial,
    or None when the sweep changes what they are built from (data.*, seed, the teacher's tokenizer). With the
    teacher cache (`cache_cfg`: the config it was built from) train is the cache's rows read once
    (`raykd.data.cache_read.shared_rows`; None when too big: each trial reads the shards)."""
    from raykd.data import pipeline

    if any(k.startswith(("data.", "teacher.")) or k == "seed" for k in sw.params):
        return None
    from raykd.runtime import quiet_data_progress

    quiet_data_progress()  # the datasets carry this context into the trials' workers
    t0 = time.time()
    train, val = pipeline.materialized(cfg.data, cfg.teacher.model, cfg.seed, cfg.teacher.trust_remote_code,
                                       cfg.val_blocks, train=not cache_cfg)
    log(f"raykd: the sweep's data tokenized and packed once for every trial ({time.time() - t0:.0f} s)")
    return (cache_read.shared_rows(cache_cfg, log) if cache_cfg else train), val


def _score_front(cfg: Config, sw: SweepConfig, trials: list[dict], datasets: tuple | None, out: Path, meta: dict, log) -> None:
    """`raykd.sweep.front.evaluate` on the sweep's trials: the validation blocks the trials scored, each trial's config and checkpoints."""
    from raykd.data import pipeline
    from raykd.runtime import run_storage
    from raykd.sweep import front

    val = datasets[1] if datasets else pipeline.build_datasets(cfg.data, cfg.teacher.model, cfg.seed, cfg.teacher.trust_remote_code)[1]
    blocks = pipeline.take_blocks(val, cfg.val_blocks)
    runs = {}
    for t in (t for t in trials if t["status"] == "TERMINATED"):
        trial = from_dict(rerun_config(cfg.to_dict(), t["params"], str(out / "trials" / t["trial_id"])))  # as raykd distill scores
        runs[t["trial_id"]] = (trial.to_dict(), *run_storage(trial))
    saved = front.evaluate(trials, runs, blocks, out, log)
    first = next(iter(saved.values()), {})
    meta.update({k: first[k] for k in ("teacher_val_perplexity", "teacher_params") if k in first})


def expected_trials(sweep: SweepConfig) -> int:
    """num_samples x the size of the grid (Tune's semantics for grid_search in a param space)."""
    grid = 1
    for spec in sweep.params.values():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and sweep.search == "grid"):
            grid *= len(values)
    return sweep.num_samples * grid


def _unfinished(results, path: Path) -> int:
    """Trials Tune has not ended (an interrupted sweep); ASHA-stopped trials count as ended. Read from the experiment
    state Tune saved last (plain JSON) as well as from the trials it returns: after a Ctrl-C, Tune's cleanup stops the
    running trials and marks them TERMINATED in memory, while the state it saved first still says RUNNING."""
    ended = ("TERMINATED", "ERROR")
    analysis = getattr(results, "_experiment_analysis", None)
    live = sum(t.status not in ended for t in getattr(analysis, "trials", None) or [])
    saved = sorted(path.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        rows = json.loads(saved[-1].read_text())["trial_data"] if saved else []
        return max(live, sum(json.loads(r[0] if isinstance(r, list) else r).get("status") not in ended for r in rows))
    except (ValueError, KeyError, TypeError, AttributeError):  # a layout this Ray does not write: what Tune returned
        return live


def _status(result, max_steps: int) -> str:
    if result.error is not None:
        return "ERROR"
    return "TERMINATED" if (result.metrics or {}).get("step", 0) >= max_steps else "EARLY_STOPPED"


METRICS = ("val_perplexity", "top1_agreement", "student_params", "student_latency_ms", "student_tokens_per_s", "val_loss")


def _params_file(trial_path: str | None) -> dict:
    """The sampled params Tune wrote next to a trial (a restored errored trial may carry no config)."""
    path = Path(trial_path or "") / "params.json"
    return json.loads(path.read_text()) if trial_path and path.is_file() else {}


def collect_trials(results, base: dict, sweep: SweepConfig, max_steps: int) -> list[dict]:
    """Tune's ResultGrid as the trial dicts `raykd.report.write_report` takes."""
    trials = []
    for result in results:
        config = result.config or (result.metrics or {}).get("config") or _params_file(result.path)
        params = {k: config[k] for k in sweep.params if k in config}
        metrics = result.metrics or {}
        history = []
        df = result.metrics_dataframe
        if df is not None and "val_loss" in df:
            for row in df[["step", "val_loss", *(["loss"] if "loss" in df else [])]].dropna(subset=["val_loss"]).to_dict("records"):
                history.append({k: (int(v) if k == "step" else float(v)) for k, v in row.items()})
        try:  # the config to rerun this trial with `raykd distill` (the sweep's eval/checkpoint settings left out)
            config = from_dict(rerun_config(base, params, "runs/best")).to_dict()
        except ConfigError:
            config = None
        error = None
        if result.error is not None:
            error = (str(result.error).strip().splitlines() or ["error"])[-1][:300]
        trials.append({
            "trial_id": str(metrics.get("trial_id") or (Path(result.path).name if result.path else len(trials))),
            "status": _status(result, max_steps), "error": error, "params": params,
            "metrics": {k: v for k, v in metrics.items() if k in METRICS or k.startswith("task_")}, "steps": int(metrics.get("step", 0) or 0), "max_steps": max_steps,
            "history": history, "config": config,
        })
    return trials


def rebuild_report(directory: str, log=print) -> dict:
    """`raykd report DIR`: the report again from the Tune experiment in DIR/tune."""
    out = Path(directory).resolve()
    if not out.is_dir():
        raise ConfigError(f"report: {directory} is not a directory; pass the output_dir of a raykd sweep")
    from ray import tune

    from raykd.report import write_report
    from raykd.sweep import front

    path = out / EXPERIMENT
    if not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"report: {path} holds no Tune experiment; pass the output_dir of a raykd sweep")
    saved = json.loads((out / "sweep.json").read_text())
    cfg = from_dict(saved["config"])
    sw = _build(SweepConfig, cfg.sweep, "sweep")
    results = tune.Tuner.restore(str(path), trainable=_trainable).get_results()
    trials = collect_trials(results, cfg.to_dict(), sw, cfg.train.max_steps)
    if (out / front.FILE).is_file():  # the full scores of the front's trials
        front.merge(trials, json.loads((out / front.FILE).read_text()))
    meta = {**saved.get("meta", {}), "experiment": str(path)}
    return {"trials": trials, "paths": write_report(out, trials, meta), "meta": meta}
