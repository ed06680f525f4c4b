"""The Ray Data pipeline: corpus files -> clean documents -> token blocks -> Train shards.

``preflight(cfg.data)`` runs on the driver with no Ray and turns every bad corpus into one
``ConfigError`` line (missing path, empty corpus, a file that is not UTF-8, a JSONL /
Parquet / ``datasets`` row without the text field, unless ``data.bad_rows=skip``), and
``check_tokens`` with the teacher's tokenizer turns a split shorter than one block into one line too.
``build_datasets`` returns lazy ``(train, validation)`` Ray Datasets whose rows are
``{"input_ids": int32[block_size]}``; ``materialized`` executes them once on the driver (a run's
and a sweep's), ``build_trainer`` hands them to ``TorchTrainer`` and each worker streams its share
of the blocks with ``ray.train.get_dataset_shard("train")``.

Pipeline (one Ray Data plan per split)::

    from_items(file rows) -> flat_map(read, clean, min_chars, hash split, dedupe)
        -> map_batches(tokenize with the teacher's tokenizer, pack_blocks)   [fused: one task]
        -> random_shuffle(seed)                        [train only; Ray fuses it in as well]

With ``data.mix`` each source is packed on its own and the training blocks are sampled from
them by weight (``raykd.data.mix``: the shares, the seeds, which source gives validation).

The shuffle is a barrier: the whole training set (about 1 KiB per 256-token block) sits in
the object store before the first batch; validation streams.

* Inputs: plain text (one document per file; directories and globs), ``.jsonl`` (one
  document per row, ``data.text_field``), ``.parquet`` (column ``data.text_field``),
  directories written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` directory
  gives its ``train`` / ``validation`` splits), and the named corpora ``sotu``, ``moby-dick``, ``emails``, ``pydoc`` (``raykd.data.corpora``).
  A file is the unit of parallelism: a single huge JSONL/Parquet file is read by one task.
  On a multi-node cluster the files must be on storage every node sees.
* Split: explicit ``data.validation`` files; else a source with its own split (a named
  corpus, a ``DatasetDict`` with a validation split) uses it; else each document goes
  to validation when the first 8 bytes of its BLAKE2b digest, read as a fraction of 2**64,
  fall below ``data.val_fraction``: stable across runs, machines and Python hash seeds,
  and identical documents always land on the same side.
* Dedupe (exact, on the cleaned text): ``build_datasets`` streams the 16-byte digests of
  all documents (train and validation files together) to the driver once, keeps the first
  occurrence of each (train files come first, so a validation copy of a training document
  is dropped from validation) and passes the positions to drop to the lazy pipeline.
  Trade-off: one extra read pass over the corpus at build time and driver memory of about
  100 bytes per distinct document; in exchange no all-to-all shuffle (in Ray 2.60
  ``groupby`` uses hash-shuffle *actors* that reserve CPUs and can starve next to Train
  workers on a small machine), document order is kept and the result is deterministic.
* Packing: ``corpora.pack_blocks`` per batch (a batch is one block of files: one per
  logical CPU, more for big corpora so none exceeds ``_MAX_BYTES_PER_TASK`` of text), EOS
  after every document, no padding. The leftover shorter than ``block_size`` at the end of
  each batch is dropped (less than one block per task).
* Order: ``preserve_order`` is set on the datasets' own ``DataContext`` so the driver sees
  a deterministic stream; the training order is ``random_shuffle(seed=seed)``, the same
  order every epoch (so a resumed run can replay its data position). Ray Train replaces the
  execution options when it splits a dataset: pass ``execution_options=ingest_options()``
  to ``ray.train.DataConfig`` to keep the per-worker order deterministic too.

How Data and Train share 2 CPUs: each Train worker reserves ``scale.cpus_per_worker``
logical CPUs (use fractions such as 0.5 on small machines; ``raykd.train.init_ray`` also
starts Ray with at least one CPU more than the workers reserve). Every Ray Data task here
(read/tokenize/pack, shuffle map and reduce) reserves only ``data.task_cpus`` (0.25) and
is a plain task, never an actor pool, so Data always fits into what Train leaves free and
releases it between tasks; the split coordinator of ``streaming_split`` reserves 0 CPUs.
Tested with 2 workers x 0.5 CPU on ``ray.init(num_cpus=2)`` (tests/test_data.py). There
are about as many tasks as logical CPUs: each new task process imports transformers and
loads the tokenizer (about 3 CPU-seconds), and Ray keeps only about one idle worker per
CPU warm between epochs. Those imports run under ``_no_interrupts`` (see there): Ray Data
cancels running tasks when a consumer stops early, and an interrupted import poisons the
worker process for every later task.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from raykd.config import ConfigError, DataConfig
from raykd.data import mix
from raykd.data.reader import (  # noqa: F401  (preflight: public here too)
    _corpora,
    _documents,
    _File,
    _held_out,
    _no_interrupts,
    _Plan,
    _plan,
    _size,
    documents,
    preflight,
)

MIX_REPORT = "raykd_mix"  # attribute on a mixed train dataset: per source {source, weight, blocks, taken}
_MAX_BYTES_PER_TASK = 16 << 20  # text per read/tokenize task (and per packing batch), at most
_PROBE = "_raykd_probe"  # attribute on datasets built here: (dataset before the shuffle, block_size)


# --- the Ray Data pipeline -------------------------------------------------------------------


def has_tokenizer(path) -> bool:
    """Whether the model directory `path` holds a tokenizer (a planning-only directory may hold just config.json)."""
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


@functools.lru_cache(maxsize=4)
def _tokenizer(teacher: str, trust_remote_code: bool):
    """The teacher's tokenizer, loaded once per process (a cache, not a knob). `teacher` is the
    `teacher.model` spec, resolved on the node that reads: a named teacher (tiny-random, smollm2-135m)
    lives in this node's cache, as a named corpus does, never at the driver's cache path."""
    with _no_interrupts():  # imports transformers (and torch._dynamo) on first use
        from raykd.models import load_tokenizer, resolve_model

        return load_tokenizer(resolve_model(teacher, "teacher.model", log=lambda m: None), trust_remote_code=trust_remote_code)


def _doc_rows(row: dict, *, text_field: str, bad_rows: str, min_chars: int, val_fraction: float,
              want: str | None, drop: dict, keys_only: bool) -> Iterator[dict]:
    """flat_map: the kept documents of one file (want: train | validation | None = all)."""
    f = _File(str(row["path"]), str(row["kind"]), str(row["field"]))
    idx, mode = int(row["file"]), str(row["mode"])
    dropped = drop.get(idx, ())
    for i, text, digest in _documents(f, text_field, bad_rows, min_chars):
        if mode == "hash" and want is not None and _held_out(digest, val_fraction) != (want == "validation"):
            continue
        if i in dropped:
            continue
        yield {"file": idx, "doc": i, "key": digest} if keys_only else {"text": text}


def _tokenize_pack(batch: dict, *, teacher: str, trust_remote_code: bool, block_size: int) -> dict:
    """map_batches: tokenize a batch of documents and pack it into blocks (leftover dropped)."""
    tok = _tokenizer(teacher, trust_remote_code)
    texts = [str(t) for t in batch.get("text", ())]  # a block with no documents has no columns
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    blocks, _leftover = _corpora().pack_blocks(ids, block_size, tok.eos_token_id)
    return {"input_ids": np.asarray(blocks, dtype=np.int32).reshape(len(blocks), block_size)}


def _documents_ds(plan: _Plan, items: list[tuple[int, str]], cfg: DataConfig, want: str | None, drop: dict, keys_only: bool):
    import ray.data

    rows = [{"file": i, "path": plan.files[i].path, "kind": plan.files[i].kind, "field": plan.files[i].field, "mode": m} for i, m in items]
    nbytes = sum(_size(plan.files[i]) for i, _ in items)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1))
    n_blocks = max(1, min(len(rows), max(cpus, math.ceil(nbytes / _MAX_BYTES_PER_TASK))))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds.context.execution_options.preserve_order = True  # this plan's own context copy, not the global one
    return ds.flat_map(
        _doc_rows, num_cpus=cfg.task_cpus,
        fn_kwargs={"text_field": cfg.text_field, "bad_rows": cfg.bad_rows, "min_chars": cfg.min_chars,
                   "val_fraction": cfg.val_fraction, "want": want, "drop": drop, "keys_only": keys_only},
    )


def _config_error(e: BaseException) -> ConfigError | None:
    """The one-line ConfigError a Ray task raised (Ray wraps it with the remote traceback), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError(ConfigError).cause is the original
        if isinstance(cause, ConfigError):
            return ConfigError(str(cause).splitlines()[0])  # Ray 2.60 appends retry advice lines
        if isinstance(e, ConfigError) and type(e) is ConfigError:
            return e
        e = e.__cause__ or e.__context__
    return None


def _driver_action(fn, *args):
    """Run a Ray Data action on the driver; a ConfigError from a task comes back as one line."""
    try:
        return fn(*args)
    except Exception as e:
        err = _config_error(e)
        if err is None:
            raise
        raise err from None


def _duplicates(plan: _Plan, cfg: DataConfig) -> dict[int, frozenset[int]]:
    """Positions (file -> doc indices) of every non-first copy of a document (one pass over digests)."""
    items = [(i, "all") for i in range(len(plan.files))]
    first: dict[bytes, tuple[int, int]] = {}
    drop: dict[int, set[int]] = {}

    def mark(pos: tuple[int, int]) -> None:
        drop.setdefault(pos[0], set()).add(pos[1])

    keys = _documents_ds(plan, items, cfg, None, {}, keys_only=True)
    batches = _driver_action(lambda: list(keys.iter_batches(batch_size=8192, batch_format="numpy")))
    for batch in batches:
        for f, d, k in zip(batch["file"], batch["doc"], batch["key"]):
            pos, key = (int(f), int(d)), bytes(k)
            prev = first.get(key)
            if prev is None:
                first[key] = pos
            elif pos < prev:
                mark(prev)
                first[key] = pos
            else:
                mark(pos)
    return {f: frozenset(d) for f, d in drop.items()}


def build_datasets(data_cfg: DataConfig, teacher: str, seed: int = 0, trust_remote_code: bool = False):
    """Lazy ``(train, validation)`` Ray Datasets of ``{"input_ids": int32[block_size]}`` rows.

    Needs a running Ray (``ray.init``). Documents are cleaned (``corpora.clean_text``),
    shorter ones than ``data.min_chars`` dropped, split (module docstring), deduplicated
    when ``data.dedupe`` (one eager pass over document digests; the rest is lazy),
    tokenized with the tokenizer of ``teacher`` (the ``teacher.model`` spec or a model directory,
    resolved on each node that tokenizes; no special tokens) in batched
    ``map_batches`` and packed with EOS after every document; the tokens left over at the
    end of each batch (fewer than ``block_size``) are dropped, never padded. The training
    set is shuffled with ``seed`` (same order every epoch); validation keeps corpus order.
    With ``data.mix`` the training blocks are drawn from each source by weight (``raykd.data.mix``;
    the per-source counts are attached to the train dataset as ``MIX_REPORT``).
    """
    plan, drop, kwargs = _setup(data_cfg, teacher, trust_remote_code)
    out = []
    for want, items in (("train", plan.train), ("validation", plan.validation)):
        if want == "train" and data_cfg.mix:  # blocks of each source, sampled by weight (raykd.data.mix)
            sources = [_packed(plan, group, data_cfg, want, drop, kwargs) for group in mix.source_items(plan, data_cfg)]
            ds, report, blocks = _driver_action(mix.mixed, sources, data_cfg, seed)
            setattr(ds, MIX_REPORT, report)
        else:
            blocks = _packed(plan, items, data_cfg, want, drop, kwargs)
            ds = blocks.random_shuffle(seed=seed, num_cpus=data_cfg.task_cpus) if want == "train" else blocks
        if want == "train" and data_cfg.max_train_blocks:
            ds = ds.limit(data_cfg.max_train_blocks)
        setattr(ds, _PROBE, (blocks, data_cfg.block_size))  # check_blocks probes before the shuffle
        out.append(ds)
    return out[0], out[1]


def _setup(data_cfg: DataConfig, teacher: str, trust_remote_code: bool) -> tuple[_Plan, dict, dict]:
    """What every pipeline of a run shares: the plan of files, the duplicates to drop, the tokenize kwargs."""
    teacher = str(Path(teacher).expanduser().resolve()) if Path(teacher).expanduser().exists() else str(teacher)  # a path: absolute
    tok = _tokenizer(teacher, trust_remote_code)
    if tok.eos_token_id is None:
        raise ConfigError(f"teacher.model: the tokenizer of {teacher} has no EOS token; packing needs one between documents, use a tokenizer that defines eos_token")
    plan = _plan(data_cfg, fetch=True)
    drop = _duplicates(plan, data_cfg) if data_cfg.dedupe else {}
    return plan, drop, {"teacher": teacher, "trust_remote_code": trust_remote_code, "block_size": data_cfg.block_size}


def _packed(plan: _Plan, items: list[tuple[int, str]], cfg: DataConfig, want: str, drop: dict, kwargs: dict):
    """The packed blocks of some of the plan's files (one split), before any shuffle."""
    docs = _documents_ds(plan, items, cfg, want, drop, keys_only=False)
    return docs.map_batches(_tokenize_pack, batch_size=None, batch_format="numpy", fn_kwargs=kwargs, num_cpus=cfg.task_cpus)


def source_blocks(data_cfg: DataConfig, teacher: str, trust_remote_code: bool = False) -> list:
    """With data.mix: the packed training blocks of each source (data.mix order, unshuffled, unweighted),
    the pools `build_datasets` draws the mix from (tests and inspection)."""
    plan, drop, kwargs = _setup(data_cfg, teacher, trust_remote_code)
    return [_packed(plan, group, data_cfg, "train", drop, kwargs) for group in mix.source_items(plan, data_cfg)]


def ingest_options():
    """``ExecutionOptions`` for ``ray.train.DataConfig(execution_options=...)``: keep the shard order deterministic."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options  # (Train's own default_ingest_options warns: it passes the deprecated exclude_resources)
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True, verbose_progress=current.verbose_progress)


def check_blocks(ds, field: str) -> None:
    """Raise ``ConfigError`` when `ds` yields no block; reads at most one block (before any shuffle)."""
    probe, block_size = getattr(ds, _PROBE, (ds, None))
    if not _driver_action(probe.take, 1):
        _too_short(field, block_size)


def _too_short(field: str, block_size: int | None):
    size = f"one block of {block_size} tokens" if block_size else "one block"
    raise ConfigError(f"{field}: the corpus is too short for {size}; add text or lower data.block_size")


def materialized(data_cfg: DataConfig, teacher: str, seed: int, trust_remote_code: bool, val_blocks: int, train: bool = True):
    """``(train | None, validation)`` for a run or a sweep: ``build_datasets`` executed once on the driver into
    the object store and checked to hold a block each (one ``ConfigError`` line otherwise). Train is the shuffled
    set (the shuffle is a barrier that holds it all anyway; None when not `train`: a teacher-cache run reads its
    shards), validation its first `val_blocks` blocks, all any reader takes. Train workers then read blocks instead
    of each re-running the read/tokenize/shuffle tasks (about 10 s per split and per worker-group start on 2 cores),
    and a sweep's trials share them."""
    train_ds, val_ds = build_datasets(data_cfg, teacher, seed, trust_remote_code)
    out = []
    for ds, field in ((train_ds if train else None, "data.train"), (val_ds.limit(val_blocks), "data.validation")):
        if ds is not None:
            report = getattr(ds, MIX_REPORT, None)
            ds = _driver_action(ds.materialize)
            if ds.count() == 0:
                _too_short(field, data_cfg.block_size)
            if report is not None:
                setattr(ds, MIX_REPORT, report)
        out.append(ds)
    return out[0], out[1]


def check_tokens(data_cfg: DataConfig, teacher: str, trust_remote_code: bool = False) -> None:
    """Driver preflight, no Ray: each split must hold at least one block of tokens (documents as the
    pipeline reads them, EOS after each), else one ``ConfigError`` line before any cluster starts.
    Counts only up to one block. Passing is necessary, not sufficient: packing drops each task's
    leftover, so `check_blocks` still probes the built dataset."""
    tok = _tokenizer(str(teacher), trust_remote_code)
    block = data_cfg.block_size
    for split in ("train", "validation"):
        n = 0
        for doc in documents(data_cfg, split):
            n += len(_corpora().leading_ids(tok, doc, block - n)) + 1  # a whole book is not tokenized for this
            if n >= block:
                break
        else:
            field, fix = (("data.train", "add training text") if split == "train" else
                          ("data.validation", "add held-out text (data.validation files, or a larger data.val_fraction)"))
            raise ConfigError(f"{field}: the {split} split holds {n} tokens, fewer than one block of {block}; "
                              f"{fix} or lower data.block_size")


def take_blocks(ds, max_blocks: int):
    """The first `max_blocks` blocks of `ds` on the driver as a LongTensor [n, block_size]."""
    import torch

    rows = _driver_action(ds.take, max_blocks)
    if not rows:
        raise ConfigError("data.validation: no validation block; add held-out text or lower data.block_size")
    return torch.from_numpy(np.stack([np.asarray(r["input_ids"]) for r in rows])).long()


# --- reading inside Ray Train workers --------------------------------------------------------


def val_blocks(max_blocks: int):
    """In a Ray Train worker: the first `max_blocks` validation blocks as a LongTensor [n, T]."""
    import torch

    from raykd.runtime import session

    out, n = [], 0
    for batch in session().get_dataset_shard("validation").iter_torch_batches(batch_size=min(32, max_blocks), dtypes=torch.long):
        out.append(batch["input_ids"])
        n += len(out[-1])
        if n >= max_blocks:
            break
    return torch.cat(out)[:max_blocks]


class ShardBatches:
    """In a Ray Train worker: endless micro-batches from its shard of "train", epoch after epoch; resumable by position.
    Yields input_ids [B, T] long, or with `cached` the numpy batch of teacher-cache rows."""

    def __init__(self, batch_size: int, epoch: int = 0, skip: int = 0, cached: bool = False):
        from raykd.runtime import session

        self.shard = session().get_dataset_shard("train")
        self.batch_size, self.epoch, self.index, self._skip, self.cached = batch_size, epoch, 0, skip, cached
        self._it = None

    def _iter(self):
        import torch

        if self.cached:
            return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True))
        return (b["input_ids"] for b in self.shard.iter_torch_batches(batch_size=self.batch_size, dtypes=torch.long, drop_last=True))

    def __next__(self):
        while True:
            if self._it is None:
                self._it = self._iter()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    raise RuntimeError("data.train: a worker's shard holds fewer blocks than one batch; lower train.batch_size or add text") from None
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
                continue
            self.index += 1
            if self._skip:  # resuming: replay the data position of the checkpoint
                self._skip -= 1
                continue
            return batch
