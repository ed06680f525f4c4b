"""One training engine over three parallel strategies: `ddp`, `fsdp2`, `deepspeed` (ZeRO 1/2/3).

The train loop calls the same five methods whatever the strategy:

    loss, terms = engine.forward(input_ids, teacher_out)     # the Distiller, wrapped
    engine.backward(loss, last_micro_step)                    # grad sync only on the last micro-step
    grad_norm = engine.step()                                 # clip, optimizer, LR schedule
    engine.save(directory, rank) / engine.load(directory)     # training state (not the export)
    engine.student_state(rank)                                # full student weights on rank 0

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
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from raykd.capture import decoder_layers

OPTIM_FILE = "optimizer.pt"
MODEL_FILE = "distiller.pt"
DS_DIR = "deepspeed"


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


class Engine:
    """The Distiller wrapped for `cfg.scale.strategy`, with its optimizer and LR schedule."""

    def __init__(self, distiller, teacher, cfg, device: torch.device, world_size: int):
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.strategy = cfg.scale.strategy
        self.distiller = distiller.to(device)
        self.teacher = teacher
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        t = cfg.train
        schedule = lr_lambda(t.warmup_steps, t.max_steps)
        distributed = dist.is_available() and dist.is_initialized()
        if self.strategy == "deepspeed":
            import deepspeed

            # ZeRO-3 partitions every weight; the fused loss reads the head weight outside its module
            deepspeed.zero.register_external_parameter(self.distiller, self.distiller.student.get_output_embeddings().weight)
            optimizer = torch.optim.AdamW(self.distiller.parameters(), lr=t.lr, weight_decay=t.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.distiller, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(cfg, world_size), dist_init_required=False,
            )
            return
        if self.strategy == "fsdp2" and distributed:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world_size,))
            for layer in decoder_layers(self.distiller.student):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.distiller, mesh=mesh)
            if cfg.scale.shard_teacher:
                teacher.to(device)
                for layer in decoder_layers(teacher):
                    fully_shard(layer, mesh=mesh)
            self.model = self.distiller
        elif distributed:
            from torch.nn.parallel import DistributedDataParallel

            unused = "hidden" not in distiller.weights and len(distiller.projections.maps) > 0  # block-wise maps a subset
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.distiller, device_ids=ids, find_unused_parameters=unused)
        else:
            self.model = self.distiller
        # fused AdamW (one kernel over all parameters) updates in place: no per-parameter temporaries, which on a
        # CPU were a transient of ~0.4 GB for a 64 M student; FSDP2's sharded DTensors keep the default loop
        fused = not (self.strategy == "fsdp2" and distributed)
        self.optimizer = torch.optim.AdamW(self.distiller.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # the step ------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, input_ids: torch.Tensor, teacher_out, eval_ce: bool = False):
        with self.autocast():
            return self.model(input_ids, teacher_out, eval_ce=eval_ce) if eval_ce else self.model(input_ids, teacher_out)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        if self.strategy == "deepspeed":
            self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum and syncs at the boundary
            return
        loss = loss / self.cfg.train.grad_accum
        if self.model is self.distiller and self.strategy == "fsdp2" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last_micro_step)
            loss.backward()
        elif hasattr(self.model, "no_sync") and not last_micro_step:
            with self.model.no_sync():
                loss.backward()
        else:
            loss.backward()

    def micro_step(self) -> None:
        """DeepSpeed counts micro-steps itself and steps at the accumulation boundary."""
        if self.strategy == "deepspeed":
            self.model.step()

    def step(self) -> float:
        """Clip, step the optimizer and the LR schedule; the global grad norm before clipping."""
        if self.strategy == "deepspeed":
            norm = self.model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
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

    # state -----------------------------------------------------------------------------------
    def save(self, directory: Path, rank: int, step: int) -> None:
        """Student + projections + optimizer + LR schedule into `directory` (every rank calls)."""
        directory = Path(directory)
        if self.strategy == "deepspeed":
            self.model.save_checkpoint(str(directory / DS_DIR), tag=f"step{step}")
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.distiller, options=opts)
        optim_sd = get_optimizer_state_dict(self.distiller, self.optimizer, options=opts)
        if rank == 0:
            torch.save(model_sd, directory / MODEL_FILE)
            torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict()}, directory / OPTIM_FILE)

    def load(self, directory: Path, step: int) -> None:
        directory = Path(directory)
        if self.strategy == "deepspeed":
            self.model.load_checkpoint(str(directory / DS_DIR), tag=f"step{step}")
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
        extra = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=True)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.distiller, model_sd, options=opts)
        set_optimizer_state_dict(self.distiller, self.optimizer, extra["optimizer"], options=opts)
        self.scheduler.load_state_dict(extra["scheduler"])

    def student_state(self, rank: int) -> dict | None:
        """The student's full state dict on CPU for rank 0 (None elsewhere); every rank calls."""
        student = self.distiller.student
        if self.strategy == "deepspeed":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()} if rank == 0 else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        sd = get_model_state_dict(self.distiller, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
