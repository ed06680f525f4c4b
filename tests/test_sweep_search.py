"""The sweep's search algorithm is seeded from the run's `seed` (no Ray cluster needed: the
searcher is driven directly, as Tune's controller would)."""

import pytest

from raykd.config import _build
from raykd.sweep import searcher
from raykd.sweep_config import SweepConfig

PARAMS = {"loss.weights.hidden": {"uniform": [0.0, 1.0]}, "loss.kd": {"choice": ["forward_kl", "reverse_kl", "jsd"]},
          "student.num_layers": {"randint": [2, 5]}}


def _draws(search: str, seed: int, n: int = 5) -> list[dict]:
    from ray.tune.experiment import Experiment

    sw = _build(SweepConfig, {"num_samples": n, "search": search, "max_concurrent": n, "params": PARAMS}, "sweep")
    alg, space = searcher(sw, seed)
    alg.add_configurations([Experiment("draws", lambda config: None, config=space, num_samples=n)])
    out = []
    while len(out) < n and (trial := alg.next_trial()) is not None:
        out.append(dict(trial.config))
    return out


def test_random_search_is_reproducible_from_seed():
    a, b, c = _draws("random", 7), _draws("random", 7), _draws("random", 8)
    assert len(a) == 5 and a == b  # same seed: the same trials in the same order
    assert a != c  # another seed samples other trials
    assert {d["loss.kd"] for d in a} <= {"forward_kl", "reverse_kl", "jsd"}
    assert all(2 <= d["student.num_layers"] <= 5 for d in a)


@pytest.mark.parametrize("search", ["grid", "random", "optuna"])
def test_max_concurrent_reaches_the_generator(search):
    params = {"loss.kd": {"choice": ["forward_kl", "jsd"]}} if search == "grid" else PARAMS
    sw = _build(SweepConfig, {"num_samples": 2, "search": search, "max_concurrent": 3, "params": params}, "sweep")
    alg, _ = searcher(sw, 0)
    assert alg.max_concurrent == 3  # Tune ignores TuneConfig.max_concurrent_trials for a generator it is given
    # (Optuna: a ConcurrencyLimiter around the searcher, as Tune would have made)
