"""The one error type for bad input and the checks every config section shares (no imports from
raykd: every module may raise it)."""

from __future__ import annotations

import difflib
import math


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming the field and the fix."""


def suggest(name: str, choices) -> str:
    """'; did you mean X?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_choice(path: str, value, choices) -> None:
    """One line when `value` is not one of `choices` (the nearest suggested)."""
    if value not in choices:
        raise ConfigError(f"{path}: unknown value {value!r}{suggest(value, choices) or ';'} choose one of: {', '.join(map(str, choices))}")


def check_positive(path: str, value, allow_zero: bool = False) -> None:
    """One line when `value` is not a finite number > 0 (>= 0 with `allow_zero`)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}; give a value such as 1.0")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}: must be {bound}, got {value}; set it to a value {bound}")


class Diverged(RuntimeError):
    """A run whose loss or gradient norm became non-finite: one line naming the step, the terms and the fix."""


def check_finite(terms: dict, grad_norm: float, step: int, lr: float, norm_known: bool = True) -> None:
    """Raise `Diverged` when a report window's mean loss terms or the step's global grad norm are not finite
    (`norm_known` false: the engine reports nan for a norm it did not compute, DeepSpeed)."""
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if math.isinf(grad_norm) or (norm_known and math.isnan(grad_norm)):
        bad["grad_norm"] = grad_norm
    if bad:
        raise Diverged(f"train: the run diverged by step {step} ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
                       f"lower train.lr (now {lr:g}), raise train.warmup_steps or keep train.grad_clip on; "
                       "no checkpoint of the diverged weights was written")
