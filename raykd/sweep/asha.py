"""The sweep's early stopping: ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter
Tuning") with one bracket per student depth, deciding by trial order.

Tune's ASHA judges a trial reaching a rung against the trials that reached it *before* it, so which
trial survives depends on which one the machine ran faster: the same sweep can keep a different best
trial from one run to the next. `OrderedASHA` judges trial i at a rung against the trials added before
it (j < i, in the seeded search's order) that survived every earlier rung, with ASHA's own rule: stop
when its value is worse than the best 1 / reduction_factor of theirs. When a trial reaches a rung before
an earlier one has, its verdict waits (the trial keeps training) and is given at its next report once
the earlier trials have reached that rung or ended; so the verdicts, and the trials that survive,
depend on the trials' losses only, not on timing. `verdicts()` tells the sweep which trials were
judged stopped, including one that reached its last step before its verdict could be given.

`DepthASHA` keeps one bracket per value of `student.num_layers`: a deeper, slower-starting student
competes only with students of its depth, so each depth keeps its best trial running to the end.
"""

from __future__ import annotations

import math

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raykd.report import DEPTH

CONTINUE, STOP = "CONTINUE", "STOP"


class OrderedASHA(FIFOScheduler):
    """One ASHA bracket whose decisions follow the order trials were added (see the module docstring).
    Rungs at grace_period * reduction_factor**k steps below max_t."""

    def __init__(self, time_attr: str = "step", max_t: int = 100, grace_period: int = 1, reduction_factor: float = 4,
                 metric: str | None = None, mode: str | None = None):
        super().__init__()
        if not (0 < grace_period <= max_t) or reduction_factor <= 1:
            raise ValueError(f"OrderedASHA: need 0 < grace_period <= max_t and reduction_factor > 1, got {grace_period}, {max_t}, {reduction_factor}")
        self._time_attr, self._rf, self._metric, self._mode, self._max_t = time_attr, reduction_factor, metric, mode, max_t
        n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1e-9) + 1
        self._rungs = [r for r in (grace_period * reduction_factor ** k for k in range(n)) if r < max_t]
        self._order: list[str] = []  # trial ids as added
        self._values: dict[str, dict] = {}  # trial id -> {rung: reward at that rung}
        self._ended: set[str] = set()  # trials that report no more
        self._stopped: dict[str, float] = {}  # trial id -> the rung it was judged stopped at
        self._passed: dict[str, set] = {}  # trial id -> rungs it was judged to go on from

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def on_trial_add(self, tune_controller, trial):
        self._order.append(trial.trial_id)
        self._values[trial.trial_id], self._passed[trial.trial_id] = {}, set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._record(trial.trial_id, result)
        self._decide()
        done = result.get(self._time_attr, 0) >= self._max_t  # the end of the run (as Tune's ASHA says there)
        return STOP if trial.trial_id in self._stopped or done else CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._record(trial.trial_id, result or {})
        self._end(trial.trial_id)

    def on_trial_error(self, tune_controller, trial):
        self._end(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self._end(trial.trial_id)

    def verdicts(self) -> dict[str, float]:
        """trial id -> the rung (step) at which the trial was judged stopped."""
        return dict(self._stopped)

    def debug_string(self) -> str:
        return f"ASHA by trial order: rungs {self._rungs}, {len(self._stopped)} of {len(self._order)} trials stopped"

    def _record(self, tid: str, result: dict) -> None:
        if self._time_attr not in result or self._metric not in result or tid not in self._values:
            return
        step, value = result[self._time_attr], float(result[self._metric])
        reward = -value if self._mode == "min" else value
        for rung in self._rungs:  # the first report at or after a rung is the trial's value there (as Tune's ASHA)
            if step >= rung and rung not in self._values[tid]:
                self._values[tid][rung] = reward

    def _end(self, tid: str) -> None:
        self._ended.add(tid)
        self._decide()

    def _decide(self) -> None:
        """Give every verdict that the earlier trials now allow, rung by rung, trial by trial in order."""
        for rung_i, rung in enumerate(self._rungs):
            for i, tid in enumerate(self._order):
                if tid in self._stopped or rung in self._passed[tid] or rung not in self._values[tid]:
                    continue
                if any(r not in self._passed[tid] for r in self._rungs[:rung_i]):
                    continue  # an earlier rung's verdict is still open
                prior = []
                for j in self._order[:i]:
                    if j in self._stopped and self._stopped[j] < rung:
                        continue  # judged out before this rung: not a rival here
                    if rung in self._values[j] and all(r in self._passed[j] for r in self._rungs[:rung_i]):
                        prior.append(self._values[j][rung])
                    elif j in self._ended and rung not in self._values[j]:
                        continue  # ended (error, removal) before the rung
                    else:
                        break  # j may still reach this rung, or its earlier verdicts are open: wait
                else:
                    cutoff = np.nanpercentile(prior, (1 - 1 / self._rf) * 100) if prior else None
                    if cutoff is not None and self._values[tid][rung] < cutoff:
                        self._stopped[tid] = rung
                    else:
                        self._passed[tid].add(rung)


class DepthASHA(FIFOScheduler):
    """ASHA with one bracket per student depth: one scheduler (`OrderedASHA`, or Tune's `ASHAScheduler` with
    `ordered=False`) per value of `key` in the trial's config (made on that depth's first trial), and every
    call about a trial goes to its depth's."""

    def __init__(self, key: str = DEPTH, metric: str | None = None, mode: str | None = None, ordered: bool = True, **asha):
        super().__init__()
        self._make = OrderedASHA if ordered else ASHAScheduler
        self._make(**asha)  # checks the arguments now, not at the first trial
        self._key, self._asha, self._metric, self._mode = key, asha, metric, mode
        self._by_depth: dict = {}  # depth -> scheduler
        self._depth: dict[str, object] = {}  # trial_id -> depth

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _of(self, trial):
        return self._by_depth[self._depth[trial.trial_id]]

    def on_trial_add(self, tune_controller, trial):
        depth = (trial.config or {}).get(self._key)
        depth = depth.item() if hasattr(depth, "item") else depth  # numpy scalars from Tune's samplers
        if depth not in self._by_depth:
            self._by_depth[depth] = self._make(**self._asha)
            self._by_depth[depth].set_search_properties(self._metric, self._mode)  # as Tune sets them on a plain ASHA
        self._depth[trial.trial_id] = depth
        self._by_depth[depth].on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def verdicts(self) -> dict[str, float]:
        return {k: v for s in self._by_depth.values() if hasattr(s, "verdicts") for k, v in s.verdicts().items()}

    def debug_string(self) -> str:
        return "\n".join(f"{self._key}={d}: {s.debug_string()}" for d, s in self._by_depth.items()) or "ASHA per student depth"
