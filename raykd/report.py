"""The sweep report: trials.csv, pareto.csv, best_config.yaml, PNG plots, report.md, report.html.

Pure Python + matplotlib (Agg; no Ray). Input: one dict per trial, as `raykd.sweep.collect_trials`
builds them: trial_id, status (TERMINATED | EARLY_STOPPED | ERROR), error, params (dotted key ->
sampled value), metrics (METRIC_COLUMNS), steps, max_steps, history ([{step, val_loss, loss}]),
config (the complete config dict). Missing/None fields are tolerated (a failed trial may carry no metrics).

The efficiency/accuracy trade-off is the Pareto front (both minimised) of validation perplexity
against student parameters (`front=params`) and against measured student latency
(`front=latency`; a trial counts at the median latency of its size's trials: `raykd.fronts`);
pareto.csv holds both, told apart by its `front` column. Early-stopped trials have no final perplexity or latency, so they are not on the fronts; the tables and trials.csv show
the perplexity of their last evaluation (exp of its val_loss), marked with its step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from raykd.fronts import coordinates, pareto_front
from raykd.fronts import num as _num
from raykd.report_pages import html_page, markdown_page

METRIC_COLUMNS = ("val_perplexity", "top1_agreement", "student_params", "student_latency_ms", "student_tokens_per_s", "val_loss")
FRONTS = {"params": "student_params", "latency": "student_latency_ms"}
AXIS = {"params": "student parameters", "latency": "student latency per block (ms)"}
DEPTH = "student.num_layers"
PLOTS = ("ppl_vs_params", "ppl_vs_latency", "learning_curves", "sensitivity")


def asha_savings(trials: list[dict]) -> dict:
    """Trial-steps run against trial-steps a full run of every trial would take.

    Failed (ERROR) trials are left out of both sums: their lost steps are not savings."""
    ran = [t for t in map(_norm, trials) if t["status"] != "ERROR"]
    done, full = sum(t["steps"] for t in ran), sum(t["max_steps"] for t in ran)
    return {"trial_steps": done, "full_steps": full, "saved_fraction": (1 - done / full) if full else 0.0,
            "early_stopped": sum(t["status"] == "EARLY_STOPPED" for t in ran)}


def _norm(t: dict) -> dict:
    """A trial dict with every field present and of the expected kind, plus `last_eval`."""
    m = t.get("metrics") or {}
    n = {
        "trial_id": str(t.get("trial_id", "?")), "status": str(t.get("status") or "UNKNOWN"),
        "error": " ".join(str(t["error"]).split()) if t.get("error") else None,
        "params": dict(t.get("params") or {}),
        "metrics": {**{k: m.get(k) for k in METRIC_COLUMNS}, **{k: v for k, v in m.items() if str(k).startswith("task_")}},
        "steps": int(_num(t.get("steps")) or 0), "max_steps": int(_num(t.get("max_steps")) or 0),
        "history": [h for h in t.get("history") or [] if isinstance(h, dict)], "config": t.get("config"), "scored": t.get("scored"),
    }
    return {**n, "last_eval": _last_eval(n)}


def _last_eval(t: dict) -> tuple[int, float] | None:
    """(step, perplexity) at the last evaluation of a trial that did not finish: exp(val_loss) of its last
    report, else of the last point of its history; None for finished trials (theirs is the final one)."""
    loss, step = _num(t["metrics"]["val_loss"]), t["steps"]
    if loss is None or not step:
        points = [(_num(h.get("step")), _num(h.get("val_loss"))) for h in t["history"]]
        step, loss = max((p for p in points if None not in p), default=(0, None))
    return None if t["status"] == "TERMINATED" or loss is None else (int(step), math.exp(min(loss, 700.0)))


def _last_ppl(t: dict) -> float:
    return t["last_eval"][1] if t["last_eval"] else math.inf


def _ppl(t: dict) -> float | None:
    return _num(t["metrics"]["val_perplexity"])


def _best_of(trials: list[dict], need_config: bool = False) -> dict | None:
    """Lowest val_perplexity among finished (TERMINATED) trials, else among any with one."""
    scored = [t for t in trials if _ppl(t) is not None and (t["config"] or not need_config)]
    pool = [t for t in scored if t["status"] == "TERMINATED"] or scored
    return min(pool, key=_ppl) if pool else None


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10000:
        return f"{x:,}"
    return str(x)


def _task_fronts(trials: list[dict], meta: dict) -> dict[str, list[int]]:
    """A Pareto front of each task objective (`task:sentiment_auc`, the score made a cost by its sign)
    against student parameters: the accuracy/size trade-off, smallest student first."""
    from raykd.tasks.names import objective_metric

    fronts = {}
    for objective in (o for o in meta.get("objectives") or [] if str(o).startswith("task:")):
        key, mode = objective_metric(objective)
        sign = -1.0 if mode == "max" else 1.0
        cost = [None if _num(t["metrics"].get(key)) is None else sign * _num(t["metrics"][key]) for t in trials]
        idx = pareto_front([(c, t["metrics"]["student_params"]) for c, t in zip(cost, trials)])
        fronts[objective] = sorted(idx, key=lambda i: (_num(trials[i]["metrics"]["student_params"]), cost[i]))
    return fronts


# --- files -------------------------------------------------------------------------------------


def task_columns(trials: list[dict], table: bool = False) -> list[str]:
    """The task_* metric keys any trial reports (raykd.tasks.flat); `table`: the main scores only."""
    keys = sorted({k for t in trials for k in t["metrics"] if k.startswith("task_")})
    skip = ("_rougeL", "_bleu", "_cer_text", "_logprob", "_retained", "_acc_norm")
    return [k for k in keys if not (table and k.endswith(skip))]


def _write_csvs(out: Path, trials: list[dict], params: list[str], fronts: dict) -> None:
    tasks = task_columns(trials)
    cols = [*params, *METRIC_COLUMNS, *tasks, "steps", "max_steps"]

    def values(t):
        return [*(t["params"].get(p) for p in params), *(t["metrics"].get(m) for m in (*METRIC_COLUMNS, *tasks)),
                t["steps"], t["max_steps"]]

    with (out / "trials.csv").open("w", newline="") as fh:  # last_val_*: the last evaluation of a trial that did not finish
        w = csv.writer(fh)
        w.writerow(["trial_id", "status", *cols, "last_val_perplexity", "last_val_step", "error"])
        w.writerows([t["trial_id"], t["status"], *values(t), *(t["last_eval"] or ("", ""))[::-1], t["error"] or ""] for t in trials)
    with (out / "pareto.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["front", "trial_id", "status", *cols])
        for name, idx in fronts.items():
            for i in idx:
                w.writerow([name, trials[i]["trial_id"], trials[i]["status"], *values(trials[i])])


def _write_best(out: Path, best: dict) -> Path:
    """best_config.yaml; its output_dir is OUT/best, relative to the working directory when OUT
    lies below it (so the file stays portable), else runs/best."""
    from raykd.config import from_dict

    try:
        rerun_dir = (out.resolve() / "best").relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        rerun_dir = "runs/best"
    cfg = dict(best["config"])
    cfg.update(sweep=None, output_dir=rerun_dir)
    text = from_dict(cfg).to_yaml()  # validates: a ConfigError leaves no file behind
    sampled = ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items()))
    head = (f"# best trial {best['trial_id']} of the sweep: val_perplexity {_ppl(best):.4g}\n# sampled: {sampled}\n"
            "# rerun: raykd distill best_config.yaml   (check: raykd plan best_config.yaml)\n")
    path = out / "best_config.yaml"
    path.write_text(head + text)
    return path


# --- plots -------------------------------------------------------------------------------------


def _plots(out: Path, trials: list[dict], params: list[str], fronts: dict, meta: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    groups = sorted({t["params"].get(DEPTH) for t in trials}, key=str) if DEPTH in params else [None]
    for name, key in FRONTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for g in groups:
            pts = [(_num(t["metrics"][key]), _ppl(t)) for t in trials if g is None or t["params"].get(DEPTH) == g]
            pts = [p for p in pts if None not in p]
            if pts:
                ax.scatter(*zip(*pts), s=28, alpha=0.8, label="finished trials" if g is None else f"{g} layers")
        at = coordinates(trials, key)
        front = sorted((at[i], _ppl(trials[i])) for i in fronts[name])  # latency: at its size's median
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2)
            ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="tab:red", lw=1.6, zorder=3, label="Pareto front")
            if teacher := _num(meta.get("teacher_val_perplexity")):
                ax.axhline(teacher, color="gray", ls=":", lw=1, label=f"teacher ({teacher:.3g})")
            _logy(ax)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished trial with this metric", ha="center", transform=ax.transAxes)
        ax.set(xlabel=AXIS[name], ylabel="validation perplexity (log)", title=f"perplexity vs {AXIS[name]}")
        paths[f"ppl_vs_{name}"] = _save(plt, fig, out / f"ppl_vs_{name}.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for t in trials:
        h = sorted(p for p in ((_num(p.get("step")), _num(p.get("val_loss"))) for p in t["history"]) if None not in p)
        if h:
            style = {"EARLY_STOPPED": "--", "ERROR": ":"}.get(t["status"], "-")
            ax.plot(*zip(*h), ls=style, marker=".", label=f"{t['trial_id'][-8:]} {t['status'].lower()}")
            drawn += 1
    if drawn and drawn <= 16:
        ax.legend(fontsize=7, ncol=2, loc="best")
    elif not drawn:
        ax.text(0.5, 0.5, "no validation-loss history", ha="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="learning curves (dashed: stopped early)")
    paths["learning_curves"] = _save(plt, fig, out / "learning_curves.png")

    cols = min(4, max(1, len(params)))
    rows = math.ceil(max(1, len(params)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False)
    scored = [t for t in trials if _ppl(t) is not None]
    for k, ax in enumerate(axes.flat):
        if k >= len(params):
            ax.axis("off")
            if not params:
                ax.text(0.5, 0.5, "no searched parameters", ha="center", transform=ax.transAxes)
            continue
        _sensitivity(ax, params[k], scored)
    fig.suptitle("sensitivity of validation perplexity to each searched parameter (finished trials)", fontsize=10)
    paths["sensitivity"] = _save(plt, fig, out / "sensitivity.png")
    return paths


def _sensitivity(ax, param: str, scored: list[dict]) -> None:
    vals = [(t["params"].get(param), _ppl(t)) for t in scored]
    ax.set_xlabel(param, fontsize=8)
    ax.set_ylabel("val perplexity", fontsize=8)
    ax.tick_params(labelsize=7)
    if not vals:
        ax.text(0.5, 0.5, "no finished trials", ha="center", transform=ax.transAxes, fontsize=8)
        return
    numeric = all(_num(v) is not None for v, _ in vals)
    if numeric:
        xs = [_num(v) for v, _ in vals]
        ax.scatter(xs, [y for _, y in vals], s=20)
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
    else:  # categorical: one column of points per value, spread a little so ties stay visible
        cats = sorted({str(v) for v, _ in vals})
        seen: dict[str, int] = {}
        xs = []
        for v, _ in vals:
            c = str(v)
            seen[c] = seen.get(c, 0) + 1
            xs.append(cats.index(c) + 0.06 * (seen[c] // 2) * (-1) ** seen[c])
        ax.scatter(xs, [y for _, y in vals], s=20)
        ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7)
        ax.set_xlim(-0.6, len(cats) - 0.4)
    _logy(ax)


def _logy(ax) -> None:
    """Log-scale y axis labelled with plain numbers (500, 600) rather than 5x10^2."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter())


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- report.md / report.html -------------------------------------------------------------------


def _row(t: dict, params: list[str], error: bool = False, tasks: tuple = ()) -> list[tuple[str, float | None]]:
    """Table cells as (text, numeric sort key or None)."""
    m = t["metrics"]
    cells = [(t["trial_id"], None), (t["status"], None)]
    cells += [(_fmt(t["params"].get(p)), _num(t["params"].get(p))) for p in params]
    cells += [_ppl_cell(t) if k == "val_perplexity" else (_fmt(m.get(k)), _num(m.get(k))) for k in (*METRIC_COLUMNS, *tasks)]
    cells.append((f"{t['steps']}/{t['max_steps']}", t["steps"]))
    return cells + ([(t["error"] or "", None)] if error else [])


def _ppl_cell(t: dict) -> tuple[str, float | None]:
    """The final perplexity, or that of the last evaluation of a trial that did not finish, marked with its step
    (and no sort key: sorting the column orders final perplexities, the marked ones after them)."""
    if _ppl(t) is not None or not t["last_eval"]:
        return _fmt(_ppl(t)), _ppl(t)
    step, ppl = t["last_eval"]
    return f"{_fmt(ppl)} ({'stopped' if t['status'] == 'EARLY_STOPPED' else 'last evaluation'} at step {step})", None


def _sections(trials, params, fronts, meta, savings, best, best_note):
    """Summary lines and (title, header, rows, trial ids to highlight) tables shared by md and HTML."""
    tasks = tuple(task_columns(trials, table=True))
    head = ["trial", "status", *params, "val ppl", "top-1 agree", "student params", "latency ms", "tokens/s", "val loss",
            *(k[len("task_"):] for k in tasks), "steps"]
    scored = [t for t in trials if _ppl(t) is not None]
    tables = []
    seen = [t for t in trials if _ppl(t) is not None or t["last_eval"]]
    if DEPTH in params and seen:  # a depth without a finished trial: its best stopped one, marked
        depths = sorted({t["params"].get(DEPTH) for t in seen}, key=lambda d: (_num(d) is None, _num(d) or 0, str(d)))
        picks = [_best_of([t for t in scored if t["params"].get(DEPTH) == d])
                 or min((t for t in seen if t["params"].get(DEPTH) == d), key=_last_ppl) for d in depths]
        tables.append(("Best configuration per student depth", head, [_row(t, params, tasks=tasks) for t in picks], set()))
    elif best is not None:
        tables.append(("Best configuration", head, [_row(best, params, tasks=tasks)], set()))
    for name, idx in fronts.items():
        title = f"validation perplexity vs {AXIS[name]}" if name in AXIS else f"{name[len('task:'):]} vs student parameters"
        tables.append((f"Pareto front: {title}", head, [_row(trials[i], params, tasks=tasks) for i in idx], set()))
    order = sorted(trials, key=lambda t: (t["status"] == "ERROR", _ppl(t) is None, _ppl(t) or _last_ppl(t)))
    on_front = {trials[i]["trial_id"] for idx in fronts.values() for i in idx}
    tables.append(("All trials (by validation perplexity; failed trials last, with their error)", [*head, "error"],
                   [_row(t, params, error=True, tasks=tasks) for t in order], on_front))

    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    other = sum(v for k, v in counts.items() if k not in ("TERMINATED", "EARLY_STOPPED", "ERROR"))
    wall = _num(meta.get("wall_s"))
    summary = [
        f"Experiment `{meta.get('experiment', '?')}`: search {meta.get('search', '?')}, scheduler {meta.get('scheduler', '?')}"
        + {"depth": " (one ASHA bracket per student depth)", "one": " (one ASHA bracket)"}.get(meta.get("asha_brackets"), "") + ", "
        f"metric {meta.get('metric', 'val_loss')}" + (f", wall time {wall:.0f} s ({wall / 60:.1f} min)." if wall is not None else "."),
        f"{len(trials)} trials: {counts.get('TERMINATED', 0)} finished, {counts.get('EARLY_STOPPED', 0)} stopped early, "
        f"{counts.get('ERROR', 0)} failed" + (f", {other} unfinished." if other else "."),
        *(["Trials that did not finish show the validation perplexity of their last evaluation, marked with its step; "
           "the Pareto fronts and best_config.yaml take finished trials only."] if any(t["last_eval"] for t in trials) else []),
        (f"Early stopping: the trials ran {savings['trial_steps']} of {savings['full_steps']} trial-steps "
         f"({100 * savings['saved_fraction']:.0f}% saved; failed trials not counted)."),
    ]
    if full := sum(t["scored"] == "full" for t in trials):
        summary.append(f"Top-1 agreement and task scores: the {full} trial(s) on the fronts or best of their size, scored fully after "
                       "the sweep (`sweep.evaluate: front`); the other trials were scored on the student alone.")
    tp, tppl = _num(meta.get("teacher_params")), _num(meta.get("teacher_val_perplexity"))
    if tp or tppl:
        summary.append(f"Teacher: {_fmt(int(tp)) if tp else '?'} parameters, validation perplexity {_fmt(tppl) or '?'}.")
    failed = [t for t in trials if t["status"] == "ERROR"]
    summary += [f"Failed trial {t['trial_id']}: {t['error'] or 'no error message'}" for t in failed[:5]]
    summary += [f"... and {len(failed) - 5} more failed trials (errors in the trials table)."] if len(failed) > 5 else []
    if meta.get("interrupted"):
        summary.append("The sweep was interrupted: `raykd sweep CONFIG --resume` continues it.")
    if best is not None:
        summary.append(f"Best: trial {best['trial_id']} ({best['status'].lower()}), validation perplexity {_ppl(best):.4g}, "
                       + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best["params"].items())) + f". {best_note}")
    else:
        summary.append(f"No trial finished with a validation perplexity. {best_note}")
    return summary, tables


def write_report(out_dir, trials: list[dict], meta: dict) -> dict[str, Path]:
    """Write the report set into `out_dir`; returns {name: path} with keys trials, pareto,
    best_config (only when some trial has a validation perplexity and a config), the PLOTS,
    md, html. Failed trials and missing metrics never raise."""
    from raykd.errors import ConfigError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = [_norm(t) for t in trials]
    meta = dict(meta or {})
    params = sorted({k for t in trials for k in t["params"]})
    fronts = {}  # name -> trial indices on that front, smallest student / lowest latency first
    for name, key in FRONTS.items():
        xs = coordinates(trials, key)  # latency: its size's median (raykd.fronts)
        fronts[name] = sorted(pareto_front([(_ppl(t), x) for t, x in zip(trials, xs)]), key=lambda i, xs=xs: (xs[i], _ppl(trials[i])))
    fronts.update(_task_fronts(trials, meta))
    savings = asha_savings(trials)
    paths = {"trials": out / "trials.csv", "pareto": out / "pareto.csv"}
    _write_csvs(out, trials, params, fronts)
    best, note = _best_of(trials, need_config=True), "No best_config.yaml written."
    stale = out / "best_config.yaml"
    if best is not None:
        try:
            paths["best_config"] = _write_best(out, best)
            note = "Its complete config: `best_config.yaml`."
        except ConfigError as e:
            note = f"best_config.yaml not written: {e}"
    if "best_config" not in paths and stale.exists():
        stale.unlink()  # a rebuilt report must not keep a best config from an older run
    images = _plots(out, trials, params, fronts, meta)
    paths.update(images)
    summary, tables = _sections(trials, params, fronts, meta, savings, best or _best_of(trials), note)
    (out / "report.md").write_text(markdown_page(summary, tables, images))
    (out / "report.html").write_text(html_page(summary, tables, images))
    paths.update(md=out / "report.md", html=out / "report.html")
    return paths
