"""Ray Train: `train_loop_per_worker(config)` runs the teacher-student step on every worker;
`build_trainer(cfg)` wraps it in a `TorchTrainer`; `distill(cfg)` is `raykd distill`.

The loop is the same on a laptop and on a cluster; every knob comes from `config` (a plain
dict of the resolved `Config`: the driver turns `student.init: importance` into the explicit
list of kept layers and the layer map into explicit pairs before any worker starts).

Per step: teacher forward (no grad, captures only what the active terms need) -> Distiller
forward (student + projections, the multi-task loss) -> backward with gradient accumulation
-> clip, AdamW, warm-up + cosine LR. Every `train.report_every` steps all workers call
`ray.train.report` with the loss terms averaged over the window and all workers, tokens/s
and, every `train.checkpoint_every` steps and at the end, a checkpoint: student +
projections + optimizer + LR schedule (`raykd.parallel.Engine.save`), each worker's RNG
state and data position, tokens seen. Ray registers a checkpoint only once every worker
has uploaded its part, so a half-written one is never resumed from. Running the same
command again (same `output_dir`) resumes from the latest checkpoint; a killed worker
restarts the group from it (`scale.max_failures`).

At the end rank 0 gathers the student, saves it as a plain HF model and evaluates it
against the teacher on the validation blocks; both travel in the final checkpoint, which
the driver copies to `OUTPUT/student/` and `OUTPUT/metrics.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from raykd import models
from raykd.data import cache
from raykd.config import Config, from_dict
from raykd.layer_map import layer_map
from raykd.objective import Distiller, teacher_forward

TERMS = ("loss", "ce", "kd", "hidden", "attention", "relation", "blockwise")


def _threads(cfg: Config, local_world: int) -> int:
    return cfg.scale.torch_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))


def _precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if models.bf16_is_fast() else "fp32"


def _build_models(cfg: Config, device: torch.device):
    trc = cfg.teacher.trust_remote_code
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log=lambda m: None)
    teacher = models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), trc, frozen=True)
    if cfg.student.model:
        student = models.load_model(models.resolve_model(cfg.student.model, "student.model"), torch.float32, trc)
        student.requires_grad_(True).train()
    else:
        student = models.cut_student(teacher, cfg.student.layers, dtype=torch.float32)
    lm = cfg.layer_map
    pairs = layer_map(lm.strategy, models.num_layers(teacher.config), models.num_layers(student.config),
                      cfg.student.layers if not cfg.student.model else None, lm.pairs, lm.num_pairs)
    distiller = Distiller(student, cfg.loss, pairs, teacher.config.hidden_size, models.num_layers(teacher.config))
    if not (cfg.scale.strategy == "fsdp2" and cfg.scale.shard_teacher):
        teacher.to(device)
    return teacher_dir, teacher, distiller


def _val_blocks(max_blocks: int) -> torch.Tensor:
    import ray.train

    out, n = [], 0
    for batch in ray.train.get_dataset_shard("validation").iter_torch_batches(batch_size=min(32, max_blocks), dtypes=torch.long):
        out.append(batch["input_ids"])
        n += len(out[-1])
        if n >= max_blocks:
            break
    return torch.cat(out)[:max_blocks]


class _Batches:
    """Endless micro-batches from this worker's shard, epoch after epoch; resumable by position.
    Yields input_ids [B, T] long, or with `cached` the numpy batch of teacher-cache rows."""

    def __init__(self, batch_size: int, epoch: int = 0, skip: int = 0, cached: bool = False):
        import ray.train

        self.shard = ray.train.get_dataset_shard("train")
        self.batch_size, self.epoch, self.index, self._skip, self.cached = batch_size, epoch, 0, skip, cached
        self._it = None

    def _iter(self):
        if self.cached:
            return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True))
        return (b["input_ids"] for b in self.shard.iter_torch_batches(batch_size=self.batch_size, dtypes=torch.long, drop_last=True))

    def __next__(self):
        while True:
            if self._it is None:
                self._it = self._iter()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    raise RuntimeError("data.train: a worker's shard holds fewer blocks than one batch; lower train.batch_size or add text") from None
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
                continue
            self.index += 1
            if self._skip:  # resuming: replay the data position of the checkpoint
                self._skip -= 1
                continue
            return batch


def _val_loss(engine, blocks: torch.Tensor, rank: int, world: int, batch_size: int, device) -> float:
    """Mean next-token CE (nats) of the student on `blocks` [N, T] (no teacher forward); every
    rank takes its share (sharded strategies need every rank in every forward), sums all-reduced."""
    import torch.distributed as dist

    if len(blocks) < world:  # too few blocks for one each: repeat them
        blocks = blocks.repeat(world, 1)
    mine = blocks[: len(blocks) // world * world][rank::world]
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for ids in mine.split(batch_size):
            _, terms = engine.forward(ids.to(device), None, eval_ce=True)
            sums += torch.tensor([float(terms["ce"]) * len(ids), len(ids)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(config: dict) -> None:
    """One worker of a distillation run; `config` is `Config.to_dict()` of the resolved config."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from raykd.parallel import Engine

    cfg = from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg, ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    cfg.train.precision = _precision(cfg, device)
    torch.manual_seed(cfg.seed)  # identical model init on every rank
    teacher_dir, teacher, distiller = _build_models(cfg, device)
    periodic = cfg.train.eval_every > 0
    val = _val_blocks(max(cfg.data.max_val_blocks, cfg.train.eval_blocks)) if (rank == 0 or periodic) else None
    state = {"step": 0, "tokens_seen": 0, "train_wall_s": 0.0, "epoch": 0, "batch_index": 0, "init_val_perplexity": None, "history": [], "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and rank == 0:
        from raykd.evaluate import perplexity

        state["init_val_perplexity"] = perplexity(distiller.student.to(device), val.to(device), batch_size=cfg.train.batch_size)
    needs = distiller.teacher_needs()
    engine = Engine(distiller, teacher, cfg, device, world)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / "state.json").read_text())
            mine = Path(d) / f"worker{rank}.json"
            position = json.loads(mine.read_text()) if mine.exists() else {"epoch": saved["epoch"], "batch_index": saved["batch_index"]}
            engine.load(Path(d), saved["step"])
            rng = Path(d) / f"rng{rank}.pt"
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=True))
        state.update(saved, **position)
        state["resumed_at"] = state.get("resumed_at", []) + [state["step"]]  # restarts: a rerun or a failed worker
        if rank == 0:
            print(f"raykd: resuming from step {state['step']} ({state['tokens_seen']} tokens seen)", flush=True)
    cached = bool(cfg.teacher.cache)  # read the teacher's targets from the cache instead of running it
    vocab = teacher.get_output_embeddings().weight.shape[0]
    batches = _Batches(cfg.train.batch_size, state["epoch"], state["batch_index"], cached)
    t = cfg.train
    block = cfg.data.block_size
    tokens_per_step = t.batch_size * block * t.grad_accum * world
    student_params = models.count_params(distiller.student)  # in every report: a sweep objective even for stopped trials
    window = torch.zeros(len(TERMS) + 1, dtype=torch.float64)  # term sums + micro-step count
    run_start, run_tokens = time.perf_counter(), 0
    step = start_step = state["step"]
    while step < t.max_steps:
        for micro in range(t.grad_accum):
            if cached:
                ids, t_out = cache.teacher_outputs(next(batches), cfg, vocab, device)
            else:
                ids, t_out = next(batches).to(device), None
                if distiller.uses_teacher:  # a CE-only run (a baseline) never runs the teacher
                    with engine.autocast():
                        t_out = teacher_forward(teacher, ids, needs)
            loss, terms = engine.forward(ids, t_out)
            engine.backward(loss, micro == t.grad_accum - 1)
            engine.micro_step()
            window[:-1] += torch.tensor([float(terms.get(k, 0.0)) for k in TERMS], dtype=torch.float64)
            window[-1] += 1
        grad_norm = engine.step()
        step += 1
        run_tokens += tokens_per_step
        state.update(step=step, tokens_seen=state["tokens_seen"] + tokens_per_step, epoch=batches.epoch, batch_index=batches.index)
        final = step == t.max_steps
        save = final or (t.checkpoint_every and step % t.checkpoint_every == 0)
        check = periodic and (final or step % t.eval_every == 0)
        if not (final or save or check or step % t.report_every == 0):
            continue
        if dist.is_initialized():
            dist.all_reduce(window)
        now = time.perf_counter()
        elapsed_run = now - run_start
        metrics = {k: window[i].item() / max(1.0, window[-1].item()) for i, k in enumerate(TERMS) if k == "loss" or k in distiller.weights}
        metrics.update(
            step=step, epoch=batches.epoch, tokens_seen=state["tokens_seen"], lr=engine.lr(), grad_norm=grad_norm,
            tokens_per_s=run_tokens / max(elapsed_run, 1e-9), student_params=student_params,
        )
        window.zero_()
        if check:
            metrics["val_loss"] = _val_loss(engine, val[: t.eval_blocks], rank, world, t.batch_size, device)
        state["history"].append({k: round(v, 5) for k, v in metrics.items() if k in TERMS or k in ("step", "tokens_per_s", "lr", "val_loss")})
        if rank == 0:
            eta = (t.max_steps - step) * elapsed_run / (run_tokens / tokens_per_step)
            terms_txt = " ".join(f"{k} {metrics[k]:.4g}" for k in (*TERMS, "val_loss") if k in metrics)
            print(f"raykd: step {step}/{t.max_steps}  {terms_txt}  {metrics['tokens_per_s']:.1f} tok/s  eta {_fmt_eta(eta)}", flush=True)
        if not save:
            ray.train.report(metrics)
            continue
        wall = state["train_wall_s"] + elapsed_run
        with tempfile.TemporaryDirectory(prefix="raykd-ckpt-") as d:
            d = Path(d)
            engine.save(d, rank, step)
            torch.save(torch.get_rng_state(), d / f"rng{rank}.pt")
            (d / f"worker{rank}.json").write_text(json.dumps({"epoch": batches.epoch, "batch_index": batches.index}))
            if rank == 0:
                (d / "state.json").write_text(json.dumps({**state, "train_wall_s": wall}))
            if final:
                metrics.update(_export_and_evaluate(engine, teacher, teacher_dir, cfg, state, wall, run_tokens / max(elapsed_run, 1e-9), val, rank, device, d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    if start_step >= t.max_steps:  # finished before: nothing to redo, the last checkpoint holds the export
        ray.train.report({"step": step, "tokens_seen": state["tokens_seen"]})


def _export_and_evaluate(engine, teacher, teacher_dir, cfg, state, wall, tokens_per_s, val, rank, device, out: Path) -> dict:
    """Rank 0: the student as a plain HF model in `out/student`, metrics in `out/metrics.json`."""
    sd = engine.student_state(rank)
    if rank != 0:
        return {}
    from transformers import AutoModelForCausalLM

    from raykd.evaluate import evaluate_pair

    student_config = engine.distiller.student.config
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - models._tied_keys(student):
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    student.tie_weights()
    tok = models.load_tokenizer(teacher_dir, cfg.teacher.trust_remote_code)
    student.save_pretrained(out / "student")
    tok.save_pretrained(out / "student")
    student = models.load_model(out / "student", frozen=True).to(device)  # evaluate what users load
    if cfg.scale.strategy == "fsdp2" and cfg.scale.shard_teacher:
        teacher = models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), cfg.teacher.trust_remote_code, frozen=True).to(device)
    metrics = evaluate_pair(student, teacher, tok, val.to(device), batch_size=cfg.train.batch_size, generation=cfg.train.generation_eval)
    metrics["student_latency_ms"] = 1000.0 * val.shape[1] / metrics["student_tokens_per_s"]  # one block's forward
    metrics.update(
        init_val_perplexity=state["init_val_perplexity"], tokens_seen=state["tokens_seen"], tokens_per_s=tokens_per_s,
        train_wall_s=wall, steps=state["step"], history=state["history"], resumed_at=state["resumed_at"], strategy=cfg.scale.strategy, num_workers=cfg.scale.num_workers,
        precision=cfg.train.precision, device=_device_name(device),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {k: v for k, v in metrics.items() if k != "history"}  # the learning curve stays in the file


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


# --- the driver ----------------------------------------------------------------------------


def resolve(cfg: Config, log=print):
    """Validate and make the run explicit: kept layers and layer-map pairs written into the config."""
    from raykd.plan import build_plan

    plan = build_plan(cfg, log)
    d = cfg.to_dict()
    if plan.kept is not None:
        d["student"].update(init="list", layers=list(plan.kept))
    d["layer_map"].update(strategy="list", pairs=[list(p) for p in plan.pairs], num_pairs=None)
    return from_dict(d), plan


def init_ray(cfg: Config, runs: int = 1, per_run_extra: float = 0.0, log=print) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local instance with
    enough logical CPUs for `runs` concurrent runs' train workers (+ `per_run_extra` each, e.g. a
    Tune trial process) plus one for Ray Data tasks (no deadlock on 2 cores). When a Ray instance
    already runs on this machine (`ray start --head`), Ray finds it and raykd joins it as it is,
    after checking that it has those CPUs (a one-line error otherwise, not a run that waits forever)."""
    import math

    import ray

    from raykd.config import ConfigError

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    need = math.ceil(runs * (cfg.scale.num_workers * cfg.scale.cpus_per_worker + per_run_extra)) + 1
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, need))  # (the dashboard's State API is what Train's cleanup polls)
        return
    except ValueError as e:  # Ray found a running local instance, which cannot be re-sized from here
        if "existing cluster" not in str(e):
            raise
    ray.init()
    have = ray.cluster_resources().get("CPU", 0.0)
    address = ray.get_runtime_context().gcs_address
    if have < need:
        ray.shutdown()
        raise ConfigError(f"scale: the Ray instance already running here ({address}) has {have:g} CPUs and this run needs "
                          f"{need} (workers x cpus_per_worker + 1 for Ray Data); start it with more (`ray start --head "
                          f"--num-cpus={need}`), stop it, or lower scale.num_workers / scale.cpus_per_worker")
    log(f"raykd: joined the Ray instance already running on this machine ({address}, {have:g} CPUs)")


def build_trainer(cfg: Config, log=print, callbacks: list | None = None):
    """A `TorchTrainer` for a resolved config: Ray Data shards, scaling, storage, failure policy."""
    import ray.train
    from ray.data import DataContext
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.data import pipeline

    ctx = DataContext.get_current()  # raykd prints its own progress lines; Data's bars would bury them
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    sc = cfg.scale
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log)
    train_ds, val_ds = pipeline.build_datasets(cfg.data, str(teacher_dir), cfg.seed, cfg.teacher.trust_remote_code)
    if cfg.teacher.cache:  # the cached blocks (with the teacher's targets) replace the train stream
        cache.require(cfg, teacher_dir)
        train_ds = cache.train_dataset(cfg)
    else:
        pipeline.check_blocks(train_ds, "data.train")
    pipeline.check_blocks(val_ds, "data.validation")
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}
    out = Path(cfg.output_dir).resolve()
    storage, name = (sc.storage_path, out.name) if sc.storage_path else (str(out), "train")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # raykd prints one progress line per report
            callbacks=callbacks,  # a sweep forwards the reports to Tune
        ),
        datasets={"train": train_ds, "validation": val_ds},
        # every worker streams its own shard of train; rank 0 reads validation whole; order is deterministic
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=pipeline.ingest_options()),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
    )


def _replace(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a sibling temporary, then swap: no half-written output."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        old = dst.with_name(f".{dst.name}.old")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def distill(cfg: Config, log=print) -> dict:
    """`raykd distill`: validate, start or join Ray, train, export OUTPUT/{student,metrics.json,config.yaml}."""
    from raykd.data import pipeline

    resolved, plan = resolve(cfg, log)
    pipeline.preflight(cfg.data)  # bad corpora fail here, before Ray starts
    if resolved.teacher.cache:
        cache.ensure(resolved, log)  # a mismatching cache is refused before Ray starts; a missing one is built
    init_ray(resolved, log=log)
    trainer = build_trainer(resolved, log)
    result = trainer.fit()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / "metrics.json").exists():
            raise RuntimeError(f"the last checkpoint in {result.path} holds no exported student")
        _replace(d / "student", out / "student")
        _replace(d / "metrics.json", out / "metrics.json")
    (out / ".config.yaml.tmp").write_text(resolved.to_yaml())
    os.replace(out / ".config.yaml.tmp", out / "config.yaml")
    return json.loads((out / "metrics.json").read_text())
