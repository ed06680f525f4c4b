"""Reading the teacher cache (`raykd.data.cache` builds it): the cached train stream as a Ray Dataset, and each
batch's teacher targets as `raykd.objective.TeacherOutputs` — top-k log-probs (`raykd.losses.topk`), or with a
dense cache (`teacher.cache_topk: 0`) the teacher's final hidden state, which the fused head loss turns into the
teacher's full logits with the teacher's LM head (the worker keeps that head alone: `raykd.worker_models`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from raykd.config import Config
from raykd.data.cache import _DTYPES


def _shard_files(cfg: Config) -> list[str]:
    return [str(f) for f in sorted(Path(cfg.teacher.cache).resolve().glob("shard-*.parquet"))]


def columns(cfg: Config, objective) -> list[str]:
    """The cache columns a run with this `raykd.spec.ObjectiveSpec` reads."""
    return objective.cache_columns(dense=cfg.teacher.cache_topk == 0)


def train_dataset(cfg: Config, objective, rows=None):
    """The cached train blocks as a Ray Dataset (one row per block, binary cells): only the columns the run's objective
    (`raykd.spec.ObjectiveSpec`) reads, selected from `rows` (the cache materialized once for a sweep) or read from the shards."""
    import ray.data

    if rows is not None:
        return rows.select_columns(columns(cfg, objective))
    return ray.data.read_parquet(_shard_files(cfg), columns=columns(cfg, objective), num_cpus=cfg.data.task_cpus)


def shared_rows(cfg: Config, log=print, share: float = 0.5):
    """Every column of the cache read and materialized once in the object store, for all the trials of a
    sweep to take their columns from (each trial otherwise reads and decodes the shards itself, on the
    cores it trains on); None when the cache's decoded size is over `share` of the cluster's object store."""
    import pyarrow.parquet as pq
    import ray.data

    files = _shard_files(cfg)
    size = sum(md.row_group(i).total_byte_size for md in (pq.ParquetFile(f).metadata for f in files) for i in range(md.num_row_groups))
    room = ray.cluster_resources().get("object_store_memory", 0.0)
    if size > share * room:
        log(f"raykd: the teacher cache ({size / 2**30:.1f} GiB decoded) is over {share:.0%} of the object store "
            f"({room / 2**30:.1f} GiB): each trial reads its shards")
        return None
    t0 = time.time()
    rows = ray.data.read_parquet(files, num_cpus=cfg.data.task_cpus).materialize()
    log(f"raykd: the teacher cache ({size / 2**20:.0f} MiB) read once for every trial ({time.time() - t0:.0f} s)")
    return rows


def _cells(col, dtype, shape: tuple[int, ...]) -> torch.Tensor:
    arr = np.frombuffer(b"".join(col), dtype=dtype).reshape(len(col), *shape)
    return torch.from_numpy(arr.copy())


def _floats(col, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Cells written by `raykd.data.cache._bits` ([len(col), *shape] of `dtype`; `shape`'s last entry may be -1)."""
    return _cells(col, np.uint8, (*shape[:-1], -1)).view(dtype)


def teacher_outputs(batch: dict, cfg: Config, vocab: int, device: torch.device, head=None):
    """(input_ids [B, T] long, TeacherOutputs with `topk` or `last_hidden` + `head`, and cached `hidden`) from a numpy
    batch of shard rows (the run's block size, k and dtype were checked against the cache's meta). `head`: the
    teacher's LM head (weight [V, H], bias [V] or None) on `device`, for a dense cache's `last` column."""
    from raykd.losses.topk import TopK
    from raykd.objective import TeacherOutputs

    T, k, dt = cfg.data.block_size, cfg.teacher.cache_topk, _DTYPES[cfg.teacher.cache_dtype]
    ids = _cells(batch["input_ids"], np.int32, (T,)).long().to(device)
    topk = None
    if "topk_idx" in batch:
        topk = TopK(_cells(batch["topk_idx"], np.int32, (T, k)), _floats(batch["topk_logp"], dt, (T, k)),
                    _cells(batch["tail"], np.float32, (T,)), vocab).to(device)
    hidden = {int(name[7:]): _floats(col, dt, (T, -1)).to(device) for name, col in batch.items() if name.startswith("hidden_")}
    last = None
    if "last" in batch:
        if head is None:
            raise ValueError("a dense teacher cache's targets need the teacher's LM head (teacher_outputs(..., head=))")
        last = _floats(batch["last"], dt, (T, -1)).to(device=device, dtype=head[0].dtype)  # the head's dtype (fp32)
    return ids, TeacherOutputs(last_hidden=last, hidden=hidden, qkv={}, layer_inputs={}, model=None, topk=topk, head=head)
