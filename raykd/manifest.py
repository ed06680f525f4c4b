"""Checkpoint manifests: what a checkpoint should hold, so a resume can tell a damaged one.

Every worker lists the files it put into a checkpoint (size and SHA-256 of each) in its own
`manifest{rank}.json`, written last, next to the files; Ray Train merges the workers' parts into
one checkpoint directory. On resume `choose` verifies the checkpoint Ray offers (every worker's
manifest present, every listed file there with its size and digest) and, when it is damaged (a
truncated `worker0.pt` after a full disk, a half-copied directory), falls back to the newest older
checkpoint of the run that verifies. A checkpoint without any manifest (written before raykd had
them) is resumed from unverified. Verifying reads every file once more (about 1 GB/s for SHA-256).

No Ray here: files are read through a pyarrow `FileSystem` (local disk, S3, ...), the way Ray Train
stores checkpoints, so the candidates are checked where they live, before anything is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"manifest(\d+)\.json")
_CHUNK = 1 << 20


def run_dir(storage: str, name: str):
    """(pyarrow filesystem, path) of run `name` under `storage` (a local path or a pyarrow URI, e.g. s3://bucket/prefix):
    where Ray Train keeps that run's checkpoints."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), os.path.abspath(storage))
    return fs, f"{root.rstrip('/')}/{name}"


def _sha256(stream) -> str:
    h = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file, read in chunks."""
    with open(path, "rb") as fh:
        return _sha256(fh)


def write_json(path: Path, value, indent: int | None = 1) -> None:
    """`value` as JSON at `path`, atomically: written to a hidden temp file beside it, then renamed
    (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=indent))
    os.replace(tmp, path)


def write(d: Path, rank: int, world: int, step: int) -> Path:
    """List every file under `d` (this worker's part of a checkpoint) in `d/manifest{rank}.json`."""
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not _NAME.fullmatch(p.name):
            with p.open("rb") as fh:
                files[p.relative_to(d).as_posix()] = [p.stat().st_size, _sha256(fh)]
    out = d / f"manifest{rank}.json"
    write_json(out, {"rank": rank, "world": world, "step": step, "files": files})
    return out


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None


def problem(fs, path: str) -> str | None:
    """Why the checkpoint directory `path` on `fs` cannot be resumed from (a short phrase), or None."""
    from pyarrow.fs import FileSelector, FileType

    names = [posixpath.basename(i.path) for i in fs.get_file_info(FileSelector(path)) if i.type == FileType.File]
    ranks = sorted(int(m.group(1)) for n in names if (m := _NAME.fullmatch(n)))
    if not ranks:
        return None  # written before manifests existed: nothing to check against
    manifests = {r: _read_json(fs, f"{path}/manifest{r}.json") for r in ranks}
    if any(m is None for m in manifests.values()):
        return f"manifest{next(r for r, m in manifests.items() if m is None)}.json is unreadable"
    world = manifests[ranks[0]]["world"]
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        return f"manifest{missing[0]}.json of worker {missing[0]} (of {world}) is missing"
    for m in manifests.values():
        for rel, (size, digest) in m["files"].items():
            info = fs.get_file_info(f"{path}/{rel}")
            if info.type != FileType.File:
                return f"{rel} is missing"
            if info.size != size:
                return f"{rel} holds {info.size} bytes, the manifest says {size}"
            with fs.open_input_stream(f"{path}/{rel}") as fh:
                if _sha256(fh) != digest:
                    return f"{rel} does not match its SHA-256"
    return None


def choose(fs, latest: str) -> tuple[str, str | None]:
    """The checkpoint to resume from: `latest` when intact, else the newest older intact checkpoint
    of the same run (its siblings `checkpoint_*`, newest first by their time-stamped names); plus one
    line saying what was skipped (None when nothing was). Raises RuntimeError when none is intact."""
    from pyarrow.fs import FileSelector, FileType

    why = problem(fs, latest)
    if why is None:
        return latest, None
    parent, name = posixpath.split(latest.rstrip("/"))
    older = sorted((posixpath.basename(i.path) for i in fs.get_file_info(FileSelector(parent))
                    if i.type == FileType.Directory and posixpath.basename(i.path).startswith("checkpoint_")
                    and posixpath.basename(i.path) < name), reverse=True)
    for other in older:
        if problem(fs, f"{parent}/{other}") is None:
            return f"{parent}/{other}", (f"raykd: checkpoint {name} is damaged ({why}); resuming from {other}, "
                                         f"the newest intact checkpoint of this run")
    raise RuntimeError(f"checkpoint {latest} is damaged ({why}) and no older checkpoint of this run is intact; "
                       f"delete {parent} (or the output directory) to start over")


def publish(src: Path, dst: Path) -> None:
    """Copy `src` (a file or a directory, e.g. out of a checkpoint) to `dst` through a sibling temporary,
    then swap: a reader never sees a half-written output."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        old = dst.with_name(f".{dst.name}.old")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
