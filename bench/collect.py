"""Run every benchmark in bench/ and write docs/BENCHMARKS.md (`make bench`).

Fetches the inputs first (`raykd fetch teacher`, `raykd fetch corpus sotu`), then runs each
bench/*.py that is a benchmark (not `_common.py`, not this file) in turn, one at a time, as
`python bench/NAME.py`, echoing its output. Each benchmark's last line holds its figures as
`name=value` pairs; its header holds the machine, threads, precision and fairness notes.
The document gets the machine, the date, the library versions and, per benchmark, a table of
every figure with its goal (where it has one) and whether that goal is met. A benchmark that
fails is recorded as failed with the last line of its error, and this exits non-zero at the
end. Goals that are not met are reported, not treated as failures.

    .venv/bin/python bench/collect.py [--only chunked_loss kd_step ...] [--out docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"collect.py"}
ORDER = ["chunked_loss", "kd_step", "vs_trl", "asha", "cache", "topk", "sweep_overhead", "quality"]  # others follow, sorted
OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
GOALS = {  # script -> figure -> (op, value, what it means)
    "chunked_loss": {"peak_memory_ratio": ("<=", 0.25, "raykd / naive peak memory increase"),
                     "time_ratio": ("<=", 1.2, "raykd / naive fwd+bwd time"),
                     "same_result": ("==", 1, "loss and gradients allclose")},
    "kd_step": {"overhead_ratio": ("<=", 1.10, "KD step / (teacher fwd + student CE step)")},
    "vs_trl": {"tokens_per_s_ratio": (">=", 2.2, "raykd / TRL GKDTrainer tokens/s"),
               "peak_memory_ratio": ("<=", 0.5, "raykd / TRL peak RSS"),
               "plain_loop_ratio": (">=", 1.1, "raykd / plain PyTorch loop tokens/s"),
               "peak_memory_ratio_ckpt": ("<=", 0.5, "raykd / TRL peak RSS, activation checkpointing on in both"),
               "roofline": (">=", 0.85, "model FLOPs/token x raykd tokens/s / measured GEMM FLOP/s in the run's precision")},
    "asha": {"trial_steps_saved": (">=", 0.5, "1 - ASHA trial-steps / FIFO trial-steps"),
             "same_best": ("==", 1, "ASHA and FIFO pick the same best trial"),
             "wall_time_saved": (">=", 0.4, "1 - ASHA sweep wall / FIFO sweep wall")},
    "cache": {"sweep_time_ratio": ("<=", 0.5, "cached sweep wall (build included) / online sweep wall"),
              "max_ppl_deviation": ("<=", 0.02, "max over trials of abs(cached / online val ppl - 1)")},
    "topk": {"ppl_ratio_default": ("<=", 1.02, "val ppl from the cache at the default teacher.cache_topk / from the dense teacher")},
    "sweep_overhead": {"fixed_s_per_trial": ("<=", 10.0, "a real-teacher trial's wall minus its training loop, seconds (sweep.evaluate: front)"),
                       "max_ppl_deviation": ("<=", 0.01, "max over trials of abs(front-arm / all- or trainer-arm val ppl - 1): light scoring and in-process trials measure the same")},
    "quality": {"feature_beats_both": ("==", 1, "feature arm ppl below the ce and logit arms'"),
                "feature_over_teacher": ("<=", 2.5, "feature arm ppl / teacher ppl on held-out text"),
                "ood_over_teacher_feature": ("<=", 4.0, "feature arm ppl / teacher ppl out of domain (pydoc prose)"),
                "emails_over_teacher_feature": ("<=", 4.0, "feature arm ppl / teacher ppl out of domain (held-out mail)"),
                "task_share_feature": (">=", 0.8, "feature arm's retained share of the teacher's lead over chance, sentiment AUC and cloze")},
    "eval_speed": {"both_models_s": ("<=", 120.0, "the 2,000-sentence sentiment set, student + teacher, seconds"),
                   "max_margin_diff": ("<=", 0.01, "batched/prefix-cached scorer agrees with one forward per choice")},
    "generate": {"speedup": (">=", 1.5, "raykd batched KV-cache sampling / per-prompt model.generate, teacher tokens/s")},
    "gpu_check": {"ddp_ok": ("==", 1, "ddp multi-task steps, reductions and checkpoint round trip on NCCL"),
                  "fsdp2_ok": ("==", 1, "the same with FSDP2"),
                  "mfu_1p7b": (">=", 0.40, "student-step MFU of the 1.7B Llama shape, bf16 (H100/H200)")},
}


HAND_KEPT = "## Measured outside `make bench`"  # docs/BENCHMARKS.md from this heading on is written by hand


def keep_hand_section(old: str, new: str) -> str:
    """`new` with the hand-maintained section of `old` (from HAND_KEPT on) appended: a rerun keeps it."""
    parts = old.split(HAND_KEPT, 1)
    return new if len(parts) == 1 else new.rstrip("\n") + "\n\n" + HAND_KEPT + parts[1]


def benchmarks(only: list[str] | None) -> list[Path]:
    found = {p.stem: p for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name not in NOT_BENCHMARKS}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    if only:
        unknown = set(only) - set(found)
        if unknown:
            raise SystemExit(f"collect: no benchmark named {sorted(unknown)}; have {names}")
        names = [n for n in names if n in only]
    return [found[n] for n in names]


def parse_figures(line: str) -> dict[str, str]:
    out = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            return {}
        out[key] = value
    return out


def run(path: Path, args: list[str] = (), echo: bool = True) -> dict:
    """Run one benchmark (`python PATH ARGS`), echoing its output; its figures, notes and status."""
    if echo:
        print(f"\n######## {path.name}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, cwd=C.ROOT)
    lines = []
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    rc = proc.wait()
    return parse_run(path.stem, lines, rc, time.perf_counter() - t0, args)


def parse_run(name: str, lines: list[str], rc: int, wall: float | None, args=()) -> dict:
    """A benchmark's output lines -> its figures (the last line), title, set-up and fairness notes, status."""
    text = [x for x in lines if x.strip()]
    figures = parse_figures(text[-1]) if text else {}
    info = {"name": name, "args": list(args), "rc": rc, "wall_s": wall, "figures": figures, "title": "", "notes": [],
            "setup": [], "error": None}
    in_notes = False
    for x in lines:
        if x.startswith("== ") and not info["title"]:
            info["title"] = x[3:]
        elif x.startswith(("torch threads:", "machine:", "load average")):
            info["setup"].append(x)
        elif x.startswith("fairness:"):
            in_notes = True
        elif in_notes and x.startswith("  - "):
            info["notes"].append(x[4:])
        elif in_notes:
            in_notes = False
    if not figures:
        last = text[-1] if text else "no output"
        info["error"] = last if rc != 0 else f"last line holds no name=value figures: {last}"
    elif rc != 0:
        info["error"] = f"exited {rc} after printing its figures"
    return info


def check(op: str, goal: float, value: str | None) -> str:
    """'yes' / '**no**' for a figure against its goal; 'missing' / '?' when it cannot be told."""
    if value is None:
        return "missing"
    try:
        return "yes" if OPS[op](float(value), goal) else "**no**"
    except ValueError:
        return "?"


def goal_rows(name: str, figures: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    """(figure, what, value, goal, met) for every figure: the goals of `name` first, then the rest."""
    goals = GOALS.get(name, {})
    rows = [(key, what, figures.get(key, "missing"), f"{op} {goal:g}", check(op, goal, figures.get(key)))
            for key, (op, goal, what) in goals.items()]
    rows += [(key, "", value, "–", "–") for key, value in figures.items() if key not in goals]
    return rows


def goals_met(info: dict) -> tuple[int, int]:
    rows = goal_rows(info["name"], info["figures"])[:len(GOALS.get(info["name"], {}))]
    return sum(r[4] == "yes" for r in rows), len(rows)


def section(info: dict, machine_now: str) -> list[str]:
    out = [f"## `bench/{info['name']}.py`", ""]
    if info["title"]:
        out += [info["title"], ""]
    cmd = " ".join([f".venv/bin/python bench/{info['name']}.py", *info.get("args", [])])
    wall = f"wall time {info['wall_s']:.0f} s" if info.get("wall_s") is not None else "run on its own, its output read from a log"
    out += [f"Command: `{cmd}` — measured {info.get('date', '?')}, {wall}.", ""]
    if info.get("machine") and info["machine"] != machine_now:
        out += [f"Measured on another machine: {info['machine']}.", ""]
    if info["error"]:
        out += [f"**FAILED** (exit {info['rc']}): `{info['error']}`", ""]
    if info["figures"]:
        out += ["| figure | value | goal | met |", "|---|---|---|---|"]
        for key, what, value, goal, met in goal_rows(info["name"], info["figures"]):
            out.append(f"| `{key}`{f' ({what})' if what else ''} | {value} | {goal} | {met} |")
        out.append("")
    if info["setup"]:
        out += [f"* {x}" for x in info["setup"]] + [""]
    if info["notes"]:
        out += ["How the comparison was made fair:", ""] + [f"* {n}" for n in info["notes"]] + [""]
    return out


def machine_line(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, SIMD: {m['simd']}"


def render(infos: list[dict], machine: dict, versions: dict, date: str) -> str:
    """The whole of docs/BENCHMARKS.md from the benchmarks' results."""
    now = machine_line(machine)
    lines = [
        "# Benchmarks", "",
        "Generated by `make bench` (`bench/collect.py`; `--only NAME` re-runs one benchmark and keeps the others' "
        "stored results). Every figure below was measured by its script in one run, the arms side by side on the "
        "same machine; nothing is copied from elsewhere. Goals are from issue 7; a goal not met is reported, not hidden.", "",
        f"* generated: {date}",
        f"* machine: {now}",
        "* versions: " + ", ".join(f"{k} {val}" for k, val in versions.items()), "",
        "| benchmark | status | goals met | measured |", "|---|---|---|---|",
    ]
    for info in infos:
        met, total = goals_met(info)
        status = "FAILED" if info["error"] else "ok"
        lines.append(f"| [`{info['name']}`](#bench{info['name']}py) | {status} | {met} / {total} | {info.get('date', '?')} |")
    lines.append("")
    for info in infos:
        lines += section(info, now)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="benchmark names (file stems) to run; the others keep their stored results")
    p.add_argument("--out", default=str(C.ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--no-fetch", action="store_true", help="skip fetching the teacher and corpus")
    p.add_argument("--from-log", nargs="*", default=[], metavar="NAME=FILE",
                   help="take a benchmark's result from the saved output of a standalone run (`python bench/NAME.py ... > FILE`) instead of running it")
    a = p.parse_args()
    out = Path(a.out)
    store = out.with_suffix(".json")  # every benchmark's last result, so that --only can refresh one of them
    logs = dict(x.split("=", 1) for x in a.from_log if "=" in x)
    if len(logs) != len(a.from_log):
        raise SystemExit("collect: --from-log takes NAME=FILE pairs, e.g. cache=/tmp/cache.log")
    if logs:
        benchmarks(list(logs))  # unknown names fail here
        a.only = (a.only or []) + [n for n in logs if n not in (a.only or [])]
    paths = benchmarks(a.only)
    if not a.no_fetch:
        for what in (["teacher"], ["corpus", "sotu"]):
            subprocess.run([sys.executable, "-m", "raykd.cli", "fetch", *what], check=True, cwd=C.ROOT)
    machine = C.machine()
    fresh = []
    for path in paths:
        if path.stem in logs:
            log = Path(logs[path.stem])
            info = parse_run(path.stem, log.read_text().splitlines(), 0, None)
            when = dt.datetime.fromtimestamp(log.stat().st_mtime).astimezone()
        else:
            info, when = run(path), dt.datetime.now().astimezone()
        info.update(date=when.strftime("%Y-%m-%d %H:%M %Z"), machine=machine_line(machine), versions=C.versions())
        fresh.append(info)
    stored = json.loads(store.read_text()) if a.only and store.is_file() else {}
    stored.update({i["name"]: i for i in fresh})
    known = [p.stem for p in benchmarks(None)]
    infos = [stored[n] for n in known if n in stored] + [stored[n] for n in sorted(set(stored) - set(known))]
    out.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(stored, indent=1))
    page = render(infos, machine, C.versions(), dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    out.write_text(keep_hand_section(out.read_text() if out.exists() else "", page))
    failed = [i["name"] for i in fresh if i["error"]]
    print(f"\nwrote {out} ({len(infos)} benchmark(s); ran {len(fresh)}, {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
