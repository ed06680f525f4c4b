"""The quality study across seeds: each model's mean and spread, each arm's paired lead over logit-only KD,
and the share of the teacher's task scores each arm keeps. Pure functions over the per-seed results.json
dicts `bench/quality.py` writes (no Ray, no torch).

A lead is *within noise* when it is smaller than either the 95% confidence half-width of the paired
per-seed leads (Student's t, the arms share each seed's cut, data order and schedule) or the spread of
the arm's own perplexity between seeds (max - min over mean): a lead under the seed-to-seed spread is
not reported as a win.
"""
from __future__ import annotations

import math
import statistics

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)
FIXED = ("init", "teacher")  # models every seed scores identically (training-free)
TASKS = ("sentiment_auc", "sentiment_acc", "cloze_acc", "cer", "sentiment_retained", "cloze_retained", "cer_retained")


def stats(xs: list[float]) -> dict:
    """{n, mean, sd (sample; 0 for one value), min, max, spread: (max - min) / mean}."""
    mean = statistics.fmean(xs)
    return {"n": len(xs), "mean": mean, "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / mean if mean else 0.0}


def model_metrics(res: dict, model: str) -> dict[str, float]:
    """One seed's figures of one model: ppl (in domain), ppl_<set> out of domain, its task scores, task_share
    (the mean retained share of sentiment AUC and cloze accuracy over chance), train wall and tokens/s."""
    out = {"ppl": res["perplexity"][model]}
    out.update({f"ppl_{k}": v[model] for k, v in res["perplexity_out_of_domain"].items()})
    tasks = res.get("tasks", {}).get(model, {})
    out.update({k: tasks[k] for k in TASKS if isinstance(tasks.get(k), (int, float))})
    if "sentiment_retained" in out and "cloze_retained" in out:
        out["task_share"] = (out["sentiment_retained"] + out["cloze_retained"]) / 2
    run = res.get("runs", {}).get(model)
    if run:
        out.update(wall_s=run.get("wall_with_generation_s", run["wall_s"]), tokens_per_s=run["tokens_per_s"])
    return out


def lead(per_seed: list[dict], arm: str, base: str) -> dict:
    """`arm`'s paired relative lead over `base` in held-out perplexity, 1 - ppl(arm) / ppl(base), per seed, with
    its mean, sd, 95% half-width, the arm's seed spread and whether the lead is within noise."""
    leads = [1 - r["perplexity"][arm] / r["perplexity"][base] for r in per_seed]
    s = stats(leads)
    half = T975.get(s["n"] - 1, 1.96) * s["sd"] / math.sqrt(s["n"]) if s["n"] > 1 else math.inf
    seed_spread = stats([r["perplexity"][arm] for r in per_seed])["spread"]
    return {"per_seed": leads, **s, "ci95": half, "seed_spread": seed_spread,
            "within_noise": abs(s["mean"]) <= max(half, seed_spread)}


def summarize(results: dict[int, dict]) -> dict:
    """{seed: results.json} -> {seeds, arms, models: {model: {metric: stats}}, leads: {arm: lead over logit}}.
    Only arms every seed ran are summarised."""
    seeds = sorted(results)
    per_seed = [results[s] for s in seeds]
    models = [m for m in per_seed[0]["perplexity"] if all(m in r["perplexity"] for r in per_seed)]
    arms = [m for m in models if m not in FIXED]
    summary = {"seeds": seeds, "arms": arms, "models": {}}
    for m in models:
        rows = [model_metrics(r, m) for r in per_seed]
        keys = [k for k in rows[0] if all(k in row for row in rows)]
        summary["models"][m] = {k: stats([row[k] for row in rows]) for k in keys}
    if "logit" in arms:
        summary["leads"] = {a: lead(per_seed, a, "logit") for a in arms if a != "logit"}
    return summary


def figures(summary: dict) -> dict:
    """The bench line's figures: every model's means under the single-seed names (ppl_M, ood_ppl_M for pydoc,
    emails_ppl_M, moby_ppl_M, *_over_teacher_M, M_<task>, task_share_M, wall_s_M), `_sd` beside each arm's
    when there are several seeds, and the leads over logit-only (feature_lead_over_logit, ..._ci95, ..._within_noise)."""
    ms, many = summary["models"], len(summary["seeds"]) > 1
    teacher = ms["teacher"]
    out: dict = {}

    def put(name: str, m: str, key: str) -> None:
        if key in ms[m]:
            out[name] = ms[m][key]["mean"]
            if many and m not in FIXED:
                out[name + "_sd"] = ms[m][key]["sd"]

    names = {"ppl": "ppl_{}", "ppl_pydoc": "ood_ppl_{}", "ppl_emails": "emails_ppl_{}", "ppl_moby": "moby_ppl_{}"}
    for key, pattern in names.items():
        for m in ms:
            put(pattern.format(m), m, key)
    for key, pattern in (("ppl_pydoc", "ood_over_teacher_{}"), ("ppl_emails", "emails_over_teacher_{}"), ("ppl_moby", "moby_over_teacher_{}")):
        for m in summary["arms"]:
            if key in ms[m]:
                out[pattern.format(m)] = ms[m][key]["mean"] / teacher[key]["mean"]
    for m in summary["arms"]:
        out[f"{m}_over_teacher"] = ms[m]["ppl"]["mean"] / teacher["ppl"]["mean"]
    arms = set(summary["arms"])
    if {"ce", "logit", "feature"} <= arms:
        out["feature_beats_both"] = int(ms["feature"]["ppl"]["mean"] < min(ms["ce"]["ppl"]["mean"], ms["logit"]["ppl"]["mean"]))
    for m in ms:
        for key in (*TASKS, "task_share"):
            put(f"{m}_{key}" if key != "task_share" else f"task_share_{m}", m, key)
        if m in arms:
            put(f"wall_s_{m}", m, "wall_s")
    for arm, ld in summary.get("leads", {}).items():
        out[f"{arm}_lead_over_logit"] = ld["mean"]
        if many:
            out.update({f"{arm}_lead_over_logit_sd": ld["sd"], f"{arm}_lead_over_logit_ci95": ld["ci95"],
                        f"{arm}_lead_within_noise": int(ld["within_noise"])})
    out["seeds"] = len(summary["seeds"])
    return out


def markdown(summary: dict) -> str:
    """A table: each model's mean ± sd (min-max over seeds) per figure, then the leads over logit-only in words."""
    ms = summary["models"]
    cols = [("ppl", "held-out ppl", 1), ("ppl_pydoc", "pydoc", 0), ("ppl_emails", "emails", 0), ("ppl_moby", "Moby-Dick", 0),
            ("sentiment_auc", "sentiment AUC", 3), ("cloze_acc", "cloze acc", 3), ("task_share", "task share", 2), ("wall_s", "train s", 0)]
    cols = [c for c in cols if any(c[0] in ms[m] for m in ms)]
    n = len(summary["seeds"])
    lines = [f"seeds {', '.join(map(str, summary['seeds']))}: mean ± sd (min–max)" if n > 1 else f"seed {summary['seeds'][0]}",
             "", "| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for m, row in ms.items():
        cells = []
        for key, _, nd in cols:
            s = row.get(key)
            if s is None:
                cells.append("–")
            elif n == 1 or m in FIXED:
                cells.append(f"{s['mean']:,.{nd}f}")
            else:
                cells.append(f"{s['mean']:,.{nd}f} ± {s['sd']:,.{nd}f} ({s['min']:,.{nd}f}–{s['max']:,.{nd}f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for arm, ld in summary.get("leads", {}).items():
        per = ", ".join(f"{x:+.1%}" for x in ld["per_seed"])
        verdict = ("within noise (no win)" if ld["within_noise"] else ("ahead" if ld["mean"] > 0 else "behind")) if n > 1 else "one seed: no spread"
        noise = f"; 95% ±{ld['ci95']:.1%}, {arm}'s seed spread {ld['seed_spread']:.1%}" if n > 1 else ""
        lines.append(f"\n{arm} vs logit: perplexity lead {ld['mean']:+.1%} (per seed {per}{noise}): {verdict}")
    return "\n".join(lines) + "\n"
