"""Chunked LM-head loss vs the naive full-logits loss: peak memory and time, forward + backward.

Compared: `raykd.losses.fused_head_losses` (CE + forward KL from the final hidden states and
the LM-head weights, chunked over tokens so [N, V] logits never exist; chunk size = the
project default `LossConfig.chunk_size`) against a naive PyTorch implementation: full [N, V]
student and teacher logits with `F.linear`, `log_softmax`, forward KL + `F.cross_entropy`,
autograd backward. Same inputs (seeded), same threads, same precision, V = 49,152 (SmolLM2),
Hs = Ht = 576, N = 2048 tokens by default. Both return the loss and the gradients of the
student hidden states [N, Hs] and the student head weight [V, Hs]; they are checked to agree
(allclose) in a separate child before anything is timed.

Method: every arm repetition runs in its own child process (`--arm raykd|naive`); arms
alternate (raykd, naive, then the reverse order). A child allocates the inputs, runs one
warm-up pass, records its RSS as the baseline and resets its peak RSS (VmHWM, via
/proc/self/clear_refs), runs `--iters` timed forward+backward passes and reports the median
pass time and its peak RSS minus that baseline. Figures are medians over the repetitions:
peak_memory_ratio = raykd / naive memory increase (goal <= 0.25), time_ratio = raykd / naive
time (goal <= 1.2), both at the project's default chunk size; raykd at `--also-chunks`
(default 1024, the default before this was measured) beside them as extra figures (`peak_memory_ratio_chunk1024=` ...),
and raykd with its elementwise passes over whole chunks instead of `ROW_BLOCK`-row blocks (`--also-row-blocks`, default
256: how it ran before the row blocks) as `time_ratio_rows256=` / `peak_memory_ratio_rows256=`.

    .venv/bin/python bench/chunked_loss.py [--tokens 2048] [--reps 3] [--iters 2] [--also-chunks 1024] [--precision fp32]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def make_inputs(a):
    import torch

    g = torch.Generator().manual_seed(0)
    n, v, hs, ht = a.tokens, a.vocab, a.hidden, a.teacher_hidden
    sh = torch.randn(n, hs, generator=g).requires_grad_(True)
    sw = (torch.randn(v, hs, generator=g) * (2.0 / hs ** 0.5)).requires_grad_(True)  # logits std ~2
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(v, ht, generator=g) * (2.0 / ht ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    return sh, sw, th, tw, targets


def raykd_step(sh, sw, th, tw, targets, a):
    from raykd.losses import fused_head_losses

    with C.autocast(a.precision):
        loss, _ = fused_head_losses(sh, sw, th, tw, targets, None, kd="forward_kl", ce_weight=1.0,
                                    kd_weight=1.0, chunk_size=a.chunk)
    loss.backward()
    return loss.detach()


def naive_step(sh, sw, th, tw, targets, a):
    import torch
    import torch.nn.functional as F

    with C.autocast(a.precision):
        s_logits = F.linear(sh, sw)
        with torch.no_grad():
            t_logits = F.linear(th, tw)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    logq = torch.log_softmax(s_logits, dim=-1)
    logp = torch.log_softmax(t_logits, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    ce = F.cross_entropy(s_logits, targets)
    loss = ce + kl
    loss.backward()
    return loss.detach()


STEPS = {"raykd": raykd_step, "naive": naive_step}
MEM_FLOOR_MIB = 1.0  # below this the naive arm's RSS increase is page/allocator noise, not the logits


def child(a) -> None:
    import torch

    C.set_threads(a.threads)
    inputs = make_inputs(a)
    sh, sw = inputs[0], inputs[1]
    if a.arm == "check":
        out = {}
        for name, fn in STEPS.items():
            loss = fn(*inputs, a)
            out[name] = (loss, sh.grad.clone(), sw.grad.clone())
            sh.grad = sw.grad = None
        tol = {"rtol": 1e-4, "atol": 1e-6} if a.precision == "fp32" else {"rtol": 2e-2, "atol": 1e-4}
        res = {}
        for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
            x, y = out["raykd"][i], out["naive"][i]
            res[what] = {"ok": bool(torch.allclose(x, y, **tol)), "max_abs_diff": float((x - y).abs().max()),
                         "max_abs": float(y.abs().max())}
        res["loss_values"] = [float(out["raykd"][0]), float(out["naive"][0])]
        res["tolerance"] = tol
        C.report(res)
        return
    if a.row_block:
        import raykd.losses.fused as fused

        fused.ROW_BLOCK = a.row_block
    fn = STEPS[a.arm]
    fn(*inputs, a)  # warm-up (thread pools, allocator, kernels), not timed, not in the memory figure
    sh.grad = sw.grad = None
    gc.collect()
    base = C.rss_now_mib()
    reset = C.reset_peak_rss()  # peak from here on; without it the peak of the whole life (imports, warm-up)
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        fn(*inputs, a)
        times.append(time.perf_counter() - t0)
        sh.grad = sw.grad = None
    peak = C.peak_rss_self_mib()
    C.progress(f"{a.arm}: {' '.join(f'{t:.2f}s' for t in times)} per fwd+bwd, peak RSS {peak:.0f} MiB")
    C.report({"time_s": C.median(times), "times": times, "base_rss_mib": base, "peak_reset": reset,
              "mem_increase_mib": peak - base})


def main() -> int:
    from raykd.config import LossConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=["raykd", "naive", "check"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher-hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=LossConfig().chunk_size, help="chunk size of the headline figures (default: the project's)")
    p.add_argument("--also-chunks", type=lambda x: [int(c) for c in x.split(",") if c], default=[1024],
                   help="comma-separated extra chunk sizes measured for raykd beside the headline (extra figures); '' for none")
    p.add_argument("--row-block", type=int, default=0, help=argparse.SUPPRESS)  # a child's raykd.losses.fused.ROW_BLOCK (0: the default)
    p.add_argument("--also-row-blocks", type=lambda x: [int(c) for c in x.split(",") if c], default=[256],
                   help="comma-separated row blocks of the elementwise passes measured for raykd beside the default (extra figures); '' for none")
    p.add_argument("--reps", type=int, default=3, help="child processes per arm (alternating)")
    p.add_argument("--iters", type=int, default=2, help="timed passes per child, after one warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    if a.arm:
        child(a)
        return 0
    C.header(f"chunked LM-head loss (raykd.losses.fused_head_losses) vs naive full logits: "
             f"N={a.tokens} V={a.vocab} Hs={a.hidden} Ht={a.teacher_hidden} chunk={a.chunk}, CE + forward KL, fwd+bwd",
             a.threads, a.precision, [
                 "same seeded inputs, same loss (CE + forward KL, mean over tokens), same gradients (checked allclose first)",
                 f"each repetition of an arm is its own child process; arms alternate (order reversed every other round); "
                 f"{a.reps} children x {a.iters} timed passes per arm after 1 warm-up; medians",
                 f"headline figures at the project's default loss.chunk_size ({a.chunk}); raykd at chunk {', '.join(map(str, a.also_chunks)) or '-'} "
                 f"and with row blocks of {', '.join(map(str, a.also_row_blocks)) or '-'} measured beside it as extra figures",
                 "memory = the child's peak RSS over the timed passes (VmHWM, reset after the warm-up pass) minus its RSS at that reset "
                 "(inputs, weights and hidden states allocated); the gradients [N, Hs] + [V, Hs] count in both arms",
                 f"same torch threads ({a.threads}) and precision ({a.precision}) in both arms",
             ])
    fwd = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("tokens", "vocab", "hidden", "teacher_hidden", "iters", "threads", "precision")]
    script = os.path.abspath(__file__)
    check = C.run_arm(script, "check", [*fwd, f"--chunk={a.chunk}"])
    ok = all(check[k]["ok"] for k in ("loss", "grad_hidden", "grad_weight"))
    print(f"check (tolerance {check['tolerance']}): loss raykd {check['loss_values'][0]:.6f} vs naive {check['loss_values'][1]:.6f}; "
          + "; ".join(f"{k} allclose={check[k]['ok']} max|diff|={check[k]['max_abs_diff']:.2e} (max|x|={check[k]['max_abs']:.2e})"
                      for k in ("loss", "grad_hidden", "grad_weight")), flush=True)
    arms = ([("raykd", a.chunk, 0), ("naive", a.chunk, 0)] + [("raykd", c, 0) for c in a.also_chunks if c != a.chunk]
            + [("raykd", a.chunk, r) for r in a.also_row_blocks])
    runs = {arm: [] for arm in arms}
    for rep in range(a.reps):
        for arm, chunk, rows in (arms if rep % 2 == 0 else arms[::-1]):
            r = C.run_arm(script, arm, [*fwd, f"--chunk={chunk}", f"--row-block={rows}"])
            runs[(arm, chunk, rows)].append(r)
            label = f"{arm} (chunk {chunk}{f', rows {rows}' if rows else ''})" if arm == "raykd" else "naive"
            print(f"rep {rep + 1}/{a.reps} {label:27s}: {r['time_s']:.3f} s per fwd+bwd, peak RSS +{r['mem_increase_mib']:.0f} MiB "
                  f"over {r['base_rss_mib']:.0f} MiB baseline{'' if r['peak_reset'] else ' (peak not resettable: whole-life peak)'}",
                  flush=True)
    t = {k: C.median(x["time_s"] for x in v) for k, v in runs.items()}
    m = {k: C.median(x["mem_increase_mib"] for x in v) for k, v in runs.items()}
    main_arm, naive = ("raykd", a.chunk, 0), ("naive", a.chunk, 0)
    if m[naive] < MEM_FLOOR_MIB:  # the allocator reused the warm-up's pages: no increase to compare against
        print(f"naive arm's memory increase {m[naive]:.2f} MiB is under {MEM_FLOOR_MIB} MiB (RSS resolution at this size): "
              "memory ratios are not measurable and print as nan; use larger --tokens/--vocab", flush=True)

    def mem_ratio(x: float) -> float:
        return x / m[naive] if m[naive] >= MEM_FLOOR_MIB else float("nan")

    for k in runs:
        if k != naive:
            print(f"median: raykd chunk {k[1]}{f' rows {k[2]}' if k[2] else ''}: {t[k]:.3f} s, +{m[k]:.0f} MiB vs naive {t[naive]:.3f} s, +{m[naive]:.0f} MiB -> "
                  f"time x{t[k] / t[naive]:.3f}, memory x{mem_ratio(m[k]):.3f}", flush=True)
    extra = {}
    for k in runs:
        if k not in (main_arm, naive):
            tag = f"rows{k[2]}" if k[2] else f"chunk{k[1]}"
            extra[f"peak_memory_ratio_{tag}"] = mem_ratio(m[k])
            extra[f"time_ratio_{tag}"] = t[k] / t[naive]
    C.figures({
        "peak_memory_ratio": mem_ratio(m[main_arm]), "time_ratio": t[main_arm] / t[naive],
        "raykd_mem_mib": m[main_arm], "naive_mem_mib": m[naive], "raykd_s": t[main_arm], "naive_s": t[naive],
        "same_result": int(ok), **extra, "tokens": a.tokens, "vocab": a.vocab, "chunk": a.chunk, "threads": a.threads,
        "precision": a.precision,
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
