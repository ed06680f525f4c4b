"""Ray Train: `train_loop_per_worker(config)` runs the teacher-student step on every worker;
`build_trainer(cfg, plan)` wraps it in a `TorchTrainer`; `distill(cfg)` is `raykd distill`.

The loop is the same on a laptop and on a cluster; every knob comes from `config` (a plain
dict of the resolved `Config`: `raykd.plan.resolve` turns `student.init: importance` into
the explicit list of kept layers and the layer map into explicit pairs before any worker
starts). It reads top to bottom in phases around a `RunState`:

    setup      threads, device, precision; teacher, student, Distiller, Engine (raykd.parallel)
    restore    the latest checkpoint (Ray's) or a fresh state (rank 0 scores the untrained student)
    micro-step teacher forward (no grad; none for CE-only runs; the cache's with `teacher.cache`; on the student's
               continuations with loss.on_policy: raykd.onpolicy) -> Distiller forward -> backward; terms summed on device
    step       clip, AdamW, warm-up + cosine LR (the engine)
    report     every `train.report_every` steps: terms averaged over the window and all workers
               (one all-reduce and one host sync per report), tokens/s, val_loss every `train.eval_every`
    checkpoint every `train.checkpoint_every` steps and at the end: the engine's training state plus
               one `worker{rank}.pt` per worker (run state, data position, RNG states)
    export     at the end, rank 0 saves the student as a plain HF model and evaluates it against the teacher;
               both travel in the final checkpoint (the training state too unless train.final_training_state=false)

Ray registers a checkpoint only once every worker has uploaded its part; each part carries a manifest
(`raykd.manifest`: sizes and SHA-256 of its files), so a checkpoint damaged later (a truncated file) is
skipped for the newest intact one. Running the same command again (same `output_dir`) resumes from the
latest checkpoint; a killed worker restarts the group from it (`scale.max_failures`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raykd import manifest, models, replace, runtime, tasks, worker_models
from raykd.config import Config, ConfigError, from_dict
from raykd.data import cache, cache_read, pipeline
from raykd.errors import Diverged, check_finite
from raykd.objective import teacher_forward
from raykd.onpolicy import OnPolicy

WORKER_FILE = "worker{}.pt"  # each worker's part of a checkpoint: its RunState, data position and RNG states
STAND_INS = "_stand_ins"  # train_loop_config key: the object ref of the maps the driver shared (`_shared_stand_ins`)


@dataclass
class RunState:
    """What a run carries from step to step and through checkpoints (plain values only)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # training tokens over all workers
    train_wall_s: float = 0.0  # training wall time of earlier attempts (resumes add theirs)
    epoch: int = 0  # this worker's data position: epoch ...
    batch_index: int = 0  # ... and micro-batches taken in it
    init_val_perplexity: float | None = None  # the untrained student's (rank 0)
    history: list[dict] = field(default_factory=list)  # one entry per report
    resumed_at: list[int] = field(default_factory=list)  # steps a rerun or a restarted group resumed from
    phases: list[list[int]] = field(default_factory=list)  # [from step, workers, grad_accum] per worker-group size


@dataclass
class Worker:
    """One worker's fixed parts, built once in `setup`."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    precision: str  # fp32 | bf16 (train.precision made concrete here)
    teacher_dir: Path
    teacher: torch.nn.Module | None  # None with teacher.cache (rank 0 loads it for the final evaluation)
    teacher_head: tuple | None  # a dense teacher cache (teacher.cache_topk=0): the teacher's LM head (weight, bias | None) on the device
    engine: object  # raykd.parallel.Engine
    val: torch.Tensor | None  # validation blocks [N, T] (rank 0, and every rank with eval_every)
    onpolicy: OnPolicy  # loss.on_policy: which micro-batches the student continues (raykd.onpolicy)

    @property
    def spec(self):
        return self.engine.distiller.spec


# --- setup and restore -----------------------------------------------------------------------


def setup(config: dict) -> tuple[Worker, RunState]:
    """Build this worker and its state: fresh, or restored from Ray's latest checkpoint."""
    from raykd.evaluate import perplexity
    from raykd.parallel import make_engine

    config = dict(config)  # Ray reuses it when a failed worker group restarts
    shared = config.pop(STAND_INS, None)
    cfg = from_dict(config)
    ctx = runtime.session().get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = runtime.for_world(cfg, world)  # a worker range: fewer workers accumulate more (same global batch)
    torch.set_num_threads(runtime.threads(cfg, ctx.get_local_world_size()))
    device = runtime.session().get_device()
    precision = runtime.precision(cfg)
    torch.manual_seed(cfg.seed)  # identical model init on every rank
    teacher_dir, teacher, head, distiller = worker_models.build(cfg, runtime.get(shared))
    val = pipeline.val_blocks(cfg.val_blocks) if (rank == 0 or cfg.train.eval_every > 0) else None
    state, checkpoint = RunState(), _resume_point(rank)
    if checkpoint is None and rank == 0:  # the untrained student, before any strategy wraps it
        state.init_val_perplexity = perplexity(distiller.student.to(device), val.to(device), batch_size=cfg.train.batch_size)
    engine = make_engine(distiller, teacher, cfg, device, world, precision)
    head = None if head is None else tuple(None if x is None else x.to(device) for x in head)
    w = Worker(cfg, rank, world, device, precision, teacher_dir, teacher, head, engine, val, OnPolicy(cfg.loss.on_policy, cfg.seed, rank))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = restore(w, Path(d))
    if not state.phases or state.phases[-1][1:] != [world, cfg.train.grad_accum]:
        if state.phases and rank == 0:
            print(f"raykd: {world} worker(s) from step {state.step} (was {state.phases[-1][1]}); grad_accum {cfg.train.grad_accum} "
                  f"keeps the global batch at {world * cfg.train.grad_accum * cfg.train.batch_size} sequences", flush=True)
        state.phases.append([state.step, world, cfg.train.grad_accum])
    return w, state


def _resume_point(rank: int):
    """Ray's latest checkpoint if it verifies against its manifests, else the run's newest intact one; None if fresh."""
    import ray.train

    latest = runtime.session().get_checkpoint()
    if latest is None:
        return None
    path, note = manifest.choose(latest.filesystem, latest.path)
    if note and rank == 0:
        print(note, flush=True)
    return latest if path == latest.path else ray.train.Checkpoint(path=path, filesystem=latest.filesystem)


def restore(w: Worker, d: Path) -> RunState:
    """The engine's training state and this worker's RunState (run fields from rank 0's file; data position and RNG
    from its own, or rank 0's when the group grew). A group of another size (a worker range) splits the data anew:
    every worker takes rank 0's position, rescaled to its shard (the epoch's share seen is kept, not which blocks)."""
    run = torch.load(d / WORKER_FILE.format(0), map_location="cpu", weights_only=True)
    own = d / WORKER_FILE.format(w.rank)
    mine = torch.load(own, map_location="cpu", weights_only=True) if own.exists() else None
    state = RunState(**run["state"])
    if run.get("engine", True):
        w.engine.load(d, state.step)
    elif state.step < w.cfg.train.max_steps:  # a finished run's export alone: nothing to train on from
        raise ConfigError(f"train.max_steps: this output_dir's run ended at step {state.step} without its training state (train.final_training_state=false); keep max_steps {state.step} or use a new output_dir")
    before = state.phases[-1][1] if state.phases else w.world
    if before != w.world:
        state.batch_index = state.batch_index * before // w.world
    elif mine is not None:
        state.epoch, state.batch_index = mine["state"]["epoch"], mine["state"]["batch_index"]
    if mine is not None:
        torch.set_rng_state(mine["rng"])
        if mine.get("cuda_rng") is not None and w.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], w.device)
    state.resumed_at.append(state.step)  # restarts: a rerun or a failed worker
    if w.rank == 0:
        print(f"raykd: resuming from step {state.step} ({state.tokens_seen} tokens seen)", flush=True)
    return state


# --- the loop --------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """One worker of a distillation run; `config` is `Config.to_dict()` of the resolved config."""
    w, state = setup(config)
    t, spec, engine = w.cfg.train, w.spec, w.engine
    cached = bool(w.cfg.teacher.cache)  # the teacher's targets come from the cache instead of a forward
    batches = pipeline.ShardBatches(t.batch_size, state.epoch, state.batch_index, cached)
    tokens_per_step = t.batch_size * w.cfg.data.block_size * t.grad_accum * w.world
    window = torch.zeros(len(spec.report_terms) + 1, dtype=torch.float64, device=w.device)  # term sums + micro-steps
    meter = {"start": time.perf_counter(), "tokens": 0, "first_step": state.step}
    while state.step < t.max_steps:
        for micro in range(t.grad_accum):
            loss, terms = micro_step(w, next(batches), cached, (state.step, micro))
            engine.backward(loss, micro == t.grad_accum - 1)
            engine.micro_step()
            window[:-1] += torch.stack([terms[k] if k in terms else torch.zeros((), device=w.device) for k in spec.report_terms]).double()
            window[-1] += 1
        grad_norm = engine.step()
        meter["tokens"] += tokens_per_step
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.epoch, state.batch_index = batches.epoch, batches.index
        report(w, state, window, meter, grad_norm)
    if meter["first_step"] >= t.max_steps:  # finished before: nothing to redo, the last checkpoint holds the export
        runtime.session().report({"step": state.step, "tokens_seen": state.tokens_seen})


def micro_step(w: Worker, batch, cached: bool, at: tuple[int, int] = (0, 0)):
    """Teacher targets (forward, cache, or none for CE-only runs) and the Distiller's (loss, terms); with
    loss.on_policy, micro-batch `at` = (step, micro) may first be continued by the student (raykd.onpolicy)."""
    data_mask, gen = None, {}
    if cached:
        ids, t_out = cache_read.teacher_outputs(batch, w.cfg, w.engine.distiller.student.get_output_embeddings().weight.shape[0], w.device, w.teacher_head)
    else:
        ids, t_out = batch.to(w.device), None
        ids, data_mask, gen = w.onpolicy.apply(w.engine.distiller.student, ids, *at, context=w.engine.sampling)
        if w.spec.uses_teacher:  # a CE-only run (a baseline) never runs the teacher
            with w.engine.autocast():
                t_out = teacher_forward(w.teacher, ids, w.spec.teacher_needs())
    loss, terms = w.engine.forward(ids, t_out, data_mask=data_mask)
    return loss, {**terms, **gen}


def _val_loss(w: Worker, blocks: torch.Tensor) -> float:
    """Mean next-token CE (nats) of the student on `blocks` [N, T] through the engine (no teacher
    forward), by raykd.evaluate's one routine: every rank scores its share, sums all-reduced."""
    from raykd.evaluate import nll_sums

    def score(ids: torch.Tensor) -> torch.Tensor:  # the fused head's mean CE x the batch's predictions
        _, terms = w.engine.forward(ids.to(w.device), None, eval_ce=True)
        return terms["ce"].double() * ids[:, 1:].numel()

    with torch.no_grad():
        nll, count = nll_sums(score, blocks, w.cfg.train.batch_size, w.rank, w.world, w.engine.all_reduce, w.device)
    return nll / count


def report(w: Worker, state: RunState, window: torch.Tensor, meter: dict, grad_norm: float) -> None:
    """Every report_every steps (and on checks, checkpoints, the end): metrics to Ray, maybe a checkpoint."""
    import ray.train

    t, step = w.cfg.train, state.step
    final = step == t.max_steps
    save = final or (t.checkpoint_every and step % t.checkpoint_every == 0)
    check = t.eval_every > 0 and (final or step % t.eval_every == 0)
    if not (final or save or check or step % t.report_every == 0):
        return
    sums = w.engine.all_reduce(window).tolist()  # the one host sync of the report window
    window.zero_()
    elapsed = time.perf_counter() - meter["start"]
    metrics = w.spec.window_metrics(sums, w.world)
    try:
        check_finite(metrics, grad_norm, step, w.engine.lr(), norm_known=w.cfg.scale.strategy != "deepspeed")  # every rank: same sums
    except Diverged as e:
        if w.rank == 0:
            runtime.note_diverged(w.cfg, str(e))
        raise
    metrics.update(
        step=step, epoch=state.epoch, tokens_seen=state.tokens_seen, lr=w.engine.lr(), grad_norm=grad_norm,
        tokens_per_s=meter["tokens"] / max(elapsed, 1e-9), student_params=models.count_params(w.engine.distiller.student),
    )
    if check:
        metrics["val_loss"] = _val_loss(w, w.val[: t.eval_blocks])
    state.history.append({k: round(v, 5) for k, v in metrics.items() if k in w.spec.report_terms or k in ("step", "tokens_per_s", "lr", "val_loss")})
    if w.rank == 0:
        eta = (t.max_steps - step) * elapsed / max(1, step - meter["first_step"])
        terms_txt = " ".join(f"{k} {metrics[k]:.4g}" for k in (*w.spec.report_terms, "val_loss") if k in metrics)
        print(f"raykd: step {step}/{t.max_steps}  {terms_txt}  {metrics['tokens_per_s']:.1f} tok/s  eta {runtime.fmt_eta(eta)}", flush=True)
    if not save:
        runtime.session().report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raykd-ckpt-") as d:
        checkpoint(w, state, Path(d), state.train_wall_s + elapsed, engine=not final or t.final_training_state)
        if final:
            metrics.update(export(w, state, state.train_wall_s + elapsed, metrics["tokens_per_s"], Path(d)))
        manifest.write(Path(d), w.rank, w.world, step)  # last: what this worker's part must hold
        runtime.session().report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def checkpoint(w: Worker, state: RunState, d: Path, wall: float, engine: bool = True) -> None:
    """The engine's training state (if `engine`) and this worker's `worker{rank}.pt` into `d` (every rank calls)."""
    if engine:
        w.engine.save(d, w.rank, state.step)
    cuda_rng = torch.cuda.get_rng_state(w.device) if w.device.type == "cuda" else None
    run = dataclasses.replace(state, train_wall_s=wall)
    torch.save({"state": dataclasses.asdict(run), "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "engine": engine}, d / WORKER_FILE.format(w.rank))


def export(w: Worker, state: RunState, wall: float, tokens_per_s: float, out: Path) -> dict:
    """Rank 0: the student as a plain HF model in `out/student`, metrics in `out/metrics.json`."""
    sd = w.engine.student_state(w.rank)
    nodes = runtime.worker_nodes(w.rank, w.world, w.engine.all_reduce, w.device)  # where the workers ran at the end
    if w.rank != 0:
        return {}
    from raykd.evaluate import evaluate_student

    cfg = w.cfg
    student = models.empty_model(w.engine.distiller.student.config, torch.float32)  # every weight is loaded next
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - models._tied_keys(student):
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    student.tie_weights()
    tok = models.load_tokenizer(w.teacher_dir, cfg.teacher.trust_remote_code)
    student.save_pretrained(out / "student")
    tok.save_pretrained(out / "student")
    student = models.load_model(out / "student", frozen=True).to(w.device)  # evaluate what users load
    if cfg.eval.final == "light":  # the student alone: no teacher load, no agreement, generation or tasks
        metrics = evaluate_student(student, w.val.to(w.device), batch_size=cfg.train.batch_size)
    else:
        w.teacher = None  # the engine hands its own over, or reloads one stored for autocast (freed first)
        teacher = w.engine.eval_teacher(lambda: models.load_model(w.teacher_dir, models.resolve_dtype(cfg.teacher.dtype), cfg.teacher.trust_remote_code, frozen=True))
        metrics = tasks.score_run(cfg, student, teacher, tok, w.val.to(w.device), w.teacher_dir)
    metrics["student_latency_ms"] = 1000.0 * w.val.shape[1] / metrics["student_tokens_per_s"]  # one block's forward
    metrics.update(
        init_val_perplexity=state.init_val_perplexity, tokens_seen=state.tokens_seen, tokens_per_s=tokens_per_s,
        train_wall_s=wall, steps=state.step, history=state.history, resumed_at=state.resumed_at, strategy=cfg.scale.strategy,
        num_workers=w.world, worker_phases=[dict(zip(("from_step", "workers", "grad_accum"), p)) for p in state.phases], precision=w.precision, device=runtime.device_name(w.device), worker_nodes=nodes,
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {k: v for k, v in metrics.items() if k != "history"}  # the learning curve stays in the file


# --- the driver ----------------------------------------------------------------------------


def run_datasets(cfg: Config, plan, datasets: tuple | None = None) -> dict:
    """{"train", "validation"} Ray Datasets of a resolved run (`datasets`: the pair a sweep built and checked
    once for all its trials); with `teacher.cache` the cached blocks, with the teacher's targets, are the train stream."""
    runtime.quiet_data_progress()
    train_ds, val_ds = datasets or pipeline.materialized(cfg.data, cfg.teacher.model, cfg.seed, cfg.teacher.trust_remote_code,
                                                         cfg.val_blocks, train=not cfg.teacher.cache)
    if cfg.teacher.cache:
        cache.require(cfg, plan)
        train_ds = cache_read.train_dataset(cfg, plan.objective, train_ds if datasets else None)
    return {"train": train_ds, "validation": val_ds}


def _shared_stand_ins(cfg: Config, plan) -> dict:
    """`student.dropped: linear`: the cut's maps (fitted by the plan, read from this node's cache) put once in the
    object store, so that every worker folds the same maps and none on another node fits them again."""
    import ray

    return {STAND_INS: ray.put(replace.maps_for(cfg, plan.teacher_dir, list(cfg.student.layers)))} if replace.applies(cfg) else {}


def build_trainer(cfg: Config, plan, log=print, callbacks: list | None = None, datasets: tuple | None = None):
    """A `TorchTrainer` for a resolved config and its `raykd.plan.Plan`: Ray Data shards (`run_datasets`), scaling,
    storage, failure policy."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.scale.worker_start_timeout_s:  # read by Ray Train's controller, which gets it from this process's environment at fit()
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.scale.worker_start_timeout_s:g}"
    sc = cfg.scale
    resources = runtime.worker_resources(sc)
    storage, name = runtime.run_storage(cfg)
    split = ["train"] if sc.elastic or sc.worker_range[0] > 1 else []  # one worker reads the whole stream: no split coordinator actor
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), **_shared_stand_ins(cfg, plan)},
        scaling_config=ScalingConfig(num_workers=sc.worker_range if sc.elastic else sc.worker_range[0], use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # raykd prints one progress line per report
            callbacks=callbacks,  # a sweep forwards the reports to Tune
        ),
        datasets=run_datasets(cfg, plan, datasets),
        # every worker streams its own shard of train; rank 0 reads validation whole; order is deterministic
        dataset_config=ray.train.DataConfig(datasets_to_split=split, execution_options=pipeline.ingest_options()),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
    )


def distill(cfg: Config, log=print) -> dict:
    """`raykd distill`: validate, start or join Ray, train, export OUTPUT/{student,metrics.json,config.yaml}."""
    from raykd.plan import check_inputs, resolve

    resolved, plan = resolve(cfg, log)
    check_inputs(resolved, resolved.teacher.model, log=log)  # bad corpora and tasks fail here, before Ray starts
    if resolved.teacher.cache:
        cache.ensure(resolved, plan, log)  # a mismatching cache is refused before Ray starts; a missing one is built
    how = runtime.init_ray(resolved, log=log)
    runtime.require_shared_storage(resolved, how)
    runtime.wait_for_workers(resolved, how, log)
    trainer = build_trainer(resolved, plan, log)
    result = runtime.fit_or_why(trainer, resolved)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / "metrics.json").exists():
            raise RuntimeError(f"the last checkpoint in {result.path} holds no exported student")
        manifest.publish(d / "student", out / "student")
        manifest.publish(d / "metrics.json", out / "metrics.json")
    (out / ".config.yaml.tmp").write_text(resolved.to_yaml())
    os.replace(out / ".config.yaml.tmp", out / "config.yaml")
    return json.loads((out / "metrics.json").read_text())
