"""The sweep's ASHA keeps one bracket per student depth (no Ray cluster needed: the scheduler is
driven directly with stand-in trials, as Tune's controller would drive it)."""

import pickle
import random
from types import SimpleNamespace

import pytest

from raykd.config import _build
from raykd.sweep import trial_scheduler
from raykd.sweep_config import SweepConfig

CONTINUE, STOP = "CONTINUE", "STOP"


def _scheduler(params: dict, **sweep):
    sw = _build(SweepConfig, {"grace_period": 4, "reduction_factor": 2, "params": params, **sweep}, "sweep")
    s = trial_scheduler(sw, max_steps=16)
    assert s.set_search_properties("val_loss", "min")  # what tune.TuneConfig(metric=..., mode=...) does
    return s


def _trial(name: str, depth=None, **config):
    cfg = {**config, **({} if depth is None else {"student.num_layers": depth})}
    return SimpleNamespace(trial_id=name, config=cfg)


DEPTHS = {"student.num_layers": {"choice": [2, 4]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}


def _feed(s, trials, results):
    for t in trials:
        s.on_trial_add(None, t)
    by_id = {t.trial_id: t for t in trials}
    return [s.on_trial_result(None, by_id[i], {"step": step, "val_loss": loss}) for i, step, loss in results]


def test_a_deep_trial_competes_only_with_its_own_depth():
    s = _scheduler(DEPTHS)
    shallow, shallow_worse, deep, deep_worse = _trial("s1", 2), _trial("s2", 2), _trial("d1", 4), _trial("d2", 4)
    got = _feed(s, [shallow, shallow_worse, deep, deep_worse], [
        ("s1", 4, 5.0),   # first at the step-4 rung of depth 2
        ("s2", 4, 5.2),   # worse than s1 at the same rung and depth: stopped
        ("d1", 4, 6.0),   # deeper students start slower: far worse than both shallow ones, yet its own depth's first
        ("d2", 4, 6.5),   # worse than d1, its own depth: stopped
        ("s1", 8, 4.0),
        ("d1", 8, 5.5),   # still worse than s1 at step 8; alone at its depth's step-8 rung
        ("d1", 16, 5.0),  # the end of the run (max_t): Tune ends the trial there
    ])
    assert got == [CONTINUE, STOP, CONTINUE, STOP, CONTINUE, CONTINUE, STOP]
    s.on_trial_complete(None, deep, {"step": 16, "val_loss": 5.0})
    assert "student.num_layers=2" in s.debug_string() and "student.num_layers=4" in s.debug_string()


def test_one_bracket_for_all_depths_stops_the_deep_trials():
    """sweep.asha_brackets=one: plain ASHA, where a deeper, slower-starting trial is judged against shallow ones."""
    s = _scheduler(DEPTHS, asha_brackets="one")
    got = _feed(s, [_trial("s1", 2), _trial("d1", 4)], [("s1", 4, 5.0), ("d1", 4, 6.0)])
    assert got == [CONTINUE, STOP]


@pytest.mark.parametrize("seed", range(3))
def test_without_depths_in_the_sweep_it_decides_as_plain_asha(seed):
    rng = random.Random(seed)
    params = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    trials = [_trial(f"t{i}", lr=rng.random()) for i in range(8)]
    results = [(f"t{i}", step, rng.uniform(4, 7)) for step in (4, 8, 12, 16) for i in rng.sample(range(8), 8)]
    ours, plain = _scheduler(params), _scheduler(params, asha_brackets="one")
    assert type(ours) is not type(plain)
    assert _feed(ours, trials, results) == _feed(plain, trials, results)


def test_survives_pickling_mid_sweep():
    """Tune pickles the scheduler with the Tuner (tuner.pkl, what `--resume` restores)."""
    s = _scheduler(DEPTHS)
    a, b = _trial("a", 2), _trial("b", 2)
    assert _feed(s, [a], [("a", 4, 5.0)]) == [CONTINUE]
    s = pickle.loads(pickle.dumps(s))
    assert _feed(s, [b], [("b", 4, 5.5)]) == [STOP]


def test_fifo():
    s = _scheduler(DEPTHS, scheduler="fifo")
    assert _feed(s, [_trial("s1", 2), _trial("d1", 4)], [("s1", 4, 5.0), ("d1", 4, 9.0)]) == [CONTINUE, CONTINUE]
