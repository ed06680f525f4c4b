"""What every Ray entry point shares (`raykd distill`, `sweep`, `cache-teacher`, the train workers):
starting or joining Ray, the precision a run uses, torch threads, quiet Ray Data progress, the
device's name for reports. Only this module, `raykd.data`, `raykd.train` and `raykd.sweep` import Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import time
from pathlib import Path

import torch

from raykd import manifest, models, watchdog
from raykd.config import Config, ConfigError
from raykd.errors import Diverged


def threads(cfg: Config, local_world: int) -> int:
    """torch threads per worker: `scale.torch_threads`, else this node's cores shared by its workers."""
    return cfg.scale.torch_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))


def precision(cfg: Config) -> str:
    """`train.precision` made concrete: `auto` is bf16 only where bf16 is fast here (GPU or bf16 CPU)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if models.bf16_is_fast() else "fp32"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count (figures name the machine they ran on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


def fmt_eta(seconds: float) -> str:
    """A progress line's time left: 4m05s, or 1h02m from an hour on."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def quiet_data_progress(preserve_order: bool = False) -> None:
    """raykd prints its own progress lines; Ray Data's bars and start-up banners would bury them."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order:
        ctx.execution_options.preserve_order = True


def init_ray(cfg: Config, runs: int = 1, per_run_extra: float = 0.0, log=print) -> str:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local instance with
    enough logical CPUs for `runs` concurrent runs' train workers (+ `per_run_extra` each, e.g. a
    Tune trial process) plus one for Ray Data tasks (no deadlock on 2 cores). When a Ray instance
    already runs on this machine (`ray start --head`), Ray finds it and raykd joins it as it is,
    after checking that it has those CPUs (a one-line error otherwise, not a run that waits forever).
    Returns how: "cluster" (RAY_ADDRESS, or already initialised), "local" (started here) or "joined"."""
    import ray

    if ray.is_initialized():
        return "cluster"
    if os.environ.get("RAY_ADDRESS"):
        _check_answers(os.environ["RAY_ADDRESS"])
        ray.init()
        return "cluster"
    need = math.ceil(runs * (cfg.scale.worker_range[1] * cfg.scale.cpus_per_worker + per_run_extra)) + 1
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, need))  # (the dashboard's State API is what Train's cleanup polls)
        _guard_local_instance()
        return "local"
    except ValueError as e:  # Ray found a running local instance, which cannot be re-sized from here
        if "existing cluster" not in str(e):
            raise
    ray.init()
    have = ray.cluster_resources().get("CPU", 0.0)
    address = ray.get_runtime_context().gcs_address
    if have < need:
        ray.shutdown()
        raise ConfigError(f"scale: the Ray instance already running here ({address}) has {have:g} CPUs and this run needs "
                          f"{need} (workers x cpus_per_worker + 1 for Ray Data); start it with more (`ray start --head "
                          f"--num-cpus={need}`), stop it, or lower scale.num_workers / scale.cpus_per_worker")
    log(f"raykd: joined the Ray instance already running on this machine ({address}, {have:g} CPUs)")
    return "joined"


def _check_answers(address: str, timeout_s: float = 5.0) -> None:
    """One line when nothing answers at RAY_ADDRESS's host:port (a cluster that is down, a wrong host): Ray itself
    retries for minutes, printing warnings. `auto`, dashboard URLs and addresses without a port are left to Ray."""
    host_port = address.split("://", 1)[1] if address.startswith("ray://") else address
    if address in ("auto", "local") or "://" in host_port or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConfigError(f"RAY_ADDRESS: no Ray cluster answers at {address} ({why}); start it (`ray start --head`), correct the "
                          "address, or unset RAY_ADDRESS to start Ray on this machine") from None


def _guard_local_instance() -> None:
    """The instance `ray.init` just started goes when this driver goes, even by SIGKILL (raykd.watchdog)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray's record of the processes it started
    roots = [info.process.pid for infos in getattr(node, "all_processes", {}).values() for info in infos]
    if roots:
        watchdog.guard(roots)


def require_shared_storage(cfg: Config, how: str) -> None:
    """On a cluster of more than one node, checkpoints need `scale.storage_path` (storage every node
    sees): the default, OUTPUT/ on the driver's disk, is not where the other nodes' workers write. So on
    a cluster of one node that cannot hold the workers: they will run on nodes an autoscaler adds.
    One line before any worker starts (and before any node is asked for); a local instance raykd started is one node."""
    import ray

    if cfg.scale.storage_path or how == "local":
        return
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    if nodes > 1:
        where = f"has {nodes} nodes"
    elif not _fits(_worker_bundle(cfg), cfg.scale.worker_range[1]):
        where = "has 1 node, which cannot hold the workers (they would run on nodes an autoscaler adds),"
    else:
        return
    raise ConfigError(f"scale.storage_path: the Ray cluster {where} and checkpoints would go to "
                      f"{Path(cfg.output_dir).resolve()} on the driver's disk, which the workers on other nodes "
                      f"cannot reach; set scale.storage_path to storage every node sees (s3://bucket/prefix or a shared file system path)")


def for_world(cfg: Config, world: int) -> Config:
    """`cfg` for a worker group of `world` workers: with a worker range (elastic) the global batch is
    defined for the range's max, so fewer workers accumulate more micro-batches per step
    (train.grad_accum x max / world, rounded up when it does not divide)."""
    top = cfg.scale.worker_range[1]
    if world == top:
        return cfg
    accum = math.ceil(cfg.train.grad_accum * top / world)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))


def worker_nodes(rank: int, world: int, all_reduce, device: torch.device) -> list[str]:
    """In a Ray Train worker: every worker's Ray node id, in rank order (every rank calls; one all-reduce)."""
    import ray

    mine = ray.get_runtime_context().get_node_id().encode()
    table = torch.zeros(world, 64, dtype=torch.float64, device=device)
    table[rank, : len(mine)] = torch.tensor(list(mine), dtype=torch.float64, device=device)
    return [bytes(int(b) for b in row if b).decode() for row in all_reduce(table).tolist()]


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def _worker_bundle(cfg: Config) -> dict:
    """What one Train worker reserves: `scale.cpus_per_worker` CPUs, and a GPU with `scale.use_gpu`."""
    return {"CPU": float(cfg.scale.cpus_per_worker), **({"GPU": 1.0} if cfg.scale.use_gpu else {})}


def _have() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def _fits(bundle: dict, workers: int, have: dict | None = None) -> bool:
    """Whether the cluster's CPUs and GPUs (all its nodes together) hold `workers` x `bundle`."""
    have = _have() if have is None else have
    return all(have.get(k, 0.0) >= v * workers for k, v in bundle.items())


def _reserve(bundles: list[dict]):
    """A placement group of the workers' bundles, packed as Ray Train packs them: demand an autoscaler sees
    (a driver that only polls the cluster's size asks for nothing, and a cluster scaled from zero never grows),
    owned by this driver (gone with it, unlike `request_resources`, whose last caller on the cluster wins).
    Returns (wait(timeout_s) -> placed, release)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy="PACK")
    return (lambda timeout_s: bool(ray.wait([pg.ready()], timeout=timeout_s)[0])), (lambda: remove_placement_group(pg))


def wait_for_workers(cfg: Config, how: str, log=print, poll_s: float = 10.0) -> None:
    """Before `fit()`: the cluster must be able to hold `scale.num_workers` workers (a range's minimum; CPUs, and
    a GPU each with `scale.use_gpu`). A local instance cannot grow: fail at once. A cluster may (an autoscaler adding
    nodes): ask for the workers' resources (`_reserve`), say within `poll_s` what the run waits for and what the
    cluster has, then fail with one line after `scale.placement_timeout_s` instead of waiting forever. The
    reservation is released before returning, for Ray Train to place its own."""
    sc, n = cfg.scale, cfg.scale.worker_range[0]
    bundle = _worker_bundle(cfg)
    wanted = f"{n} worker(s) x ({sc.cpus_per_worker:g} CPU{', 1 GPU' if sc.use_gpu else ''})"
    deadline, reservation = time.monotonic() + sc.placement_timeout_s, None
    try:
        while True:
            have = _have()
            if _fits(bundle, n, have):
                return
            field = "scale.use_gpu" if have.get("GPU", 0.0) < bundle.get("GPU", 0.0) * n else "scale.num_workers"
            if how != "cluster":
                raise ConfigError(f"{field}: this machine's Ray instance has {_fmt(have)} and cannot place {wanted}; "
                                  f"lower scale.num_workers / scale.cpus_per_worker, set scale.use_gpu=false, or submit to a cluster that has them")
            if time.monotonic() >= deadline:
                raise ConfigError(f"{field}: the cluster still has {_fmt(have)} after {sc.placement_timeout_s:g} s and cannot place {wanted}; "
                                  f"add nodes (or let the autoscaler), or lower the request")
            log(f"raykd: waiting for the cluster to place {wanted}; it has {_fmt(have)} (an autoscaler may be adding nodes; "
                f"giving up in {deadline - time.monotonic():.0f} s, scale.placement_timeout_s)")
            reservation = reservation or _reserve([dict(bundle) for _ in range(n)])
            if reservation[0](min(poll_s, max(0.1, deadline - time.monotonic()))):
                return
    finally:
        if reservation:
            reservation[1]()


def worker_resources(scale) -> dict:
    """The Ray resources one train worker of `scale` (a `ScaleConfig`) holds: its CPUs, and a GPU with `use_gpu`."""
    return {"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})}


def run_name(output_dir: Path) -> str:
    """The run's name under a shared `scale.storage_path`: the output directory's name plus a hash of its
    full path, so two runs whose output dirs share a basename never resume each other's checkpoints."""
    return f"{output_dir.name}-{hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:8]}"


def run_storage(cfg: Config) -> tuple[str, str]:
    """(storage, name): where Ray Train keeps the run's checkpoints, `scale.storage_path`/run_name or OUTPUT/train."""
    out = Path(cfg.output_dir).resolve()
    return (cfg.scale.storage_path, run_name(out)) if cfg.scale.storage_path else (str(out), "train")


class RayTrainSession:
    """The Ray Train calls the loop makes (`raykd.train`, `raykd.data.pipeline`), in a Ray Train worker."""

    def get_context(self):
        import ray.train

        return ray.train.get_context()

    def get_device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def get_dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint=None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)


_SESSION: list = []  # the stand-in an in-process sweep trial installed (raykd.sweep.inproc), while it trains


def session():
    """What the loop reports to and takes its context, device, data and checkpoint from: Ray Train in a Train
    worker; in a sweep trial training in its own process, the trial's stand-in (Ray refuses `ray.train` calls
    inside a Tune trial, so the loop never calls them directly)."""
    return _SESSION[-1] if _SESSION else RayTrainSession()


DIVERGED_NOTE = "diverged.txt"  # rank 0's Diverged line, beside the run's checkpoints


def _note(cfg: Config):
    """(pyarrow filesystem, path) of the run's diverged note: beside its checkpoints (`run_storage`), which the driver
    and every worker reach (a local directory, shared storage or s3://)."""
    fs, run = manifest.run_dir(*run_storage(cfg))
    return fs, f"{run}/{DIVERGED_NOTE}"


def note_diverged(cfg: Config, why: str) -> None:
    """Rank 0 of a diverged run writes its one line where the driver finds it: Ray Train can report the worker's
    death instead of its exception when the process goes before the controller reads the error (seen under load)."""
    try:
        fs, path = _note(cfg)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(why.encode())
    except OSError:  # best effort: the worker's own exception still carries the line
        pass


def fit_or_why(trainer, cfg: Config | None = None):
    """`trainer.fit()`; a run that diverged on its workers is one line (raykd.errors.Diverged), not Ray's traceback:
    from the workers' exceptions, else (with `cfg`) from the note rank 0 left (`note_diverged`; a stale one is
    removed before the run starts)."""
    from pyarrow.fs import FileType
    from ray.train import WorkerGroupError

    fs, note = _note(cfg) if cfg is not None else (None, None)
    if fs and fs.get_file_info(note).type == FileType.File:
        fs.delete_file(note)
    try:
        return trainer.fit()
    except WorkerGroupError as e:
        why = next((str(f).strip().splitlines()[-1] for f in e.worker_failures.values() if isinstance(f, Diverged) or "Diverged" in type(f).__name__), None)
        if why is None and fs and fs.get_file_info(note).type == FileType.File:
            with fs.open_input_stream(note) as f:
                why = "Diverged: " + f.read().decode()
        if why is None:
            raise
        raise Diverged(why.split("Diverged: ", 1)[-1]) from None


def get(ref):
    """`ray.get(ref)`, or None for None (an object the driver may have shared with the workers)."""
    import ray

    return None if ref is None else ray.get(ref)
