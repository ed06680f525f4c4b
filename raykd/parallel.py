"""One training engine per parallel strategy: `ddp`, `fsdp2`, `deepspeed` (ZeRO 1/2/3).

The train loop calls the same methods whatever the strategy (`make_engine` picks the class):

    loss, terms = engine.forward(input_ids, teacher_out)     # the Distiller, wrapped
    engine.backward(loss, last_micro_step)                    # grad sync only on the last micro-step
    engine.micro_step(); grad_norm = engine.step()            # clip, optimizer, LR schedule
    engine.all_reduce(tensor)                                 # every collective, on the engine's device
    engine.save(directory, rank, step) / engine.load(directory, step)   # training state
    engine.student_state(rank)                                # full student weights on rank 0 (export)

The shared base owns device placement of student and teacher, the collectives (always on the
engine's device: NCCL takes CUDA tensors only), the optimizer and LR schedule (built once,
here) and autocast. Each strategy overrides only what differs:

* ddp: `DistributedDataParallel` over the Distiller (student + projections); gloo on CPU,
  NCCL on GPUs. Checkpoints hold full state dicts written by rank 0.
* fsdp2: `torch.distributed.fsdp.fully_shard` on every student decoder layer and on the
  Distiller root (embeddings, final norm, head and projections); optionally on the frozen
  teacher's decoder layers (`scale.shard_teacher`), whose embeddings and head stay whole
  because the fused loss reads the head weight outside the teacher's forward. State dicts
  are gathered with `torch.distributed.checkpoint.state_dict` (full, CPU offloaded), so a
  checkpoint resumes on any number of workers.
* deepspeed: `deepspeed.initialize` with a config generated from ours (or `scale.deepspeed_config`);
  the student's head weight is registered as an external parameter so ZeRO-3 gathers it
  for the fused loss. Checkpoints are DeepSpeed's own per-rank files.

Precision: fp32 master weights everywhere; `bf16` runs the forward passes under autocast
(same code path for all strategies). No Ray here: `torch.distributed` only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from raykd.build_locks import stale_build_locks_cleared
from raykd.capture import attention_module, decoder_layers, store_for_autocast
from raykd.config import ConfigError

OPTIM_FILE = "optimizer.pt"
MODEL_FILE = "distiller.pt"
DS_DIR = "deepspeed"


def checkpoint_activations(model) -> None:
    """Recompute `model`'s decoder layers in backward instead of keeping their activations
    (`train.activation_checkpointing`): HF's non-reentrant checkpointing, which wraps each layer's
    `forward` (not `__call__`), so module hooks on the layer (raykd's captures, FSDP2's gathers) stay
    outside it and run once. Non-reentrant keeps grad mode inside the layer: the q/k/v that
    `raykd.capture` takes from a checkpointed layer's projections carry their gradients. Active only
    while the model is in training mode with grad enabled (validation and sampling run as before)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support activation checkpointing; "
                          "set train.activation_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_unhooked(model) -> None:
    """`train.compile`: torch.compile each decoder layer's children except its attention (the MLP and the norms, in
    place). Inductor fuses their elementwise work (RMSNorm, SiLU x up); the layer and its attention stay eager
    because `raykd.capture` hooks them afresh every step, which a compiled graph would not see."""
    for layer in decoder_layers(model):
        attn = attention_module(layer)
        for child in layer.children():
            if child is not attn:
                child.compile()


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up to the peak, then cosine decay to `floor` x peak at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg, world_size: int) -> dict:
    """Our config as a DeepSpeed config (`scale.deepspeed_config` JSON replaces it, batch keys kept)."""
    t, s = cfg.train, cfg.scale
    if s.deepspeed_config:
        with open(s.deepspeed_config) as fh:
            ds = json.load(fh)
    else:
        ds = {"zero_optimization": {"stage": s.zero_stage}, "gradient_clipping": t.grad_clip or 0.0}
        if s.zero_stage == 3:
            ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0})
    ds.update({
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    return ds


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Engine:
    """The shared base: one process, or DDP when a process group exists (strategy `ddp`)."""

    fused_adamw: bool | None = True  # one in-place kernel over all parameters (no per-parameter temporaries)

    def __init__(self, distiller, teacher, cfg, device: torch.device, world_size: int, precision: str = "fp32"):
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.distiller = distiller.to(device)
        self.teacher = teacher
        self.teacher_stored = 0  # teacher parameters stored in the autocast dtype (raykd.capture.store_for_autocast)
        if cfg.train.compile:
            compile_unhooked(self.distiller.student)
        if cfg.train.activation_checkpointing:  # the student only (the teacher keeps no activations: no grad)
            checkpoint_activations(self.distiller.student)  # before wrap(): FSDP2's layer hooks stay outside it
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.place_teacher()
        self.model = self.wrap()
        self.optimizer, self.scheduler = self.build_optimizer()

    # what a strategy overrides ---------------------------------------------------------------
    shards_teacher = False  # FSDP2 with scale.shard_teacher: the teacher's layers are sharded (one dtype per unit)

    def place_teacher(self) -> None:
        if self.teacher is not None:  # None: a teacher cache serves the targets
            self.teacher.to(self.device)
            if not self.shards_teacher:  # bf16 runs: the teacher's matmul weights once in bf16, not cast per forward
                self.teacher_stored = store_for_autocast(self.teacher, self.autocast_dtype)

    def wrap(self):
        if not _distributed():
            return self.distiller
        from torch.nn.parallel import DistributedDataParallel

        d = self.distiller
        unused = "hidden" not in d.weights and len(d.projections.maps) > 0  # block-wise maps a subset
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(d, device_ids=ids, find_unused_parameters=unused)

    def build_optimizer(self):
        """AdamW and the warm-up + cosine schedule, built once for every strategy."""
        t = self.cfg.train
        optimizer = torch.optim.AdamW(self.distiller.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=self.fused_adamw)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps))

    def eval_teacher(self, load_full):
        """The teacher as one whole module for the final evaluation (`load_full()` loads one when the run
        holds none, from a teacher cache, or only shards of it)."""
        if self.teacher is not None and not self.teacher_stored:
            return self.teacher
        self.teacher = None  # one stored for autocast is reloaded in full precision (evaluation runs without autocast)
        return load_full().to(self.device)

    # the step ------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def sampling(self):
        """The context the student samples in on its own, outside the wrapped Distiller (on-policy KD,
        `raykd.onpolicy`): autocast; FSDP2 also gathers the Distiller root's parameters (embeddings, head)."""
        return self.autocast()

    def forward(self, input_ids: torch.Tensor, teacher_out, eval_ce: bool = False, data_mask: torch.Tensor | None = None):
        """The wrapped Distiller's (loss, terms); `data_mask` [B, T]: on-policy KD's data tokens (CE's positions)."""
        kwargs = {k: v for k, v in (("eval_ce", eval_ce or None), ("data_mask", data_mask)) if v is not None}
        with self.autocast():
            return self.model(input_ids, teacher_out, **kwargs)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        loss = loss / self.cfg.train.grad_accum
        if hasattr(self.model, "no_sync") and not last_micro_step:
            with self.model.no_sync():
                loss.backward()
        else:
            loss.backward()

    def micro_step(self) -> None:
        """Nothing between micro-steps (DeepSpeed counts them itself)."""

    def step(self) -> float:
        """Clip, step the optimizer and the LR schedule; the global grad norm before clipping."""
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over workers in place (a no-op on one process); it must live on the engine's device."""
        if (tensor.device.type, tensor.device.index or 0) != (self.device.type, self.device.index or 0):
            raise RuntimeError(f"all_reduce: tensor on {tensor.device}, the engine runs on {self.device}")
        if _distributed():
            dist.all_reduce(tensor)
        return tensor

    # state -----------------------------------------------------------------------------------
    def save(self, directory: Path, rank: int, step: int) -> None:
        """Student + projections + optimizer + LR schedule into `directory` (every rank calls)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.distiller, options=opts)
        optim_sd = get_optimizer_state_dict(self.distiller, self.optimizer, options=opts)
        if rank == 0:
            torch.save(model_sd, Path(directory) / MODEL_FILE)
            torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict()}, Path(directory) / OPTIM_FILE)

    def load(self, directory: Path, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
        extra = torch.load(Path(directory) / OPTIM_FILE, map_location="cpu", weights_only=True)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.distiller, model_sd, options=opts)
        set_optimizer_state_dict(self.distiller, self.optimizer, extra["optimizer"], options=opts)
        self.scheduler.load_state_dict(extra["scheduler"])

    def student_state(self, rank: int) -> dict | None:
        """The student's full state dict on CPU for rank 0 (None elsewhere); every rank calls."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.distiller, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}


class FSDP2Engine(Engine):
    """Student decoder layers and the Distiller root sharded with `fully_shard`; optionally the teacher's layers."""

    def __init__(self, *args, **kwargs):
        self.fused_adamw = not _distributed()  # FSDP2's sharded DTensors keep AdamW's default loop
        super().__init__(*args, **kwargs)

    @property
    def shards_teacher(self) -> bool:
        return self.cfg.scale.shard_teacher and _distributed()

    def place_teacher(self) -> None:
        super().place_teacher()
        if self.shards_teacher and self.teacher is not None:
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(self.teacher):
                fully_shard(layer, mesh=self.mesh)

    @functools.cached_property
    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))

    def wrap(self):
        if not _distributed():
            return self.distiller
        from torch.distributed.fsdp import fully_shard

        mesh = self.mesh
        for layer in decoder_layers(self.distiller.student):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.distiller, mesh=mesh)
        return self.distiller

    @contextlib.contextmanager
    def sampling(self):
        root = self.distiller if _distributed() else None  # fully_shard'ed only with a process group
        if root is not None:
            # FSDP takes the first module to run forward as its root: make it the Distiller before a decoder
            # layer runs alone (no forward through the Distiller yet when the first micro-batch samples)
            root._get_fsdp_state()._lazy_init()
            root.unshard()  # embeddings, final norm, head; the decoder layers gather their own shards in their forwards
        try:
            with self.autocast():
                yield
        finally:
            if root is not None:
                root.reshard()

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last_micro_step)
        (loss / self.cfg.train.grad_accum).backward()

    def eval_teacher(self, load_full):
        return load_full().to(self.device) if self.shards_teacher else super().eval_teacher(load_full)


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` over the Distiller with our optimizer and schedule; ZeRO stage from the config."""

    fused_adamw = None  # AdamW's default implementation: DeepSpeed wraps the optimizer itself

    def wrap(self):
        import deepspeed

        # ZeRO-3 partitions every weight; the fused loss reads the head weight outside its module
        deepspeed.zero.register_external_parameter(self.distiller, self.distiller.student.get_output_embeddings().weight)
        return self.distiller  # replaced by DeepSpeed's engine when the optimizer is built (below)

    def build_optimizer(self):
        import deepspeed

        optimizer, scheduler = super().build_optimizer()
        with stale_build_locks_cleared():  # deepspeed.initialize JIT-builds its CPU collective under a lock
            self.model, optimizer, _, scheduler = deepspeed.initialize(
                model=self.distiller, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(self.cfg, self.world_size), dist_init_required=False,
            )
        return optimizer, scheduler

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum and syncs at the boundary

    def micro_step(self) -> None:
        self.model.step()  # DeepSpeed counts micro-steps and steps at the accumulation boundary

    def step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path, rank: int, step: int) -> None:
        self.model.save_checkpoint(str(Path(directory) / DS_DIR), tag=f"step{step}")

    def load(self, directory: Path, step: int) -> None:
        self.model.load_checkpoint(str(Path(directory) / DS_DIR), tag=f"step{step}")

    def student_state(self, rank: int) -> dict | None:
        import deepspeed

        student = self.distiller.student
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()} if rank == 0 else None


ENGINES = {"ddp": Engine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}


def make_engine(distiller, teacher, cfg, device: torch.device, world_size: int, precision: str = "fp32") -> Engine:
    """The engine of `cfg.scale.strategy` around the Distiller and the frozen teacher."""
    return ENGINES[cfg.scale.strategy](distiller, teacher, cfg, device, world_size, precision)
