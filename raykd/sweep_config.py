"""The `sweep:` section of a config (`SweepConfig`): what `raykd sweep` searches and how. Kept beside
`raykd.config` (whose `Config.sweep` holds it as a plain dict until `raykd.sweep` builds it), with the
same one-line comment per field and validation in `__post_init__`; no Ray here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raykd.errors import ConfigError
from raykd.errors import check_choice as _choice
from raykd.errors import check_positive as _positive

SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
ASHA_BRACKETS = ("depth", "one")
OBJECTIVES = ("val_loss", "student_params")
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


def _number(value, field: str):
    """A range bound as a number (`'1e-3'` -> 0.001), or one line naming the field."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field}: bounds must be numbers, got {value!r}; e.g. [1.0e-4, 1.0e-2]")
    return value


def _flatten(params: dict, prefix: str = "") -> dict:
    """Nested sections -> dotted keys: `sweep.params.train.lr={choice: [...]}` on the command line nests
    as {train: {lr: {...}}}; YAML's `train.lr: {...}` is already flat. A later key wins (an override)."""
    out: dict = {}
    for key, spec in params.items():
        if isinstance(spec, dict) and spec and not set(spec) & set(DOMAINS) and all(isinstance(v, dict) for v in spec.values()):
            out.update(_flatten(spec, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


@dataclass
class SweepConfig:
    params: dict[str, Any] = field(default_factory=dict)  # dotted config key -> {choice|grid: [...]} or {uniform|loguniform|randint: [lo, hi]}
    num_samples: int = 4  # trials sampled (random / optuna); with grid keys: repeats of the grid
    paired: bool = False  # random search with grid keys: each sample's random values are drawn once and shared by every grid point (e.g. every student depth runs the same recipes), so the grid is compared on equal recipes; false: drawn anew per grid point
    search: str = "random"  # random | grid (grid keys only, no sampling) | optuna (TPE)
    scheduler: str = "asha"  # asha (stop poor trials early on val_loss) | fifo (run every trial to the end)
    grace_period: int = 4  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep 1 / reduction_factor of the trials at each rung
    asha_order: str = "trial"  # ASHA: trial (a trial is judged against the trials before it in the search's order: the same sweep keeps the same trials whatever the machine's timing) | arrival (Tune's ASHA: against the trials that reached the rung first)
    asha_brackets: str = "depth"  # ASHA: depth (a trial competes only with trials of its own student.num_layers, so every depth keeps a trial to the end) | one (all trials in one bracket)
    eval_every: int = 4  # steps between val_loss reports (ASHA's signal); sets train.eval_every and report_every
    max_concurrent: int = 2  # trials running at once (more where the cluster has room)
    trial_cpus: float = 0.1  # logical CPUs the Tune trial process itself reserves (its Train workers ask for their own)
    in_process: bool = True  # a one-worker trial trains in the Tune trial's own process (raykd.sweep.inproc: no Train controller or worker process to start); false: every trial fits its own TorchTrainer
    reuse_processes: bool = True  # in-process trials: a trial's process, once the trial ends or is stopped, takes a later trial (Tune's actor reuse: torch and transformers imported once per process); false: a new process per trial
    evaluate: str = "front"  # front: trials end scoring the student alone (eval.final light); the trials on the report's fronts and each size's best are then scored fully (teacher, agreement, tasks) | all: every trial fully at its end (what a task objective implies)
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])  # val_loss first; optuna takes several (multi-objective TPE): student_params (min), task:NAME_METRIC (e.g. task:sentiment_auc, max)

    @property
    def light_trials(self) -> bool:
        """Trials end with `eval.final: light` (a task objective needs every trial's task scores)."""
        return self.evaluate == "front" and not any(str(o).startswith("task:") for o in self.objectives)

    def __post_init__(self):
        self.params = _flatten(self.params) if isinstance(self.params, dict) else self.params
        if not self.params:
            raise ConfigError("sweep.params: nothing to search; add e.g. `student.num_layers: {choice: [2, 3, 4]}`")
        for key, spec in self.params.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
                raise ConfigError(f"sweep.params.{key}: give one of {', '.join(DOMAINS)}, e.g. {{choice: [1, 2]}} or {{loguniform: [1e-4, 1e-2]}}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.params.{key}.{kind}: expected a non-empty list of values")
            if kind in ("uniform", "loguniform", "randint"):  # YAML 1.1 reads 1e-3 (no dot) as text
                values = spec[kind] = [_number(v, f"sweep.params.{key}.{kind}") for v in values]
            if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
                raise ConfigError(f"sweep.params.{key}.{kind}: expected [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"sweep.params.{key}.loguniform: bounds must be > 0, got {values}")
        _positive("sweep.num_samples", self.num_samples)
        _choice("sweep.search", self.search, SEARCHES)
        _choice("sweep.scheduler", self.scheduler, SCHEDULERS)
        _choice("sweep.asha_brackets", self.asha_brackets, ASHA_BRACKETS)
        _choice("sweep.asha_order", self.asha_order, ("trial", "arrival"))
        _choice("sweep.evaluate", self.evaluate, ("front", "all"))
        for name in ("grace_period", "reduction_factor", "eval_every", "max_concurrent"):
            _positive(f"sweep.{name}", getattr(self, name))
        _positive("sweep.trial_cpus", self.trial_cpus, allow_zero=True)
        if (not self.objectives or any(o not in OBJECTIVES and not str(o).startswith("task:") for o in self.objectives)
                or len(set(self.objectives)) != len(self.objectives)):
            raise ConfigError(f"sweep.objectives: expected distinct names from {', '.join(OBJECTIVES)} or task:NAME_METRIC, got {self.objectives}")
        if self.objectives[0] != "val_loss":
            raise ConfigError("sweep.objectives: val_loss must come first (ASHA stops trials on it); e.g. [val_loss, student_params]")
        if len(self.objectives) > 1 and self.search != "optuna":
            raise ConfigError("sweep.objectives: several objectives need search: optuna (multi-objective TPE)")
        if self.paired and (self.search != "random" or not any(next(iter(v)) == "grid" for v in self.params.values())):
            raise ConfigError("sweep.paired: pairs random draws across grid keys; it needs search: random and a {grid: [...]} param"
                              " (e.g. student.num_layers: {grid: [8, 10, 12]}), or paired: false")
        if self.search == "grid" and any(next(iter(v)) not in ("choice", "grid") for v in self.params.values()):
            raise ConfigError("sweep.search: grid search takes only choice/grid params; use search: random for ranges")
