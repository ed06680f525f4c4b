"""The cost of an on-policy KD step (loss.on_policy) over an offline KD step on the same model and batch.

Compared, on the same batch (4 x 256 tokens of State of the Union text), the same threads and
precision, in one process with the arms interleaved round by round:

* offline: one raykd KD step as `raykd.train.micro_step` runs it: `raykd.objective.teacher_forward`
  + `Distiller` forward (CE + the logit loss through the fused chunked LM head) + backward + AdamW.
* on-policy: the same step after `raykd.onpolicy.OnPolicy.apply` (fraction 1): the student samples the
  last `--new` tokens of every block from the first 256 - new (raykd.sampling: KV cache, no gradient,
  eval mode, temperature `--temperature`, seeded per step), the teacher scores the continued blocks,
  CE skips the sampled tokens (the data mask).
Teacher: SmolLM2-135M (30 layers); student: the 10-layer cut [0-3, 24-29]; each arm owns a copy of
the student and an AdamW (lr 1e-5), so both do real optimizer steps from the same start.

onpolicy_overhead = median over rounds of on-policy step / offline step of the same round (the two
timings are back to back, so a change in the shared machine's load hits both); gen_share = median
of sampling seconds / on-policy step seconds. A run with loss.on_policy.fraction = λ costs about
1 + λ·(onpolicy_overhead − 1) offline steps per step.

    .venv/bin/python bench/onpolicy.py [--reps 4] [--new 64] [--threads 2] [--precision fp32]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="rounds excluded before timing (allocator warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--new", type=int, default=64, help="loss.on_policy.max_new_tokens: tokens the student samples per block")
    p.add_argument("--temperature", type=float, default=1.0, help="loss.on_policy.temperature")
    p.add_argument("--kd", default="reverse_kl", help="loss.kd of both arms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    C.header(f"on-policy KD step (the student samples {a.new} of {a.block} tokens per block) vs offline KD step",
             a.threads, a.precision, [
                 f"same batch ({a.batch} x {a.block} SOTU tokens), same teacher, same objective (CE + {a.kd}, fused chunked head) in both arms",
                 "both students start as the same 10-layer cut, each with its own AdamW (lr 1e-5): both do real optimizer steps",
                 "the on-policy arm is the offline step plus raykd.onpolicy's sampling (KV cache, no grad) and the data mask; nothing else differs",
                 f"one process, arms interleaved per round with alternating order; {a.warmup} warm-up round(s) excluded; {a.reps} rounds; "
                 "onpolicy_overhead = median over rounds of the ratio within a round",
                 f"same torch threads ({a.threads}) and precision ({a.precision}) for both arms",
             ])
    import torch

    from raykd.config import OnPolicyConfig
    from raykd.layer_map import layer_map
    from raykd.models import num_layers
    from raykd.objective import Distiller, teacher_forward
    from raykd.onpolicy import OnPolicy

    C.set_threads(a.threads)
    teacher, student, tok = C.load_teacher_student()
    ids = C.sotu_blocks(tok, a.batch, a.block)
    depth = num_layers(teacher.config)
    pairs = layer_map("auto", depth, len(C.KEPT), C.KEPT, None, None)
    loss_cfg = {"kd": a.kd, "weights": {"ce": 1.0, "kd": 1.0}}
    arms = {name: Distiller.build(copy.deepcopy(student), loss_cfg, pairs, teacher.config.hidden_size, depth) for name in ("offline", "onpolicy")}
    opts = {name: torch.optim.AdamW(d.parameters(), lr=1e-5) for name, d in arms.items()}
    needs = arms["offline"].spec.teacher_needs()
    sampler = OnPolicy(OnPolicyConfig(fraction=1.0, max_new_tokens=a.new, temperature=a.temperature), seed=0, rank=0)
    gen_times = []

    def step(name: str, r: int) -> dict:
        d, batch, data_mask = arms[name], ids, None
        if name == "onpolicy":
            batch, data_mask, gen = sampler.apply(d.student, ids, r, 0, context=lambda: C.autocast(a.precision))
            gen_times.append(float(gen["gen_s"]))
        with C.autocast(a.precision):
            t_out = teacher_forward(teacher, batch, needs)
            loss, terms = d(batch, t_out, data_mask=data_mask)
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return {k: float(v) for k, v in terms.items()}

    times = {k: [] for k in arms}
    gen_kept = []
    for r in range(a.reps + a.warmup):
        line = []
        for name in (["offline", "onpolicy"] if r % 2 == 0 else ["onpolicy", "offline"]):
            t0 = time.perf_counter()
            terms = step(name, r)
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                times[name].append(dt)
                if name == "onpolicy":
                    gen_kept.append(gen_times[-1])
            extra = f" (sampling {gen_times[-1]:.2f}s)" if name == "onpolicy" else ""
            line.append(f"{name} {dt:.2f}s{extra} kd={terms['kd']:.4g}")
        label = f"warm-up {r + 1}/{a.warmup}" if r < a.warmup else f"round {r + 1 - a.warmup}/{a.reps}"
        print(f"{label}: " + ", ".join(line), flush=True)
    med = {k: C.median(v) for k, v in times.items()}
    ratios = [on / off for on, off in zip(times["onpolicy"], times["offline"])]
    shares = [g / on for g, on in zip(gen_kept, times["onpolicy"])]
    gen = C.median(gen_kept)
    sampled = a.batch * a.new
    print(f"medians: offline step {med['offline']:.3f} s; on-policy step {med['onpolicy']:.3f} s, of which sampling {gen:.3f} s "
          f"({sampled} tokens, {sampled / gen:.0f} sampled tok/s)", flush=True)
    print("per-round on-policy / offline: " + " ".join(f"{x:.3f}" for x in ratios), flush=True)
    C.figures({
        "onpolicy_overhead": C.median(ratios), "gen_share": C.median(shares), "offline_step_s": med["offline"],
        "onpolicy_step_s": med["onpolicy"], "gen_s": gen, "sampled_tokens_per_s": sampled / gen,
        "step_without_gen_ratio": C.median([(on - g) / off for on, g, off in zip(times["onpolicy"], gen_kept, times["offline"])]),
        "new_tokens": a.new, "tokens": a.batch * a.block, "temperature": a.temperature, "kd": a.kd, "reps": a.reps,
        "threads": a.threads, "precision": a.precision,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
