"""The overhead of one full raykd KD step over the sum of its unavoidable parts.

Compared, on the same batch (4 x 256 tokens of State of the Union text), the same threads
and precision, in one process with the arms interleaved step by step:

* KD step: `raykd.objective.teacher_forward` (capturing what `ObjectiveSpec.teacher_needs()`
  asks for) + `Distiller` forward with CE + forward KL (fused chunked LM-head loss) +
  cosine hidden-state alignment + attention-map KL on every mapped layer pair, backward,
  AdamW step. Teacher: SmolLM2-135M (30 layers); student: the 10-layer cut
  [0-3, 24-29]; layer map `layer_map("auto", 30, 10, kept)` (each student layer <-> the
  teacher layer it was copied from).
* its parts: a plain teacher forward with logits under `torch.no_grad()` (HF `teacher(ids)`)
  + a plain student CE step (HF `student(ids, labels=ids).loss`, backward, AdamW) on a
  separate copy of the same student.

`--warmup` rounds (all arms; default 2) are excluded: until the allocator's heap has grown to
the step's working set, fresh pages fault in (costly in this VM: ~8 µs each, ~0.35 M per KD
step at first); then `--reps` rounds, the arm order rotating.
overhead_ratio = the median over rounds of KD step time / (teacher forward + CE step) of the
same round (goal <= 1.10): the three timings of a round are taken back to back, so a change in
the load of this shared machine hits numerator and denominator alike. The ratio of the medians
is printed beside it (overhead_ratio_of_medians).

    .venv/bin/python bench/kd_step.py [--reps 6] [--threads 2] [--precision fp32]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WEIGHTS = {"ce": 1.0, "kd": 1.0, "hidden": 1.0, "attention": 1.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="rounds excluded before timing (allocator warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    C.header("one raykd KD step (CE + forward KL + cosine hidden + attention KL) vs teacher forward + plain student CE step",
             a.threads, a.precision, [
                 f"same batch ({a.batch} x {a.block} SOTU tokens) for every step of every arm; same teacher; both students start as the same 10-layer cut",
                 "the parts are the least any KD step must do: a full teacher forward (with logits) and a student forward+backward+AdamW with CE",
                 "KD arm and CE arm each own a student copy and an AdamW (lr 1e-5, no clipping, no schedule) so both do a real optimizer step",
                 f"one process, arms interleaved per round with rotating order; {a.warmup} warm-up round(s) excluded; {a.reps} rounds; "
                 "overhead_ratio = median over rounds of the ratio within a round (its three timings are back to back)",
                 f"same torch threads ({a.threads}) and precision ({a.precision}) for all arms",
             ])
    import torch

    from raykd.layer_map import layer_map
    from raykd.models import num_layers
    from raykd.objective import Distiller, teacher_forward

    C.set_threads(a.threads)
    teacher, student, tok = C.load_teacher_student()
    ids = C.sotu_blocks(tok, a.batch, a.block)
    depth = num_layers(teacher.config)
    pairs = layer_map("auto", depth, len(C.KEPT), C.KEPT, None, None)
    distiller = Distiller.build(copy.deepcopy(student), {"kd": "forward_kl", "hidden": "cosine", "weights": WEIGHTS},
                          pairs, teacher.config.hidden_size, depth)
    needs = distiller.spec.teacher_needs()
    print(f"layer map (teacher, student): {pairs}")
    print(f"teacher needs: hidden {needs.hidden}, qkv {needs.qkv}", flush=True)
    ce_student = student
    opt_kd = torch.optim.AdamW(distiller.parameters(), lr=1e-5)
    opt_ce = torch.optim.AdamW(ce_student.parameters(), lr=1e-5)

    def kd_step():
        with C.autocast(a.precision):
            t_out = teacher_forward(teacher, ids, needs)
            loss, terms = distiller(ids, t_out)
        loss.backward()
        opt_kd.step()
        opt_kd.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in terms.items()}

    def teacher_fwd():
        with torch.no_grad(), C.autocast(a.precision):
            return teacher(input_ids=ids, use_cache=False).logits.shape

    def ce_step():
        with C.autocast(a.precision):
            loss = ce_student(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt_ce.step()
        opt_ce.zero_grad(set_to_none=True)
        return loss.item()

    arms = {"kd_step": kd_step, "teacher_fwd": teacher_fwd, "ce_step": ce_step}
    names = list(arms)
    times = {k: [] for k in arms}
    for r in range(a.reps + a.warmup):
        order = names[r % 3:] + names[:r % 3]
        line = []
        for name in order:
            t0 = time.perf_counter()
            out = arms[name]()
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                times[name].append(dt)
            line.append(f"{name} {dt:.2f}s")
            if name == "kd_step" and r == 0:
                print("KD terms at the first step: " + " ".join(f"{k}={v:.4g}" for k, v in out.items()), flush=True)
        label = f"warm-up {r + 1}/{a.warmup}" if r < a.warmup else f"round {r + 1 - a.warmup}/{a.reps}"
        print(f"{label}: " + ", ".join(line), flush=True)
    med = {k: C.median(v) for k, v in times.items()}
    parts = med["teacher_fwd"] + med["ce_step"]
    paired = [kd / (tf + ce) for kd, tf, ce in zip(times["kd_step"], times["teacher_fwd"], times["ce_step"])]
    tokens = a.batch * a.block
    print(f"medians: KD step {med['kd_step']:.3f} s ({tokens / med['kd_step']:.0f} tok/s); teacher forward {med['teacher_fwd']:.3f} s "
          f"+ CE step {med['ce_step']:.3f} s = {parts:.3f} s ({tokens / parts:.0f} tok/s)", flush=True)
    print("per-round KD step / (teacher forward + CE step): " + " ".join(f"{x:.3f}" for x in paired), flush=True)
    C.figures({
        "overhead_ratio": C.median(paired), "overhead_ratio_of_medians": med["kd_step"] / parts, "kd_step_s": med["kd_step"],
        "teacher_fwd_s": med["teacher_fwd"], "ce_step_s": med["ce_step"], "parts_s": parts, "kd_tokens_per_s": tokens / med["kd_step"],
        "tokens": tokens, "reps": a.reps, "warmup": a.warmup, "threads": a.threads, "precision": a.precision,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
