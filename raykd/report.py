"""The sweep report: trials.csv, pareto.csv, best_config.yaml, PNG plots, report.md, report.html.

Pure Python + matplotlib (no Ray). Input: one dict per trial, as `raykd.sweep.collect_trials`
builds them: trial_id, status (TERMINATED | EARLY_STOPPED | ERROR), error, params (dotted
key -> sampled value), metrics (val_perplexity, top1_agreement, student_params,
student_latency_ms, student_tokens_per_s, val_loss), steps, max_steps, history
([{step, val_loss, loss}]), config (the trial's complete config dict).

The efficiency/accuracy trade-off is the Pareto front (both minimised) of validation
perplexity against student parameters and against measured student latency. Early-stopped
trials have no final perplexity; their last `val_loss` shows in the learning curves.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path

METRIC_COLUMNS = ("val_perplexity", "top1_agreement", "student_params", "student_latency_ms", "student_tokens_per_s", "val_loss")
FRONTS = {"params": "student_params", "latency": "student_latency_ms"}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def pareto_front(points: list[tuple]) -> list[int]:
    """Indices of the non-dominated points, both coordinates minimised; None/NaN points skipped.
    A point is dominated when another is <= in both coordinates and < in at least one."""
    ok = [(i, (_num(a), _num(b))) for i, (a, b) in enumerate(points)]
    ok = [(i, p) for i, p in ok if None not in p]
    order = sorted(ok, key=lambda ip: (ip[1][0], ip[1][1]))
    front, best_b = [], math.inf
    for k, (i, (a, b)) in enumerate(order):
        if b < best_b:
            front.append(i)
            best_b = b
        elif b == best_b and front and points[front[-1]][0] == a:  # an exact duplicate of a front point
            front.append(i)
    return sorted(front)


def asha_savings(trials: list[dict]) -> dict:
    ran = sum(int(t.get("steps") or 0) for t in trials if t["status"] != "ERROR")
    full = sum(int(t.get("max_steps") or 0) for t in trials if t["status"] != "ERROR")
    return {"trial_steps": ran, "full_steps": full, "saved_fraction": (1 - ran / full) if full else 0.0,
            "early_stopped": sum(t["status"] == "EARLY_STOPPED" for t in trials)}


def _fronts(trials: list[dict]) -> dict[str, list[int]]:
    return {name: pareto_front([(t["metrics"].get("val_perplexity"), t["metrics"].get(key)) for t in trials]) for name, key in FRONTS.items()}


def _best(trials: list[dict]) -> dict | None:
    scored = [t for t in trials if _num(t["metrics"].get("val_perplexity")) is not None and t.get("config")]
    done = [t for t in scored if t["status"] == "TERMINATED"] or scored
    return min(done, key=lambda t: t["metrics"]["val_perplexity"]) if done else None


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


# --- files -------------------------------------------------------------------------------------


def _write_csvs(out: Path, trials: list[dict], params: list[str], fronts: dict) -> None:
    head = ["trial_id", "status", *params, *METRIC_COLUMNS, "steps", "max_steps", "error"]
    with (out / "trials.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for t in trials:
            w.writerow([t["trial_id"], t["status"], *(t["params"].get(p) for p in params),
                        *(t["metrics"].get(m) for m in METRIC_COLUMNS), t["steps"], t["max_steps"], t.get("error") or ""])
    with (out / "pareto.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["front", "trial_id", *params, *METRIC_COLUMNS])
        for name, idx in fronts.items():
            for i in idx:
                t = trials[i]
                w.writerow([name, t["trial_id"], *(t["params"].get(p) for p in params), *(t["metrics"].get(m) for m in METRIC_COLUMNS)])


def _write_best(out: Path, best: dict) -> Path:
    from raykd.config import from_dict

    cfg = dict(best["config"])
    cfg.update(sweep=None, output_dir="runs/best")
    path = out / "best_config.yaml"
    header = f"# best trial {best['trial_id']} of the sweep (val_perplexity {best['metrics']['val_perplexity']:.4g}); `raykd distill` reruns it\n"
    path.write_text(header + from_dict(cfg).to_yaml())
    return path


def _plots(out: Path, trials: list[dict], params: list[str], fronts: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for name, key in FRONTS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = [(t["metrics"].get(key), t["metrics"].get("val_perplexity")) for t in trials]
        xs = [x for x, y in pts if _num(x) is not None and _num(y) is not None]
        ys = [y for x, y in pts if _num(x) is not None and _num(y) is not None]
        ax.scatter(xs, ys, color="tab:blue", label="trials")
        front = sorted((pts[i] for i in fronts[name]), key=lambda p: p[0])
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red")
            ax.scatter([p[0] for p in front], [p[1] for p in front], color="tab:red", zorder=3, label="Pareto front")
        if ys:
            ax.set_yscale("log")
        ax.set_xlabel("student parameters" if name == "params" else "student latency per block (ms)")
        ax.set_ylabel("validation perplexity")
        ax.legend()
        paths[f"ppl_vs_{name}"] = _save(fig, out / f"ppl_vs_{name}.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        h = [(p["step"], p["val_loss"]) for p in t.get("history") or [] if _num(p.get("val_loss")) is not None]
        if h:
            ax.plot(*zip(*h), linestyle="--" if t["status"] == "EARLY_STOPPED" else "-", marker=".", label=t["trial_id"][-8:])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("learning curves (dashed: stopped early by ASHA)")
    paths["learning_curves"] = _save(fig, out / "learning_curves.png")
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(3.2 * max(1, len(params)), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        vals = [(t["params"].get(p), t["metrics"].get("val_perplexity")) for t in trials if _num(t["metrics"].get("val_perplexity")) is not None]
        cats = sorted({str(v) for v, _ in vals if _num(v) is None})
        xs = [(_num(v) if _num(v) is not None else cats.index(str(v))) for v, _ in vals]
        ax.scatter(xs, [y for _, y in vals])
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_xlabel(p)
        ax.set_ylabel("val perplexity")
        if vals:
            ax.set_yscale("log")
    fig.suptitle("sensitivity of perplexity to each searched parameter (finished trials)")
    paths["sensitivity"] = _save(fig, out / "sensitivity.png")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- report.md / report.html ---------------------------------------------------------------


def _sections(trials, params, fronts, meta, savings, best):
    """(title, header, rows) tables shared by the Markdown and HTML reports."""
    order = sorted(range(len(trials)), key=lambda i: (trials[i]["status"] == "ERROR", trials[i]["metrics"].get("val_perplexity") or math.inf))
    head = ["trial", "status", *params, "val ppl", "top-1", "params", "latency ms", "steps", "error"]

    def row(t):
        m = t["metrics"]
        return [t["trial_id"], t["status"], *(_fmt(t["params"].get(p)) for p in params), _fmt(m.get("val_perplexity")),
                _fmt(m.get("top1_agreement")), _fmt(m.get("student_params")), _fmt(m.get("student_latency_ms")),
                f"{t['steps']}/{t['max_steps']}", t.get("error") or ""]

    tables = []
    depth_key = "student.num_layers"
    scored = [t for t in trials if _num(t["metrics"].get("val_perplexity")) is not None]
    if depth_key in params and scored:
        by_depth = {}
        for t in scored:
            d = t["params"][depth_key]
            if d not in by_depth or t["metrics"]["val_perplexity"] < by_depth[d]["metrics"]["val_perplexity"]:
                by_depth[d] = t
        tables.append(("Best configuration per student depth", head, [row(by_depth[d]) for d in sorted(by_depth)], set()))
    for name in FRONTS:
        tables.append((f"Pareto front: perplexity vs {name}", head, [row(trials[i]) for i in fronts[name]], set()))
    front_ids = {trials[i]["trial_id"] for idx in fronts.values() for i in idx}
    tables.append(("All trials (sorted by validation perplexity; failed trials last)", head, [row(trials[i]) for i in order], front_ids))
    n = len(trials)
    summary = [
        f"{n} trials: {sum(t['status'] == 'TERMINATED' for t in trials)} finished, {savings['early_stopped']} stopped early, "
        f"{sum(t['status'] == 'ERROR' for t in trials)} failed; search {meta.get('search', '?')}, scheduler {meta.get('scheduler', '?')}, "
        f"wall {meta.get('wall_s', 0):.0f} s.",
        f"Trial-steps run: {savings['trial_steps']} of {savings['full_steps']} ({100 * savings['saved_fraction']:.0f}% saved by early stopping).",
        (f"Best: trial {best['trial_id']}, validation perplexity {best['metrics']['val_perplexity']:.4g} — `best_config.yaml`." if best
         else "No trial finished with a validation perplexity: no best_config.yaml."),
    ]
    return summary, tables


def _markdown(summary, tables, images) -> str:
    lines = ["# raykd sweep report", "", *summary, ""]
    for title, head, rows, _ in tables:
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in images.items()]
    return "\n".join(lines) + "\n"


_JS = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0],
asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';const v=r=>{const x=r.children[i].textContent;const n=parseFloat(x);return isNaN(n)?x:n};
[...b.rows].sort((p,q)=>{const a=v(p),c=v(q);return (a>c?1:a<c?-1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r));}"""


def _html(summary, tables, images) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>raykd sweep report</title><style>",
             "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}",
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{cursor:pointer;background:#eee}",
             "tr.front{background:#fde8e8;font-weight:bold}tr.ERROR{color:#999}img{max-width:48%;margin:4px}</style>",
             f"<script>{_JS}</script></head><body><h1>raykd sweep report</h1>"]
    parts += [f"<p>{html.escape(s)}</p>" for s in summary]
    for title, head, rows, highlight in tables:
        parts.append(f"<h2>{html.escape(title)}</h2><table><thead><tr>")
        parts += [f"<th onclick='sortBy(this)'>{html.escape(h)}</th>" for h in head]
        parts.append("</tr></thead><tbody>")
        for r in rows:
            cls = " ".join(c for c in (("front" if r[0] in highlight else ""), r[1]) if c)
            parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("<h2>Plots</h2>")
    for k, p in images.items():
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<img alt='{k}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(out_dir, trials: list[dict], meta: dict) -> dict[str, Path]:
    """Write the whole report set into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = sorted({k for t in trials for k in t["params"]})
    fronts = _fronts(trials)
    savings = asha_savings(trials)
    best = _best(trials)
    paths = {"trials": out / "trials.csv", "pareto": out / "pareto.csv"}
    _write_csvs(out, trials, params, fronts)
    if best is not None:
        paths["best_config"] = _write_best(out, best)
    images = _plots(out, trials, params, fronts)
    paths.update(images)
    summary, tables = _sections(trials, params, fronts, meta, savings, best)
    (out / "report.md").write_text(_markdown(summary, tables, images))
    (out / "report.html").write_text(_html(summary, tables, images))
    paths.update(md=out / "report.md", html=out / "report.html")
    return paths
