"""The teacher's side of each task, kept on disk between runs.

Every trial of a sweep (and every arm of a study) scores the same frozen teacher on the same
examples; the first run computes the teacher's scores, later runs on the node read them. The
key covers everything the result depends on: the teacher's files (config, tokenizer and weight
files by name, size and modification time), the device type and dtype it ran in, the task and
its exact inputs. A damaged entry is recomputed; entries are written whole (temporary file,
then rename), so concurrent trials never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def teacher_identity(model_dir: Path, model) -> str:
    """A digest of the teacher's files and of how it runs (device type, dtype)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update((model_dir / "config.json").read_bytes() if (model_dir / "config.json").is_file() else b"")
    p = next(model.parameters())
    h.update(f"{p.device.type}:{p.dtype}".encode())
    return h.hexdigest()[:24]


class TeacherMemo:
    """`get(task, inputs, compute)`: the stored result for (teacher, task, inputs), else `compute()`, stored."""

    def __init__(self, root: Path | None, teacher_id: str | None):
        self.root = Path(root) if root is not None and teacher_id else None
        self.teacher_id = teacher_id
        self.hits = 0

    def get(self, task: str, inputs, compute: Callable[[], dict]) -> dict:
        if self.root is None:
            return compute()
        digest = hashlib.sha256(json.dumps([self.teacher_id, task, inputs], sort_keys=True).encode()).hexdigest()[:32]
        path = self.root / f"{task}-{digest}.json"
        try:
            value = json.loads(path.read_text())
            self.hits += 1
            return value
        except (OSError, ValueError):  # missing or damaged: compute it again
            pass
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
        return value


def default(model_dir, model) -> TeacherMemo:
    """The memo under RAYKD_CACHE/tasks/teacher-scores for this teacher (per node)."""
    from raykd.models import cache_root

    return TeacherMemo(cache_root() / "tasks" / "teacher-scores", teacher_identity(model_dir, model))
