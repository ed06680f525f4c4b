"""raykd's training step vs TRL's GKDTrainer vs a plain PyTorch loop: tokens/s and peak RSS.

Same teacher (SmolLM2-135M, 30 layers, fp32), same student (the 10-layer cut [0-3, 24-29],
fp32, trained), same data (packed 256-token blocks of the State of the Union speeches, in
the same order), same batch (4 x 256), same number of steps, same torch threads, same
precision (fp32: TRL's default bf16=True is turned off), AdamW (torch, non-fused) at the same
constant LR, grad-norm clipping at 1.0 everywhere. Gradient (activation) checkpointing is off in
the three main arms and on in a second pair, raykd_ckpt vs trl_ckpt (raykd
`train.activation_checkpointing=true`, TRL `gradient_checkpointing=True`, both HF's non-reentrant
checkpointing of the student's decoder layers), run after the first three (`--no-ckpt` skips it), and a
third pair, raykd_frozen vs trl_frozen (`--no-frozen` skips it): checkpointing on and the student's
embeddings / tied head frozen in both (raykd `student.freeze_embeddings=true`, which also shares the
teacher's tensor; TRL: requires_grad off on the same weights, so its AdamW skips them).

* raykd: what `raykd.train.train_loop_per_worker` does per step, without Ray: `teacher_forward`
  -> `raykd.parallel.Engine` (Distiller with CE 1 + forward KL 1, fused chunked LM-head loss)
  forward / backward / step (clip, AdamW, LR schedule).
* trl: `trl.experimental.gkd.GKDTrainer`, logit-only: lmbda=0 (no on-policy generation),
  beta=0 (TRL's forward KL, KL(teacher || student)), seq_kd off; a collator that hands it the
  same pre-packed blocks (labels = input ids, every token counts). TRL's loss is KD only (no
  CE term): if anything that is less work than the other two arms.
* plain: a hand-written loop: full logits from both models (HF forward), CE + forward KL from
  `log_softmax`, backward, clip, AdamW.

Every arm runs in its own child process (peak RSS = that child's ru_maxrss, read by the
parent with wait4); the children of a group run at once but take their steps strictly in turn
(`_common.lockstep`), so every step has the cores to itself and a change in the machine's
load (it is shared) hits all arms alike. `--warmup` steps are excluded; tokens/s = tokens per step / median time
of the `--steps` timed steps. Figures: tokens_per_s_ratio = raykd / TRL (goal >= 2.2),
peak_memory_ratio = raykd / TRL peak RSS (goal <= 0.5), plain_loop_ratio = raykd / plain
tokens/s (goal >= 1.1), peak_memory_ratio_ckpt = raykd_ckpt / trl_ckpt peak RSS (goal <= 0.5; _frozen: the third pair),
roofline = model FLOPs per token (`raykd plan`'s flops/tok: teacher forward 2·N_t + student
forward+backward 6·N_s, attention scores included) x raykd tokens/s / this machine's GEMM
rate in the run's precision (the best of a few 2048 x 2048 x 2048 `torch.matmul`s at the same
threads, 2n³ FLOPs each, measured before and after the arms; goal >= 0.85). roofline_ckpt counts
the same model FLOPs (not the recomputation) at raykd_ckpt's tokens/s. roofline_trl is TRL's;
tokens_per_s_ratio_ceiling = 1 / roofline_trl, the most any step doing the same work could reach
over TRL on this machine (a ratio goal above it asks for less work, e.g. lower precision).

    .venv/bin/python bench/vs_trl.py [--steps 5] [--warmup 2] [--threads 2] [--reps 1] [--no-ckpt]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

LR = 1e-5


def _prepare(a):
    import torch

    C.set_threads(a.threads)
    torch.manual_seed(0)
    teacher, student, tok = C.load_teacher_student()
    ids = C.sotu_blocks(tok, (a.warmup + a.steps) * a.batch, a.block)
    return teacher, student, tok, ids.split(a.batch)


def _finish(times, a, extra=None):
    timed = times[a.warmup:]
    C.progress(f"{a.arm}: timed steps " + " ".join(f"{t:.2f}s" for t in timed))
    C.report({"step_s": C.median(timed), "times": timed, "tokens_per_step": a.batch * a.block, **(extra or {})})


def arm_raykd(a, ckpt: bool = False, frozen: bool = False) -> None:
    import torch

    from raykd.config import from_dict
    from raykd.cut import freeze_embeddings
    from raykd.layer_map import layer_map
    from raykd.models import num_layers
    from raykd.objective import Distiller, teacher_forward
    from raykd.parallel import make_engine

    teacher, student, _, batches = _prepare(a)
    cfg = from_dict({
        "teacher": {"model": "smollm2-135m"}, "student": {"init": "list", "layers": C.KEPT, "freeze_embeddings": frozen},
        "loss": {"kd": "forward_kl", "weights": {"ce": 1.0, "kd": 1.0}, "chunk_size": a.chunk},
        "data": {"block_size": a.block},
        "train": {"max_steps": a.warmup + a.steps, "batch_size": a.batch, "lr": LR, "warmup_steps": 0, "grad_clip": 1.0,
                  "precision": a.precision, "activation_checkpointing": ckpt},
    })
    if frozen:  # as raykd.train does: the student's embeddings/head are the teacher's tensor, no gradient
        freeze_embeddings(student, teacher)
    depth = num_layers(teacher.config)
    pairs = layer_map("auto", depth, len(C.KEPT), C.KEPT, None, None)
    distiller = Distiller.build(student, cfg.loss, pairs, teacher.config.hidden_size, depth)
    needs = distiller.spec.teacher_needs()
    engine = make_engine(distiller, teacher, cfg, torch.device("cpu"), 1, precision=a.precision)
    times, losses = [], []
    for i, ids in enumerate(batches):
        C.turn()
        t0 = time.perf_counter()
        with engine.autocast():
            t_out = teacher_forward(teacher, ids, needs)
        loss, terms = engine.forward(ids, t_out)
        engine.backward(loss, True)
        engine.micro_step()
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(terms["loss"]))
        C.progress(f"{a.arm} step {i + 1}: {times[-1]:.2f}s loss {losses[-1]:.4f}")
    _finish(times, a, {"losses": losses})


def arm_plain(a) -> None:
    import torch
    import torch.nn.functional as F

    teacher, student, _, batches = _prepare(a)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    times, losses = [], []
    for i, ids in enumerate(batches):
        C.turn()
        t0 = time.perf_counter()
        with C.autocast(a.precision):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
            s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
        s_logits = s_logits.float().reshape(-1, s_logits.shape[-1])
        t_logits = t_logits.float().reshape(-1, t_logits.shape[-1])
        logq, logp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        ce = F.cross_entropy(s_logits, ids[:, 1:].reshape(-1))
        loss = ce + kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        C.progress(f"plain step {i + 1}: {times[-1]:.2f}s loss {losses[-1]:.4f}")
    _finish(times, a, {"losses": losses})


def arm_trl(a, ckpt: bool = False, frozen: bool = False) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tok, batches = _prepare(a)
    if frozen:  # the Trainer's AdamW takes only parameters that require grad
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = torch.cat(batches)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            C.turn()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            C.progress(f"{a.arm} step {len(times)}: {times[-1]:.2f}s")

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        args = GKDConfig(
            output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps, max_length=a.block,
            lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
            bf16=a.precision == "bf16", fp16=False, gradient_checkpointing=ckpt, use_cpu=True,
            gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
            weight_decay=0.0, train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                             train_dataset=dataset, processing_class=tok, callbacks=[Timer()])
        torch.set_num_threads(a.threads)  # Trainer/accelerate may reset it
        trainer.train()
    _finish(times, a, {"threads_seen": torch.get_num_threads()})


ARMS = {"raykd": arm_raykd, "trl": arm_trl, "plain": arm_plain,
        "raykd_ckpt": lambda a: arm_raykd(a, ckpt=True), "trl_ckpt": lambda a: arm_trl(a, ckpt=True),
        "raykd_frozen": lambda a: arm_raykd(a, ckpt=True, frozen=True), "trl_frozen": lambda a: arm_trl(a, ckpt=True, frozen=True)}
MAIN, CKPT, FROZEN = ["raykd", "trl", "plain"], ["raykd_ckpt", "trl_ckpt"], ["raykd_frozen", "trl_frozen"]


def gemm_flops(threads: int, precision: str = "fp32", n: int = 2048, reps: int = 5) -> float:
    """This machine's GEMM rate (FLOP/s) in the run's precision (bf16: bf16 operands, AMX where the CPU has it):
    the best of `reps` n x n x n matmuls (2n³ FLOPs each)."""
    import torch

    torch.set_num_threads(threads)
    return 2 * n ** 3 / _best_matmul_s(n, n, n, precision, reps)


def _best_matmul_s(m: int, k: int, n: int, precision: str, reps: int) -> float:
    """The best of `reps` timed [m, k] x [k, n] `torch.matmul`s (after one warm-up) in the run's precision, seconds."""
    import torch

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    torch.matmul(x, y)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(x, y)
        best = min(best, time.perf_counter() - t0)
    return best


def step_gemms(config, student_layers: int, tokens: int) -> list[tuple[int, int, int, int]]:
    """The matmuls of one KD step at the model's own shapes, as (count, m, k, n) of an [m, k] x [k, n] product:
    the teacher's forward (every layer and the LM head), the student's forward and backward (each forward
    product twice more: the input's and the weight's gradient). Attention scores are left out (SDPA's own
    kernel; `raykd plan` counts them). config: the teacher's HF config; tokens = batch x block."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = (config.num_key_value_heads or config.num_attention_heads) * d
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o, gate up down: (k, n)
    out = []
    for depth, passes in ((config.num_hidden_layers, 1), (student_layers, 3)):  # teacher fwd; student fwd + 2 bwd
        fwd = [(depth, tokens, k, n) for k, n in layer] + [(1, tokens, h, vocab)]
        out += fwd
        if passes == 3:
            out += [(c, m, n, k) for c, m, k, n in fwd]  # dX = dY W^T: [m, n] x [n, k]
            out += [(c, k, m, n) for c, m, k, n in fwd]  # dW = X^T dY: [k, m] x [m, n]
    return out


def gemm_model_shapes(threads: int, precision: str, batch: int, block: int, reps: int = 3) -> dict[str, float]:
    """One step's linear-layer matmuls (`step_gemms`) timed alone, each shape the best of `reps`, in the run's
    precision: {flops, seconds, flop_s}. Their rate over the 2048³ rate is the roofline a step reaches doing
    nothing but these GEMMs."""
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(C.teacher_dir())
    flops = secs = 0.0
    for count, m, k, n in step_gemms(config, len(C.KEPT), batch * block):
        flops += count * 2.0 * m * k * n
        secs += count * _best_matmul_s(m, k, n, precision, reps)
    return {"flops": flops, "seconds": secs, "flop_s": flops / secs}


def model_flops_per_token(a) -> dict[str, float]:
    """`raykd plan`'s FLOPs per token of this comparison's teacher, student cut and block size."""
    from raykd.config import from_dict
    from raykd.plan import build_plan

    cfg = from_dict({"teacher": {"model": "smollm2-135m"}, "student": {"init": "list", "layers": C.KEPT},
                     "loss": {"weights": {"ce": 1.0, "kd": 1.0}}, "data": {"block_size": a.block}})
    return build_plan(cfg, log=lambda m: None).flops_per_token


def _run_group(script: str, arms: list[str], fwd: list[str], reps: int) -> dict[str, list[dict]]:
    """`reps` lockstep rounds of `arms` (the order rotating per rep): each arm's results."""
    runs = {k: [] for k in arms}
    for rep in range(reps):
        k = rep % len(arms)
        got = C.lockstep(script, {arm: fwd for arm in arms[k:] + arms[:k]}, timeout=1500)
        for arm in arms:
            r = got[arm]
            runs[arm].append(r)
            print(f"rep {rep + 1}/{reps} {arm:10s}: {r['tokens_per_step'] / r['step_s']:.1f} tok/s (median step {r['step_s']:.2f} s), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    return runs


def _same(x: float, y: float, rel: float) -> bool:
    return abs(x - y) <= rel * abs(y)


def _notes(a) -> list[str]:
    """How the comparison was made fair (the document's notes), for these arguments."""
    return [
        f"same teacher, same student init, same {a.batch} x {a.block} SOTU blocks in the same order, {a.warmup} warm-up + {a.steps} timed steps per arm",
        f"{a.precision} everywhere (TRL's bf16 default set to match), torch AdamW (weight decay 0) "
        "at lr 1e-5, grad-norm clip 1.0 in all arms (raykd: its warm-up-free cosine schedule; TRL and plain: constant LR; speed does not depend on it)",
        "gradient checkpointing off in raykd, trl and plain; on in both arms of the second pair, raykd_ckpt (train.activation_checkpointing=true) "
        "and trl_ckpt (gradient_checkpointing=True): HF's non-reentrant checkpointing of the student's decoder layers in both"
        + ("" if a.ckpt else " (not run: --no-ckpt)"),
        "third pair raykd_frozen vs trl_frozen: checkpointing on and the student's embeddings / tied head frozen in both "
        "(raykd student.freeze_embeddings=true, sharing the teacher's tensor; TRL requires_grad off)" + ("" if a.frozen else " (not run: --no-frozen)"),
        f"raykd: the project's Engine step with its default fused chunked LM-head loss (loss.chunk_size={a.chunk}); "
        "plain: the same CE + forward KL on full logits (its step-1 loss is checked equal to raykd's, and raykd_ckpt's to raykd's)",
        "TRL: lmbda=0 (no generation), beta=0 = forward KL, KD loss only; raykd and plain: CE + forward KL (more work, not less); "
        "TRL's step time runs from its on_step_begin to on_step_end callback (batch fetch and logging between steps not counted)",
        "each arm is its own child process; the arms of a group (raykd, trl, plain; then raykd_ckpt, trl_ckpt) run side by side but "
        "take their steps strictly in turn (round-robin, order rotating), so each step has the cores to itself and all arms of a group "
        "see the same machine load over time",
        "peak memory = each child's own peak RSS (wait4 ru_maxrss): everything it loaded (both models, optimizer, libraries) included",
        f"tokens/s = {a.batch * a.block} tokens / median timed step; same torch threads ({a.threads}) in all arms",
        "roofline_ceiling = the rate of one step's linear-layer GEMMs at the model's own shapes (teacher fwd, student fwd + bwd), "
        "each timed alone, over the 2048³ rate; gemm_share = their time / raykd's step time",
        "roofline = raykd plan's model FLOPs per token (teacher fwd 2·N_t + student fwd+bwd 6·N_s + attention scores; recomputation "
        f"not counted) x tokens/s / the best {a.precision} GEMM rate measured here ({a.threads} threads, 2048³ torch.matmul, before and after the arms)",
    ]


def _figures(a, runs: dict, flops: dict, peak: float, shapes: dict, first: dict, same_loss: bool) -> dict:
    """The printed figures from the arms' runs, the model's FLOPs per token, the best GEMM rate `peak`, the model-shape
    GEMM timing and each arm's step-1 loss."""
    tps = {k: C.median(r["tokens_per_step"] / r["step_s"] for r in v) for k, v in runs.items()}
    rss = {k: C.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    figures = {
        "tokens_per_s_ratio": tps["raykd"] / tps["trl"], "peak_memory_ratio": rss["raykd"] / rss["trl"],
        "plain_loop_ratio": tps["raykd"] / tps["plain"], "roofline": flops["total"] * tps["raykd"] / peak,
        # TRL's step at the same roofline, and the most any step doing the same FLOPs could run over TRL here
        # (raykd at 100% of the measured GEMM rate): a tokens_per_s_ratio goal above it needs less work, not a faster step
        "roofline_trl": flops["total"] * tps["trl"] / peak, "tokens_per_s_ratio_ceiling": peak / (flops["total"] * tps["trl"]),
        # the roofline of a step doing nothing but its own linear GEMMs (at their measured rate at the model's shapes),
        # and the share of raykd's step those GEMMs need: 1 - gemm_share is everything else (attention, norms, casts, loss, optimizer)
        "roofline_ceiling": shapes["flop_s"] / peak, "gemm_share": shapes["seconds"] * tps["raykd"] / (a.batch * a.block),
    }
    if a.ckpt:
        figures["peak_memory_ratio_ckpt"] = rss["raykd_ckpt"] / rss["trl_ckpt"]
        figures["roofline_ckpt"] = flops["total"] * tps["raykd_ckpt"] / peak
        figures["tokens_per_s_ratio_ckpt"] = tps["raykd_ckpt"] / tps["trl_ckpt"]
    if a.frozen:  # raykd shares the teacher's embedding tensor and skips the head's weight gradient; TRL keeps a frozen copy
        figures["peak_memory_ratio_frozen"] = rss["raykd_frozen"] / rss["trl_frozen"]
        figures["tokens_per_s_ratio_frozen"] = tps["raykd_frozen"] / tps["trl_frozen"]
        figures["same_loss_raykd_frozen"] = int(_same(first["raykd_frozen"], first["raykd"], 1e-5))
    figures.update({f"{k}_tok_s": v for k, v in tps.items()})
    figures.update({f"{k}_rss_mib": v for k, v in rss.items()})
    if a.ckpt:
        figures["same_loss_raykd_ckpt"] = int(_same(first["raykd_ckpt"], first["raykd"], 1e-5))
    figures.update({"same_loss_raykd_plain": int(same_loss), "gemm_gflops": peak / 1e9, "model_gflops_per_token": flops["total"] / 1e9,
                    "steps": a.steps, "threads": a.threads, "precision": a.precision, "chunk": a.chunk})
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=list(ARMS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reps", type=int, default=1, help="child processes per arm (arms alternate)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--chunk", type=int, default=None, help="raykd's loss.chunk_size (default: the project default)")
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the activation-checkpointing pair raykd_ckpt vs trl_ckpt (--no-ckpt: the three main arms only)")
    p.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the pair raykd_frozen vs trl_frozen: checkpointing on and the student's embeddings/head frozen in both")
    a = p.parse_args()
    if a.chunk is None:
        from raykd.config import LossConfig

        a.chunk = LossConfig().chunk_size
    if a.arm:
        ARMS[a.arm](a)
        return 0
    C.header("raykd step vs TRL GKDTrainer (logit-only) vs a plain PyTorch loop: SmolLM2-135M -> 10-layer cut",
             a.threads, a.precision, _notes(a))
    flops = model_flops_per_token(a)
    gemm = [gemm_flops(a.threads, a.precision)]
    print(f"{a.precision} GEMM before the arms: {gemm[0] / 1e9:.1f} GFLOP/s; model FLOPs/token {flops['total'] / 1e9:.3f} G "
          f"(teacher fwd {flops['teacher_forward'] / 1e9:.3f} G + student step {flops['student_step'] / 1e9:.3f} G)", flush=True)
    fwd = [f"--{k}={getattr(a, k)}" for k in ("steps", "warmup", "batch", "block", "threads", "precision", "chunk")]
    script = os.path.abspath(__file__)
    runs = _run_group(script, MAIN, fwd, a.reps)
    if a.ckpt:
        runs.update(_run_group(script, CKPT, fwd, a.reps))
    if a.frozen:
        runs.update(_run_group(script, FROZEN, fwd, a.reps))
    gemm.append(gemm_flops(a.threads, a.precision))
    shapes = gemm_model_shapes(a.threads, a.precision, a.batch, a.block)
    print(f"{a.precision} GEMM after the arms: {gemm[1] / 1e9:.1f} GFLOP/s; one step's linear-layer GEMMs at the model's own shapes, "
          f"timed alone: {shapes['flops'] / 1e9:.0f} GFLOP in {shapes['seconds']:.3f} s = {shapes['flop_s'] / 1e9:.1f} GFLOP/s", flush=True)
    first = {k: v[0]["losses"][0] for k, v in runs.items() if "losses" in v[0]}
    same_loss = _same(first["raykd"], first["plain"], 1e-3)
    print(f"step-1 loss (CE + forward KL, same init and batch): raykd {first['raykd']:.5f}, plain {first['plain']:.5f} -> "
          f"{'same' if same_loss else 'DIFFERENT'}", flush=True)
    C.figures(_figures(a, runs, flops, max(gemm), shapes, first, same_loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
