"""Task-scoring speed: sentences/s of the sentiment task for the student and the teacher.

The real SmolLM2-135M-Instruct teacher and the 10-layer student cut from it (bench/_common.KEPT;
untrained: speed does not depend on the weights), the fetched 2,000-sentence sentiment set
(`raykd fetch tasks`), fp32, the machine's cores. Arms, measured side by side in this process
on the same sentences (`--limit`, default all 2,000) and alternated:

* `raykd`: `raykd.tasks.sentiment.score` (sorted, batched, the few-shot prompt's keys/values
  computed once per batch, both one-token choices read off one forward);
* `plain` (on `--plain-limit` sentences, default 100): the same requests scored one forward per
  (sentence, choice) pair, prompt included, as a per-request loop does it.

Figures: sentences_per_s_student / _teacher (raykd), both_models_s (the whole set, student +
teacher; goal <= 120 s on 2 cores), speedup_vs_plain (teacher). The two arms' log-likelihoods
are checked to agree before anything is reported.

    .venv/bin/python bench/eval_speed.py [--limit 2000] [--plain-limit 100] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def plain_margins(model, tok, items) -> list[float]:
    """log P(" positive") - log P(" negative") from one unbatched forward per choice."""
    import torch

    from raykd.tasks import sentiment

    out = []
    for item in items:
        lps = []
        for choice in sentiment.CHOICES:
            ctx = tok(sentiment.PROMPT, add_special_tokens=False)["input_ids"]
            ctx += tok(" " + item["text"] + "\nSentiment:", add_special_tokens=False)["input_ids"]
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont]), use_cache=False).logits[0].float().log_softmax(-1)
            lps.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        out.append(lps[1] - lps[0])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--plain-limit", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    threads = max(1, os.cpu_count() or 1)
    C.header("task scoring speed: the sentiment set, SmolLM2-135M teacher and its 10-layer cut", threads, "fp32", [
        "same sentences, prompt and choices for every arm; fp32; one process, arms alternated",
        f"raykd: batched ({a.batch}), shared few-shot prefix computed once per batch; plain: one forward per sentence and choice",
    ])
    C.set_threads(threads)
    from raykd.tasks import sentiment

    sentiment.fetch()
    items = sentiment.load()[: a.limit]
    teacher, student, tok = C.load_teacher_student()
    figures, rates = {}, {}
    for name, model in (("teacher", teacher), ("student", student)):
        sentiment.score(model, tok, items[:16], a.batch)  # warm-up
        t = time.perf_counter()
        res = sentiment.score(model, tok, items, a.batch)
        dt = time.perf_counter() - t
        rates[name] = len(items) / dt
        figures[f"sentences_per_s_{name}"] = rates[name]
        figures[f"auc_{name}"] = res["auc"]
        figures[f"acc_{name}"] = res["acc"]
        C.progress(f"{name}: {len(items)} sentences in {dt:.1f} s ({rates[name]:.1f}/s), acc {res['acc']:.3f}, auc {res['auc']:.3f}")
    figures["both_models_s"] = 2000 / rates["teacher"] + 2000 / rates["student"]
    few = items[: a.plain_limit]
    t = time.perf_counter()
    plain = plain_margins(teacher, tok, few)
    plain_rate = len(few) / (time.perf_counter() - t)
    from raykd.tasks.scoring import loglikelihoods

    prompt = tok(sentiment.PROMPT, add_special_tokens=False)["input_ids"]
    reqs = [(prompt + tok(" " + i["text"] + "\nSentiment:", add_special_tokens=False)["input_ids"],
             tok(c, add_special_tokens=False)["input_ids"]) for i in few for c in sentiment.CHOICES]
    ours = loglikelihoods(teacher, reqs, pad_id=tok.pad_token_id or 0, batch_size=a.batch)
    worst = max(abs((ours[2 * k + 1][0] - ours[2 * k][0]) - m) for k, m in enumerate(plain))
    if worst > 1e-2:
        raise SystemExit(f"the arms disagree: max margin difference {worst:.4f}")
    figures.update(sentences_per_s_plain_teacher=plain_rate, speedup_vs_plain=rates["teacher"] / plain_rate,
                   max_margin_diff=worst, sentences=len(items))
    C.figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
