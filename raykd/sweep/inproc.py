"""A one-worker sweep trial trained in the Tune trial's own process (`sweep.in_process`).

A trial fitted through a `TorchTrainer` starts a Ray Train controller actor and a worker actor, two
more Python processes that import torch and transformers, before its first step (a good part of a
trial's fixed cost on 2 cores, `bench/sweep_overhead.py`). A trial with one worker needs neither:
this module runs the very same `raykd.train.train_loop_per_worker` in the trial's process. Ray
refuses `ray.train` calls inside a Tune trial, so the loop makes them through `raykd.runtime.session()`,
and here that is a `TrialSession`, which gives what a one-worker Train run would:

* the context of rank 0 of 1, the device Ray gave the trial, the whole (train, validation) datasets;
* every report goes to Tune (what `TuneReportCallback` does for a fitted trainer), so ASHA sees each
  `val_loss`;
* a reported checkpoint is copied into the run's storage (`storage`/`name`/checkpoint_<time>, the
  layout Ray Train writes and `raykd.sweep.front` reads), a shared `scale.storage_path` as well.

No other code path: the loop, the engine (world size 1: no process group), the checkpoint contents
and the metrics are those of `raykd distill`. A trial is never resumed mid-run (it checkpoints only
at its end), so `get_checkpoint` is None.
"""

from __future__ import annotations

import datetime

from raykd import manifest, runtime


class TrialSession:
    """`raykd.runtime.session()` in an in-process trial: rank 0 of 1; reports to Tune, checkpoints to the run's storage."""

    def __init__(self, storage: str, name: str, datasets: dict):
        self.storage, self.name, self.datasets = storage, name, datasets

    def get_context(self):
        return self  # the TrainContext calls the loop makes

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_world_size(self) -> int:
        return 1

    def get_device(self):
        import ray
        import torch

        return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")

    def get_dataset_shard(self, name: str):
        return self.datasets[name]

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict, checkpoint=None) -> None:
        from ray import tune

        metrics = dict(metrics)
        if checkpoint is not None:
            metrics["checkpoint_path"] = persist(checkpoint.path, self.storage, self.name).path
        tune.report(metrics)


def persist(local_dir: str, storage: str, name: str):
    """Copy the checkpoint in `local_dir` to `storage`/`name`/checkpoint_<UTC time> (Ray Train's naming, so the newest
    sorts last) on `storage`'s filesystem (a local path or a pyarrow URI); a
    `ray.train.Checkpoint` of the copy. Copied under a temporary name and renamed where the filesystem
    can, so a reader never finds half a checkpoint."""
    import pyarrow.fs as pafs
    import ray.train

    fs, run = manifest.run_dir(storage, name)
    dir_name = f"checkpoint_{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d_%H-%M-%S.%f}"
    final = f"{run}/{dir_name}"
    staged = final if "://" in storage else f"{run}/.{dir_name}.tmp"
    fs.create_dir(staged, recursive=True)
    pafs.copy_files(local_dir, staged, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if staged != final:
        fs.move(staged, final)
    return ray.train.Checkpoint(path=final, filesystem=fs)


def run_trial(train_fn, config: dict, datasets: dict, storage: str, name: str) -> None:
    """`train_fn(config)` here, as rank 0 of a one-worker run whose reports go to Tune (`TrialSession`).
    `datasets`: {"train", "validation"} Ray Datasets, iterated in order (what Train's DataConfig sets)."""
    from raykd.data import pipeline

    for ds in datasets.values():
        ds.context.execution_options = pipeline.ingest_options()
    runtime._SESSION.append(TrialSession(storage, name, datasets))
    try:
        train_fn(config)
    finally:
        runtime._SESSION.pop()
