"""The load watcher of the benchmarks (not a benchmark itself): were other heavy jobs running
beside a benchmark, and how much CPU did processes other than its own use? `_common.header`
starts one `Watch`; `_common.figures` prints what it saw before the figures line."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

OTHER_JOBS = re.compile(r"pytest|raykd (distill|sweep|cache)")  # what else may run here (shared machine)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def other_jobs() -> dict[int, str]:
    """Other heavy jobs now running (pytest, raykd distill/sweep/cache), not our own ancestors: pid -> kind."""
    mine, found = _ancestors(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        m = OTHER_JOBS.search(cmd)
        if m:
            found[int(d.name)] = m.group(0)
    return found


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, of them niced), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / hz, nice / hz


def _descendant_cpu() -> dict[int, float]:
    """CPU seconds (user + system) so far of every live descendant of this process, by pid:
    Ray's raylet and worker processes are descendants of the driver, but are never reaped by
    it, so `os.times()` misses them."""
    hz, parent, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)], cpu[int(d.name)] = int(f[1]), (int(f[11]) + int(f[12])) / hz
        except (OSError, ValueError, IndexError):
            continue
    me, out = os.getpid(), {}
    for pid in cpu:
        p, seen = pid, 0
        while p > 1 and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
            if p == me:
                out[pid] = cpu[pid]
                break
    return out


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # children: those reaped (our arms)


class Watch:
    """Watches the machine from the header to the figures line: were other heavy jobs running
    beside this benchmark, and how much CPU did processes other than ours use? (its timings
    would then be taken under load)"""

    def __init__(self, every: float = 5.0):
        import threading

        self.start_load, self.seen = loadavg(), {}
        self.t0, self.cpu0, self.own0 = time.perf_counter(), _cpu_seconds(), _own_seconds()
        self.self0 = sum(os.times()[:2])
        self.kids0 = _descendant_cpu()  # descendants' CPU before the watch began
        self.kids: dict[int, float] = dict(self.kids0)  # every descendant (arms, Ray processes): last CPU seconds seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            kids = _descendant_cpu()
            self.kids.update(kids)
            self.seen.update({pid: kind for pid, kind in other_jobs().items() if pid not in kids})  # our own runs are not others
            self._stop.wait(every)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=10)
        wall, cpu, own = time.perf_counter() - self.t0, _cpu_seconds(), _own_seconds()
        capacity = wall * (os.cpu_count() or 1)
        # ours: this process + every descendant, sampled every few seconds (Ray workers are never
        # reaped by us, so os.times() misses them); a descendant's last seconds before it exits are missed
        self.kids.update(_descendant_cpu())
        # (reaped children are in os.times() in full: take whichever account sees more)
        sampled = sum(os.times()[:2]) - self.self0 + sum(self.kids.values()) - sum(self.kids0.values())
        mine = max(sampled, own - self.own0)
        others = max(0.0, (cpu[0] - self.cpu0[0]) - mine) / capacity
        niced = (cpu[1] - self.cpu0[1]) / capacity
        kinds = sorted(set(self.seen.values()))
        jobs = f"yes, {', '.join(kinds)} ({len(self.seen)} processes)" if kinds else "none"
        under = " -> figures taken UNDER LOAD" if kinds or others > 0.1 else ""
        return (f"load average (1/5/15 min): start {self.start_load}, end {loadavg()}; other jobs seen during the run: {jobs}; "
                f"CPU used by processes other than this benchmark: {others:.0%} of the machine (niced CPU in all: {niced:.0%}){under}")
