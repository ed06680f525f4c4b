"""The sweep's search algorithm is seeded from the run's `seed` (no Ray cluster needed: the
searcher is driven directly, as Tune's controller would)."""

from pathlib import Path

import pytest

from raykd.config import _build
from raykd.sweep import searcher
from raykd.sweep_config import SweepConfig

PARAMS = {"loss.weights.hidden": {"uniform": [0.0, 1.0]}, "loss.kd": {"choice": ["forward_kl", "reverse_kl", "jsd"]},
          "student.num_layers": {"randint": [2, 5]}}


def _draws(search: str, seed: int, n: int = 5, params: dict = PARAMS, **flags) -> list[dict]:
    from ray.tune.experiment import Experiment

    sw = _build(SweepConfig, {"num_samples": n, "search": search, "max_concurrent": 100, "params": params, **flags}, "sweep")
    alg, space = searcher(sw, seed)
    alg.add_configurations([Experiment("draws", lambda config: None, config=space, num_samples=n)])
    out = []
    while (trial := alg.next_trial()) is not None:
        out.append(dict(trial.config))
    return out


def test_random_search_is_reproducible_from_seed():
    a, b, c = _draws("random", 7), _draws("random", 7), _draws("random", 8)
    assert len(a) == 5 and a == b  # same seed: the same trials in the same order
    assert a != c  # another seed samples other trials
    assert {d["loss.kd"] for d in a} <= {"forward_kl", "reverse_kl", "jsd"}
    assert all(2 <= d["student.num_layers"] <= 5 for d in a)


def test_paired_draws_run_every_recipe_at_every_depth():
    """sweep.paired: sample k's random values are drawn once and shared by every grid point, so each depth runs
    the same recipes (in the same order); unpaired, each (depth, sample) draws its own."""
    params = {**{k: v for k, v in PARAMS.items() if k != "student.num_layers"}, "student.num_layers": {"grid": [2, 3, 4]},
              "train.lr": {"loguniform": [1e-4, 1e-2]}}

    def recipes(draws: list[dict]) -> dict[int, list[tuple]]:
        return {d: [(x["loss.weights.hidden"], x["loss.kd"], x["train.lr"]) for x in draws if x["student.num_layers"] == d] for d in (2, 3, 4)}

    paired, unpaired = recipes(_draws("random", 3, 4, params, paired=True)), recipes(_draws("random", 3, 4, params))
    assert all(len(v) == 4 for v in paired.values()) and paired[2] == paired[3] == paired[4] and len(set(paired[2])) == 4
    assert all(len(v) == 4 for v in unpaired.values()) and not set(unpaired[2]) & set(unpaired[3])
    assert paired == recipes(_draws("random", 3, 4, params, paired=True))  # seeded as before
    from raykd.config import ConfigError

    with pytest.raises(ConfigError, match=r"^sweep.paired: pairs random draws across grid keys"):
        _build(SweepConfig, {"paired": True, "params": PARAMS}, "sweep")  # no grid key to pair over
    with pytest.raises(ConfigError, match=r"^sweep.paired: .* needs search: random"):
        _build(SweepConfig, {"paired": True, "search": "optuna", "params": params}, "sweep")


@pytest.mark.parametrize("search", ["grid", "random", "optuna"])
def test_max_concurrent_reaches_the_generator(search):
    params = {"loss.kd": {"choice": ["forward_kl", "jsd"]}} if search == "grid" else PARAMS
    sw = _build(SweepConfig, {"num_samples": 2, "search": search, "max_concurrent": 3, "params": params}, "sweep")
    alg, _ = searcher(sw, 0)
    assert alg.max_concurrent == 3  # Tune ignores TuneConfig.max_concurrent_trials for a generator it is given
    # (Optuna: a ConcurrencyLimiter around the searcher, as Tune would have made)


@pytest.mark.parametrize("scale, params, expected", [
    ({}, {}, True),  # one DDP worker: the trial trains in its own process
    ({"num_workers": 2}, {}, False),  # several workers: a TorchTrainer (a process group, Ray Train's placement)
    ({"num_workers": [1, 2], "max_failures": 3}, {}, False),  # elastic
    ({"strategy": "fsdp2"}, {}, False),  # FSDP2 / DeepSpeed want a process group even for one rank
    ({}, {"scale.num_workers": {"choice": [1, 2]}}, False),  # the base config must decide it for every trial
    ({}, {"in_process": False}, False),  # turned off
])
def test_which_trials_train_in_their_own_process(scale, params, expected):
    from raykd.config import from_dict
    from raykd.sweep import in_process

    flags = {k: v for k, v in params.items() if "." not in k}
    searched = {k: v for k, v in params.items() if "." in k}
    sw = _build(SweepConfig, {"params": {**PARAMS, **searched}, **flags}, "sweep")
    assert in_process(from_dict({"teacher": {"model": "tiny-random"}, "scale": scale}), sw) is expected


def test_a_persisted_checkpoint_is_whole_and_named_as_ray_train_names_it(tmp_path):
    """`raykd.sweep.inproc.persist`: an in-process trial's checkpoint lands in storage/name/checkpoint_<time>, with
    every file, no staging directory left, and a newer checkpoint sorting after an older one."""
    from raykd.sweep.inproc import persist

    src = tmp_path / "src"
    (src / "student").mkdir(parents=True)
    (src / "metrics.json").write_text('{"val_perplexity": 3.5}')
    (src / "student" / "model.safetensors").write_bytes(b"w" * 1000)
    first = persist(str(src), str(tmp_path / "out"), "train")
    second = persist(str(src), str(tmp_path / "out"), "train")
    run = tmp_path / "out" / "train"
    assert sorted(p.name for p in run.iterdir()) == sorted([first.path.rsplit("/", 1)[1], second.path.rsplit("/", 1)[1]])
    assert first.path < second.path and all(p.name.startswith("checkpoint_") for p in run.iterdir())
    with first.as_directory() as d:
        assert Path(d, "student", "model.safetensors").read_bytes() == b"w" * 1000
        assert '"val_perplexity": 3.5' in Path(d, "metrics.json").read_text()
