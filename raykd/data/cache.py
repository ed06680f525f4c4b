"""The teacher cache: run the teacher once over the packed training blocks, keep what the
losses need, and train (and sweep) from it without a teacher forward per step.

Layout of `teacher.cache` (a directory):

    raykd_cache.json       identity (teacher weights + tokenizer sha256, block length, data
                           settings, seed, k, dtype, stored layers) and, once complete, sizes
    shard-00000.parquet    `teacher.cache_shard_blocks` consecutive blocks of the shuffled
    shard-00001.parquet    train stream, one row per block [T tokens], zstd; columns:
    ...                      input_ids  int32 [T]
                             last       [T, H]        the teacher's final normed hidden state (cache_topk 0,
                                                      the default: dense)
                             topk_idx   int32 [T, k]  top-k token ids (raykd.losses.topk.TopK)  } instead of
                             topk_logp  [T, k]        log-probs over the full vocabulary      } `last` with
                             tail       fp32 [T]      log of the mass outside the top k       } cache_topk k
                             hidden_<t> [T, H]        output of teacher layer t (stored layers)
                           floats in teacher.cache_dtype (fp16 | bf16 | fp32)

Every tensor is a binary cell holding the raw little-endian array (floats as their bytes), so shards
stay plain Parquet readable anywhere. A shard is written to a temporary name and renamed: a file
named `shard-*.parquet` is complete. Its schema metadata holds the sha256 of its input ids;
rebuilding after an interruption checks and skips every finished shard. Building is a Ray Data
stage: the driver streams the train blocks, each pending shard goes to an actor pool
(`teacher.cache_actors` actors, one teacher each, on a GPU with `scale.use_gpu`). Training reads the
shards (`raykd.data.cache_read`: only the columns its loss terms need) instead of running the
teacher.

A cache holds the blocks a run reads, not the whole train set: the first `train.max_steps` x the
global batch blocks of the stream (`reads`; all of them when the set is smaller, `whole` in the
meta). The stream is the same on every build, so a run that reads more extends the cache: its
shards are kept, the last (short) shard rebuilt, the rest added. """

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from raykd import capture, manifest, models
from raykd.config import Config, ConfigError, from_dict

META = "raykd_cache.json"
FORMAT = 1
DATA_KEYS = ("train", "validation", "text_field", "block_size", "val_fraction", "min_chars", "dedupe", "max_train_blocks")
_SHA_KEY = b"raykd_inputs_sha256"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- identity -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _sha_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the named files' bytes (memoised by path, size and mtime)."""
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _files_sha(directory: Path, patterns: tuple[str, ...]) -> str:
    files = models.file_stats(directory, patterns)
    return _sha_files(files) if files else "none"


def stored_layers(cfg: Config, depth: int) -> list[int]:
    """Teacher layers whose hidden states a cache built for `cfg` (resolved) stores."""
    spec = cfg.teacher.cache_layers
    if spec == "none":
        return []
    if spec == "all":
        return list(range(depth))
    layers = sorted({t for t, _ in cfg.layer_map.pairs or []}) if spec == "mapped" else sorted(set(spec))
    bad = [t for t in layers if t >= depth]
    if bad:
        raise ConfigError(f"teacher.cache_layers: the teacher has {depth} layers (0-{depth - 1}); {bad} do not exist")
    return layers


def _data_identity(data) -> dict:
    """The data settings a cache depends on (`train` as the sources read; `mix` only where given, so
    caches built before data.mix existed still match)."""
    out = {k: getattr(data, k) for k in DATA_KEYS}
    out["train"] = data.train if data.mix else data.sources
    return {**out, "mix": data.mix} if data.mix else out


def identity(cfg: Config, teacher_dir: Path, layers: list[int]) -> dict:
    """What a cache must agree on with a run that reads it."""
    return {
        "format": FORMAT,
        "teacher_weights_sha256": _files_sha(teacher_dir, ("*.safetensors", "*.bin")),
        "tokenizer_sha256": _files_sha(teacher_dir, ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model")),
        "block_size": cfg.data.block_size,
        "data": _data_identity(cfg.data),
        "seed": cfg.seed,
        "topk": cfg.teacher.cache_topk,
        "dtype": cfg.teacher.cache_dtype,
        "layers": layers,
    }


def reads(cfg: Config) -> int:
    """Train blocks a run reads: train.max_steps x its global batch (batch_size x grad_accum x the most workers)."""
    return cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.scale.worker_range[1]


def holds_all(meta: dict) -> bool:
    """Whether a cache's meta says it holds the whole train set (the stream ended first); caches from before
    `reads` have no `whole` and hold the whole set."""
    return meta.get("whole", True)


def _short(meta: dict, blocks: int) -> bool:
    """Whether a complete cache holds fewer than `blocks` of the stream (0: all of it)."""
    return not holds_all(meta) and (not blocks or meta.get("blocks", 0) < blocks)


def _read_meta(path: Path) -> dict | None:
    f = path / META
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher.cache: {f} is not valid JSON ({e}); delete {path} to rebuild the cache") from None


def _write_meta(path: Path, meta: dict) -> None:
    manifest.write_json(path / META, meta)


_WHAT = {"teacher_weights_sha256": "another teacher (weights)", "tokenizer_sha256": "another tokenizer", "block_size": "another data.block_size",
         "data": "other data settings", "seed": "another seed (the shuffled block order)", "topk": "another teacher.cache_topk",
         "dtype": "another teacher.cache_dtype", "format": "another raykd cache format"}

_FIELD = {"topk": "teacher.cache_topk", "dtype": "teacher.cache_dtype", "block_size": "data.block_size"}  # settings a run can match instead


def _mismatch(path: Path, have: dict, want: dict) -> str | None:
    for key, what in _WHAT.items():
        if have.get(key) != want[key]:
            a, b = have.get(key), want[key]
            if isinstance(a, str) and len(a) == 64:
                a, b = a[:12] + "…", b[:12] + "…"
            keep = f"set {_FIELD[key]}={have[key]} to read it, " if key in _FIELD else ""  # e.g. a top-256 cache from before the dense default
            return (f"teacher.cache: {path} was built for {what} ({key} {a} vs {b} in this run); "
                    f"{keep}point teacher.cache at a new directory or delete this one to rebuild")
    return None


def status(cfg: Config, plan, build_layers: list[int] | None = None, blocks: int | None = None) -> tuple[str, dict | None]:
    """("missing" | "incomplete" | "short" | "complete", meta) for the resolved `cfg` and its `raykd.plan.Plan`;
    "short": complete, but with fewer than `blocks` (default `reads(cfg)`; 0: all) train blocks. A cache
    that does not match the run raises ConfigError (one line: what differs and what to do)."""
    path, teacher_dir = Path(cfg.teacher.cache), plan.teacher_dir
    meta = _read_meta(path)
    if meta is None:
        return "missing", None
    want = identity(cfg, teacher_dir, meta.get("layers", []) if build_layers is None else build_layers)
    err = _mismatch(path, meta, want)
    if err:
        raise ConfigError(err)
    have = meta.get("layers", [])
    if build_layers is not None and (not set(build_layers) <= set(have) or (not meta.get("complete") and have != build_layers)):
        raise ConfigError(f"teacher.cache: {path} stores teacher layers {meta.get('layers')}, this build asks for {build_layers}; "
                          f"point teacher.cache at a new directory or delete this one to rebuild")
    missing = sorted(set(plan.objective.cache_layers) - set(meta.get("layers", [])))
    if missing:
        raise ConfigError(f"teacher.cache: {path} holds hidden states of teacher layers {meta.get('layers')}, this run's layer map needs "
                          f"{missing} too; rebuild it with teacher.cache_layers=all (or list them), or set loss.weights.hidden=0")
    if not meta.get("complete"):
        return "incomplete", meta
    return ("short" if _short(meta, reads(cfg) if blocks is None else blocks) else "complete"), meta


def require(cfg: Config, plan) -> dict:
    """The meta of a complete, matching cache that holds every block the run reads (ConfigError otherwise)."""
    state, meta = status(cfg, plan)
    if state == "short":
        raise ConfigError(f"teacher.cache: {cfg.teacher.cache} holds the first {meta['blocks']} train blocks and this run reads {reads(cfg)} "
                          f"(train.max_steps x batch_size x grad_accum x workers); run `raykd cache-teacher` with this run's config to extend it")
    if state != "complete":
        what = "holds no teacher cache" if state == "missing" else "holds an unfinished teacher cache"
        raise ConfigError(f"teacher.cache: {cfg.teacher.cache} {what}; build it with `raykd cache-teacher CONFIG` (raykd distill/sweep build it when missing)")
    return meta


# --- building -------------------------------------------------------------------------------


def _bits(x: torch.Tensor, dtype: torch.dtype) -> bytes:
    return x.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()  # raw bytes of any width (cache_read._floats)


class _ShardWriter:
    """Ray Data actor: one teacher; each input row is a shard of blocks to run and write."""

    def __init__(self, config: dict, layers: list[int], out: str):
        from raykd import runtime
        from raykd.objective import head
        from raykd.spec import Needs

        cfg = from_dict(config)
        use_gpu = cfg.scale.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.set_num_threads(runtime.threads(cfg, 1) if use_gpu else max(1, int(cfg.scale.cpus_per_worker)))
        teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log=lambda m: None)
        self.teacher = models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), cfg.teacher.trust_remote_code, frozen=True).to(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if runtime.precision(cfg) == "bf16" else None
        capture.store_for_autocast(self.teacher, self.autocast.fast_dtype if self.autocast else None)  # no per-batch weight casts
        self.w, self.b = head(self.teacher)
        self.needs, self.cfg, self.layers, self.out = Needs(hidden=tuple(layers)), cfg, layers, Path(out)
        self.dtype = _DTYPES[cfg.teacher.cache_dtype]

    @torch.no_grad()
    def _encode(self, ids: np.ndarray) -> dict[str, list[bytes]]:
        """Teacher targets of blocks ids [n, T] as binary cells, one per block."""
        from raykd.losses.topk import teacher_topk
        from raykd.objective import forward_with_capture

        k = self.cfg.teacher.cache_topk
        cols: dict[str, list[bytes]] = {"input_ids": [], **({"topk_idx": [], "topk_logp": [], "tail": []} if k else {"last": []})}
        cols.update({f"hidden_{t}": [] for t in self.layers})
        for part in torch.from_numpy(ids.astype(np.int64)).split(self.cfg.train.batch_size):
            part = part.to(self.device)
            with self.autocast or torch.autocast(self.device.type, enabled=False):
                last, cap = forward_with_capture(self.teacher, part, self.needs)
            for j in range(len(part)):
                for t in self.layers:
                    cols[f"hidden_{t}"].append(_bits(cap.hidden[t][j].cpu(), self.dtype))
                cols["input_ids"].append(part[j].to(torch.int32).cpu().numpy().tobytes())
                if not k:  # dense: the final normed hidden state, the head applied when training
                    cols["last"].append(_bits(last[j].cpu(), self.dtype))
                    continue
                logits = last[j].float() @ self.w.float().T
                if self.b is not None:
                    logits = logits + self.b.float()
                top = teacher_topk(logits, k)
                cols["topk_idx"].append(top.idx.cpu().numpy().tobytes())
                cols["topk_logp"].append(_bits(top.logp.cpu(), self.dtype))
                cols["tail"].append(top.tail.float().cpu().numpy().tobytes())
        return cols

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        T = self.cfg.data.block_size
        for shard, raw, sha in zip(batch["shard"], batch["ids"], batch["sha"]):
            ids = np.frombuffer(raw, dtype=np.int32).reshape(-1, T)
            cols = self._encode(ids)
            table = pa.table({k: pa.array(v, pa.binary()) for k, v in cols.items()}).replace_schema_metadata({_SHA_KEY: str(sha).encode()})
            final = self.out / f"shard-{int(shard):05d}.parquet"
            tmp = self.out / f".{final.name}.tmp"
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)
        return {"shard": np.asarray(batch["shard"]), "blocks": np.asarray([len(r) // (4 * T) for r in batch["ids"]])}


def _sizes(files: list[Path]) -> dict:
    """Rows and compressed bytes per column group over the shards."""
    import pyarrow.parquet as pq

    blocks, groups = 0, {"input_ids": 0, "logits": 0, "hidden": 0}
    for f in files:
        md = pq.ParquetFile(f).metadata
        blocks += md.num_rows
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                name = col.path_in_schema
                key = "input_ids" if name == "input_ids" else "hidden" if name.startswith("hidden_") else "logits"
                groups[key] += col.total_compressed_size
    return {"blocks": blocks, "bytes": groups}


def _driven(it):
    """Iterate a Ray Data iterator on the driver; a ConfigError raised in a task comes back as one line."""
    from raykd.data.pipeline import _config_error

    try:
        yield from it
    except Exception as e:
        err = _config_error(e)
        if err is None:
            raise
        raise err from None


def _pending_shards(train_ds, path: Path, shard_blocks: int) -> tuple[list[dict], int, int]:
    """Stream the train blocks into shards: (the shards still to build, the number of shards, of blocks);
    finished shards are checked against the blocks (sha256) and skipped, the short last shard of a smaller
    build rebuilt, stale extra ones removed."""
    import pyarrow.parquet as pq

    todo, n_shards, n_blocks = [], 0, 0
    for i, batch in enumerate(_driven(train_ds.iter_batches(batch_size=shard_blocks, batch_format="numpy"))):
        ids = np.ascontiguousarray(batch["input_ids"], dtype=np.int32)
        sha = hashlib.sha256(ids.tobytes()).hexdigest()
        n_shards, n_blocks = i + 1, n_blocks + len(ids)
        f = path / f"shard-{i:05d}.parquet"
        if f.exists():
            footer = pq.read_metadata(f)
            have, rows = (footer.metadata or {}).get(_SHA_KEY, b"").decode(), footer.num_rows
            if rows < len(ids) and have == hashlib.sha256(ids[:rows].tobytes()).hexdigest():
                f.unlink()  # the last shard of a build that read fewer blocks: its blocks and more
            elif have != sha:
                raise ConfigError(f"teacher.cache: {f} holds other blocks than the data now gives (the corpus files changed?); "
                                  f"delete {path} to rebuild the cache")
            else:
                continue
        todo.append({"shard": i, "ids": ids.tobytes(), "sha": sha})
    for extra in sorted(path.glob("shard-*.parquet"))[n_shards:]:
        extra.unlink()
    return todo, n_shards, n_blocks


def build(cfg: Config, plan, log=print, blocks: int | None = None) -> dict:
    """`raykd cache-teacher`: build, finish or extend the cache of a resolved config to the first `blocks`
    train blocks (default `reads(cfg)`; 0: all); returns its meta."""
    import ray.data

    from raykd.data import pipeline
    from raykd.plan import check_writable
    from raykd.runtime import init_ray, quiet_data_progress

    t0 = time.perf_counter()
    path = Path(cfg.teacher.cache)
    teacher_dir = plan.teacher_dir
    layers = stored_layers(cfg, plan.teacher.layers)
    want = reads(cfg) if blocks is None else blocks
    state, meta = status(cfg, plan, build_layers=layers, blocks=want)  # a mismatching cache is refused here, before Ray
    if state == "complete":
        log(f"raykd: teacher cache {path} is complete ({meta['shards']} shards, {meta['tokens']} tokens)")
        return meta
    pipeline.preflight(cfg.data)
    pipeline.check_tokens(cfg.data, cfg.teacher.model, cfg.teacher.trust_remote_code)
    check_writable(str(path), "teacher.cache")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".shard-*.tmp"):  # a shard an interrupted build was writing
        stale.unlink()
    was = meta.get("target", 0) if state == "incomplete" else None
    if was is not None and want:  # an interrupted build: finish at least what it was building (0: all)
        want = max(want, was) if was else 0
    meta = {**identity(cfg, teacher_dir, layers), "complete": False, "teacher": cfg.teacher.model, "target": want}
    _write_meta(path, meta)
    init_ray(cfg, log=log)
    quiet_data_progress(preserve_order=True)  # the same shards, block for block, on every build
    train_ds, _ = pipeline.build_datasets(cfg.data, cfg.teacher.model, cfg.seed, cfg.teacher.trust_remote_code)
    pipeline.check_blocks(train_ds, "data.train")
    todo, n_shards, n_blocks = _pending_shards(train_ds.limit(want) if want else train_ds, path, cfg.teacher.cache_shard_blocks)
    whole = not want or n_blocks < want
    log(f"raykd: teacher cache {path}: {n_blocks} blocks ({'the whole train set' if whole else 'what the run reads'}) in "
        f"{n_shards} shards, {n_shards - len(todo)} already built, {len(todo)} to build "
        f"({f'top-{cfg.teacher.cache_topk}' if cfg.teacher.cache_topk else 'dense'}, {cfg.teacher.cache_dtype}, hidden of teacher layers {layers or 'none'})")
    if todo:
        gpu = {"num_gpus": 1} if cfg.scale.use_gpu else {}
        written = ray.data.from_items(todo).map_batches(
            _ShardWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.teacher.cache_actors), num_cpus=cfg.scale.cpus_per_worker, **gpu,
            fn_constructor_kwargs={"config": cfg.to_dict(), "layers": layers, "out": str(path)},
        )
        done = 0
        for row in _driven(written.iter_rows()):
            done += 1
            log(f"raykd: cache shard {int(row['shard'])} written ({done}/{len(todo)}, {int(row['blocks'])} blocks, {time.perf_counter() - t0:.0f} s)")
    files = sorted(path.glob("shard-*.parquet"))
    sizes = _sizes(files)
    tokens = sizes["blocks"] * cfg.data.block_size
    by = sizes["bytes"]
    meta.update(
        complete=True, whole=whole, shards=len(files), blocks=sizes["blocks"], tokens=tokens, bytes=sum(by.values()),
        bytes_per_token={"logits": round((by["input_ids"] + by["logits"]) / tokens, 2),
                         "logits_and_hidden": round(sum(by.values()) / tokens, 2)},
        build_wall_s=round(time.perf_counter() - t0, 1),
    )
    _write_meta(path, meta)
    return meta


def ensure(cfg: Config, plan, log=print, blocks: int | None = None) -> dict:
    """Before training or a sweep: the meta of a matching, complete cache of `blocks` (see `build`),
    building, finishing or extending it first."""
    state, meta = status(cfg, plan, blocks=blocks)
    return meta if state == "complete" else build(cfg, plan, log, blocks)
