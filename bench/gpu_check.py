"""GPU check: raykd's engine and objective on one CUDA GPU with NCCL, then the student-step MFU.

For a CUDA machine with only what such machines usually carry (torch with CUDA, transformers;
no Ray, no DeepSpeed, no package registry, no teacher weights): models are built with random
weights from the real configs (SmolLM2-135M's, and a ~1.7B Llama shape, SmolLM2-1.7B's). It
drives `raykd.parallel` and `raykd.objective` directly with `torch.distributed` (NCCL, world
size 1: enough to catch a CPU tensor in a collective, which NCCL refuses):

1. ddp and fsdp2 steps with the full multi-task loss (CE + forward KL through the fused head,
   cosine hidden, attention maps from captured q/k) under bf16 autocast; the report window and
   the validation loss reduced as the train loop reduces them (`Engine.all_reduce`,
   `raykd.evaluate.nll_sums`); every collective's tensor checked to be on the GPU;
2. a checkpoint save/load round trip of the engine (student, projections, optimizer, schedule);
3. the distillation step itself (teacher forward + the full loss + the student's backward and AdamW) of the
   135 M teacher and its uniform 10-layer cut at the student step's batch: `kd_tok_s_135m`;
4. the student step (CE through the fused head, forward + backward + AdamW, bf16 autocast, fp32
   master weights) of both shapes: tokens/s and MFU = FLOPs/token (6·N_matmul + causal attention,
   `raykd.plan.kd_flops_per_token`'s student term) × tokens/s / the GPU's dense bf16 peak.

The last line holds the figures as name=value (goal: student-step MFU >= 0.40 for the 1.7B
shape on an H100/H200). On a machine without CUDA it prints one line and exits 0; `--dry-run`
runs the same code on the CPU with gloo and a tiny shape (what the test suite does).

    python bench/gpu_check.py [--steps 10] [--batch 4] [--seq 2048] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # raykd from this checkout: no install on a bare GPU machine

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LLAMA = {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
SHAPES = {  # the real configs' shapes (SmolLM2-135M-Instruct, SmolLM2-1.7B), random weights
    "135m": {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "rope_theta": 100000.0},
    "1p7b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "rope_theta": 130000.0},
    "tiny": {**LLAMA, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0},
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guard_collectives(device: torch.device) -> list[str]:
    """Wrap dist.all_reduce / broadcast / all_gather_into_tensor: record any tensor not on `device`."""
    bad: list[str] = []
    for name in ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(dist, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            for t in [*args, *kwargs.values()]:
                if torch.is_tensor(t) and t.device.type != device.type:
                    bad.append(f"{_name} got a {t.device} tensor")
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)
    return bad


def _model(shape: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**SHAPES[shape])
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _cfg(strategy: str, weights: dict, batch: int, seq: int, steps: int, compile_layers: bool = False):
    from raykd.config import from_dict

    return from_dict({
        "teacher": {"model": "tiny-random"}, "student": {"init": "list", "layers": [0, 2, 4]},
        "loss": {"kd": "forward_kl", "hidden": "cosine", "weights": weights},
        "data": {"block_size": seq}, "scale": {"strategy": strategy},
        "train": {"max_steps": steps, "batch_size": batch, "warmup_steps": 1, "lr": 1e-4, "precision": "bf16",
                  "compile": compile_layers},
    })


def multitask_steps(strategy: str, shape: str, device, precision: str, batch: int, seq: int, steps: int,
                    compile_layers: bool = False) -> dict:
    """A few steps of the full objective through the engine, the train loop's reductions, a checkpoint round trip."""
    from raykd import models
    from raykd.evaluate import nll_sums
    from raykd.layer_map import layer_map, select_layers
    from raykd.objective import Distiller, teacher_forward
    from raykd.parallel import make_engine

    torch.manual_seed(0)
    teacher = _model(shape).requires_grad_(False).eval()
    depth = models.num_layers(teacher.config)
    kept = select_layers("uniform", depth, max(2, depth // 3))
    weights = {"ce": 1.0, "kd": 1.0, "hidden": 1.0, "attention": 1.0}
    cfg = _cfg(strategy, weights, batch, seq, steps, compile_layers)

    def engine_for(seed: int):
        torch.manual_seed(seed)
        student = models.cut_student(teacher, kept, dtype=torch.float32)
        d = Distiller.build(student, cfg.loss, layer_map("kept", depth, len(kept), kept), teacher.config.hidden_size, depth)
        return make_engine(d, teacher, cfg, device, 1, precision)

    engine = engine_for(0)
    spec = engine.distiller.spec
    window = torch.zeros(len(spec.report_terms) + 1, dtype=torch.float64, device=device)
    vocab = teacher.config.vocab_size
    times = []
    for i in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        _sync(device)
        t0 = time.perf_counter()
        with engine.autocast():
            t_out = teacher_forward(engine.teacher, ids, spec.teacher_needs())
        loss, terms = engine.forward(ids, t_out)
        engine.backward(loss, True)
        engine.micro_step()
        engine.step()
        window[:-1] += torch.stack([terms[k] for k in spec.report_terms]).double()
        window[-1] += 1
        _sync(device)
        if i >= min(3, steps - 1):  # up to 3 warm-up steps
            times.append(time.perf_counter() - t0)
    sums = engine.all_reduce(window).tolist()
    val = torch.randint(0, vocab, (2 * batch, seq))

    def score(x):
        return engine.forward(x.to(device), None, eval_ce=True)[1]["ce"].double() * x[:, 1:].numel()

    with torch.no_grad():
        nll, count = nll_sums(score, val, batch, 0, 1, engine.all_reduce, device)
    with tempfile.TemporaryDirectory() as d:
        engine.save(Path(d), 0, steps)
        other = engine_for(1)
        other.load(Path(d), steps)
        same = all(torch.equal(a, b) for a, b in zip(engine.distiller.state_dict().values(), other.distiller.state_dict().values()))
    ok = all(v == v and abs(v) != float("inf") for v in sums) and count == val.shape[0] * (seq - 1) and nll == nll
    return {"terms": {k: sums[i] / sums[-1] for i, k in enumerate(spec.report_terms)}, "val_loss": nll / count, "ok": ok,
            "checkpoint_ok": same, "tokens_per_s": batch * seq / sorted(times)[len(times) // 2], "student_layers": len(kept)}


def student_step(shape: str, device, precision: str, batch: int, seq: int, steps: int, profile: bool = False,
                 compile_layers: bool = False) -> dict:
    """tokens/s and FLOPs/token of the CE student step (fused head) of one shape, fp32 master weights."""
    from raykd.plan import kd_flops_per_token, model_info

    model = _model(shape)
    info = model_info(model.config, shape, "")
    flops = kd_flops_per_token(info, info, seq)["student_step"]
    cfg = _cfg("ddp", {"ce": 1.0, "kd": 0.0}, batch, seq, steps + 3, compile_layers)
    from raykd.objective import Distiller
    from raykd.parallel import make_engine

    depth = model.config.num_hidden_layers
    engine = make_engine(Distiller.build(model.train(), cfg.loss, [(depth - 1, depth - 1)], model.config.hidden_size, depth),
                         None, cfg, device, 1, precision)  # CE only: no teacher
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (allocator, kernels' first calls)
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = engine.forward(ids, None)
        engine.backward(loss, True)
        engine.step()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    if profile:  # where one more step's time goes: the ops with the most self time on the device
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            loss, _ = engine.forward(ids, None)
            engine.backward(loss, True)
            engine.step()
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": batch * seq / step_s, "flops_per_token": flops, "params": info.params}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    p.add_argument("--dry-run", action="store_true", help="CPU + gloo + a tiny shape: the code paths without a GPU")
    p.add_argument("--compile", action="store_true", help="train.compile: the student layers' MLPs and norms torch.compile'd")
    p.add_argument("--profile", action="store_true", help="print the top ops of one student step per shape")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on a GPU, fp32 in a dry run")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check. Run it on a GPU machine.")
        return 0
    device = torch.device("cpu") if a.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend, precision = ("gloo", "fp32") if a.dry_run else ("nccl", "bf16")
    precision = a.precision or precision
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    bad = _guard_collectives(device)
    name = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name(device)
    shapes = ("tiny", "tiny") if a.dry_run else ("135m", "1p7b")
    seq, batch = (16, 2) if a.dry_run else (a.seq, a.batch)
    t0 = time.perf_counter()
    figures: dict[str, object] = {}
    for strategy in ("ddp", "fsdp2"):
        r = multitask_steps(strategy, shapes[0], device, precision, batch if a.dry_run else 4, seq if a.dry_run else 512, 3, a.compile)
        print(f"gpu_check: {strategy} multi-task steps: terms {r['terms']}, val_loss {r['val_loss']:.4f}, checkpoint round trip {'ok' if r['checkpoint_ok'] else 'DIFFERS'}", flush=True)
        figures[f"{strategy}_ok"] = int(r["ok"] and r["checkpoint_ok"] and not bad)
    # the distillation step itself: teacher forward + the 10-of-30-layer student's CE + KL + hidden + attention step
    r = multitask_steps("ddp", shapes[0], device, precision, batch, seq, 2 if a.dry_run else a.steps + 3, a.compile)
    print(f"gpu_check: KD step, {shapes[0]} teacher -> its {r['student_layers']}-layer cut,"
          f" {batch} x {seq}: {r['tokens_per_s']:,.0f} tok/s", flush=True)
    figures["kd_tok_s_135m"] = round(r["tokens_per_s"], 1)
    peak = None if a.dry_run else _peak(name, a.peak_tflops)
    for shape, tag in zip(shapes, ("135m", "1p7b")):
        r = student_step(shape, device, precision, batch, seq, 2 if a.dry_run else a.steps, a.profile, a.compile)
        mfu = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else float("nan")
        print(f"gpu_check: student step {shape} ({r['params'] / 1e6:.0f} M params): {r['tokens_per_s']:,.0f} tok/s, MFU {mfu:.3f}", flush=True)
        figures[f"tok_s_{tag}"] = round(r["tokens_per_s"], 1)
        figures[f"mfu_{tag}"] = round(mfu, 4)
    if bad:
        print(f"gpu_check: collectives given tensors off the GPU: {sorted(set(bad))}")
    figures["collectives_on_device"] = int(not bad)
    figures["compile"] = int(a.compile)
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    dist.destroy_process_group()
    print(f"device: {name}  precision: {precision}  batch {batch} x {seq} tokens")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0 if all(figures[f"{s}_ok"] for s in ("ddp", "fsdp2")) and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
