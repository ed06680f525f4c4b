"""Pareto fronts of a sweep's trials (pure Python, no Ray): the trials no other beats in validation perplexity
and student size, or perplexity and latency (`raykd.report` draws and lists them; `raykd.sweep.front` scores them
fully). Latency counts per student size: one shape runs at one speed, and what differs between trials of the same
shape is the machine's timing noise, which must decide neither the front nor which trials a sweep scores fully.
"""

from __future__ import annotations

import math
import numbers
import statistics

LATENCY, SIZE = "student_latency_ms", "student_params"


def num(x) -> float | None:
    """x as a finite float, or None (None, NaN, inf, bools and non-numbers)."""
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) else None  # numpy too


def pareto_front(points: list[tuple]) -> list[int]:
    """Indices (ascending) of the non-dominated points, both coordinates minimised.

    A point is dominated when another is <= in both coordinates and < in at least one, so exact
    duplicates of a front point are all on the front. Points with a None/NaN/inf coordinate are
    skipped. O(n log n): sort by (x, y), sweep keeping the lowest y seen."""
    ok = [(i, (num(a), num(b))) for i, (a, b) in enumerate(points)]
    order = sorted(((i, p) for i, p in ok if None not in p), key=lambda ip: ip[1])
    front, last = [], None
    for i, p in order:
        if last is None or p[1] < last[1] or p == last:
            front.append(i)
            last = p
    return sorted(front)


def coordinates(trials: list[dict], key: str) -> list[float | None]:
    """Each trial's coordinate on the front of metric `key` (trials with a `metrics` dict, or None for none): the
    metric itself, except latency, which is the median latency of the trials of the same size (`student_params`)."""
    xs = [num((t.get("metrics") or {}).get(key)) for t in trials]
    if key != LATENCY:
        return xs
    sizes = [num((t.get("metrics") or {}).get(SIZE)) for t in trials]
    by_size: dict[float, list[float]] = {}
    for size, x in zip(sizes, xs):
        if size is not None and x is not None:
            by_size.setdefault(size, []).append(x)
    return [statistics.median(by_size[size]) if size is not None and x is not None else x for size, x in zip(sizes, xs)]
