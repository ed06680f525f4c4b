"""raykd's training step vs TRL's GKDTrainer vs a plain PyTorch loop: tokens/s and peak RSS.

Same teacher (SmolLM2-135M, 30 layers, fp32), same student (the 10-layer cut [0-3, 24-29],
fp32, trained), same data (packed 256-token blocks of the State of the Union speeches, in
the same order), same batch (4 x 256), same number of steps, same torch threads, same
precision (fp32: TRL's default bf16=True is turned off), gradient checkpointing off,
AdamW (torch, non-fused) at the same constant LR, grad-norm clipping at 1.0 everywhere.

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
parent with wait4); the three children run at once but take their steps strictly in turn
(`_common.lockstep`), so every step has the cores to itself and a change in the machine's
load (it is shared) hits all arms alike. `--warmup` steps are excluded; tokens/s = tokens per step / median time
of the `--steps` timed steps. Figures: tokens_per_s_ratio = raykd / TRL (goal >= 2.0),
peak_memory_ratio = raykd / TRL peak RSS (goal <= 0.5), plain_loop_ratio = raykd / plain
tokens/s (goal >= 1.1).

    .venv/bin/python bench/vs_trl.py [--steps 5] [--warmup 2] [--threads 2] [--reps 1]
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


def arm_raykd(a) -> None:
    import torch

    from raykd.config import from_dict
    from raykd.layer_map import layer_map
    from raykd.models import num_layers
    from raykd.objective import Distiller, teacher_forward
    from raykd.parallel import make_engine

    teacher, student, _, batches = _prepare(a)
    cfg = from_dict({
        "teacher": {"model": "smollm2-135m"}, "student": {"init": "list", "layers": C.KEPT},
        "loss": {"kd": "forward_kl", "weights": {"ce": 1.0, "kd": 1.0}, "chunk_size": a.chunk},
        "data": {"block_size": a.block},
        "train": {"max_steps": a.warmup + a.steps, "batch_size": a.batch, "lr": LR, "warmup_steps": 0, "grad_clip": 1.0,
                  "precision": a.precision},
    })
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
        C.progress(f"raykd step {i + 1}: {times[-1]:.2f}s loss {losses[-1]:.4f}")
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


def arm_trl(a) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tok, batches = _prepare(a)
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
            C.progress(f"trl step {len(times)}: {times[-1]:.2f}s")

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        args = GKDConfig(
            output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps, max_length=a.block,
            lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
            bf16=a.precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
            weight_decay=0.0, train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                             train_dataset=dataset, processing_class=tok, callbacks=[Timer()])
        torch.set_num_threads(a.threads)  # Trainer/accelerate may reset it
        trainer.train()
    _finish(times, a, {"threads_seen": torch.get_num_threads()})


ARMS = {"raykd": arm_raykd, "trl": arm_trl, "plain": arm_plain}


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
    a = p.parse_args()
    if a.chunk is None:
        from raykd.config import LossConfig

        a.chunk = LossConfig().chunk_size
    if a.arm:
        ARMS[a.arm](a)
        return 0
    C.header("raykd step vs TRL GKDTrainer (logit-only) vs a plain PyTorch loop: SmolLM2-135M -> 10-layer cut",
             a.threads, a.precision, [
                 f"same teacher, same student init, same {a.batch} x {a.block} SOTU blocks in the same order, {a.warmup} warm-up + {a.steps} timed steps per arm",
                 f"{a.precision} everywhere (TRL's bf16 default set to match), gradient checkpointing off, torch AdamW (weight decay 0) "
                 "at lr 1e-5, grad-norm clip 1.0 in all arms (raykd: its warm-up-free cosine schedule; TRL and plain: constant LR; speed does not depend on it)",
                 f"raykd: the project's Engine step with its default fused chunked LM-head loss (loss.chunk_size={a.chunk}); "
                 "plain: the same CE + forward KL on full logits (its step-1 loss is checked equal to raykd's)",
                 "TRL: lmbda=0 (no generation), beta=0 = forward KL, KD loss only; raykd and plain: CE + forward KL (more work, not less); "
                 "TRL's step time runs from its on_step_begin to on_step_end callback (batch fetch and logging between steps not counted)",
                 "each arm is its own child process; the three run side by side but take their steps strictly in turn (round-robin, "
                 "order rotating), so each step has the cores to itself and all arms see the same machine load over time",
                 "peak memory = each child's own peak RSS (wait4 ru_maxrss): everything it loaded (both models, optimizer, libraries) included",
                 f"tokens/s = {a.batch * a.block} tokens / median timed step; same torch threads ({a.threads}) in all arms",
             ])
    fwd = [f"--{k}={getattr(a, k)}" for k in ("steps", "warmup", "batch", "block", "threads", "precision", "chunk")]
    script = os.path.abspath(__file__)
    runs = {k: [] for k in ARMS}
    names = list(ARMS)
    for rep in range(a.reps):
        got = C.lockstep(script, {arm: fwd for arm in names[rep % 3:] + names[:rep % 3]}, timeout=1500)
        for arm in names:
            r = got[arm]
            runs[arm].append(r)
            print(f"rep {rep + 1}/{a.reps} {arm:5s}: {r['tokens_per_step'] / r['step_s']:.1f} tok/s (median step {r['step_s']:.2f} s), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    first = {k: v[0]["losses"][0] for k, v in runs.items() if "losses" in v[0]}
    same_loss = abs(first["raykd"] - first["plain"]) <= 1e-3 * abs(first["plain"])
    print(f"step-1 loss (CE + forward KL, same init and batch): raykd {first['raykd']:.5f}, plain {first['plain']:.5f} -> "
          f"{'same' if same_loss else 'DIFFERENT'}", flush=True)
    tps = {k: C.median(r["tokens_per_step"] / r["step_s"] for r in v) for k, v in runs.items()}
    rss = {k: C.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    C.figures({
        "tokens_per_s_ratio": tps["raykd"] / tps["trl"], "peak_memory_ratio": rss["raykd"] / rss["trl"],
        "plain_loop_ratio": tps["raykd"] / tps["plain"],
        "raykd_tok_s": tps["raykd"], "trl_tok_s": tps["trl"], "plain_tok_s": tps["plain"],
        "raykd_rss_mib": rss["raykd"], "trl_rss_mib": rss["trl"], "plain_rss_mib": rss["plain"],
        "same_loss_raykd_plain": int(same_loss), "steps": a.steps, "threads": a.threads, "precision": a.precision, "chunk": a.chunk,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
