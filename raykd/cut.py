"""A student cut from a teacher's files without loading the teacher (`raykd.models.cut_student` on disk).

When the teacher cache serves every teacher term, a worker needs the teacher only to copy the kept
layers from: reading just those tensors (plus embeddings, final norm and head) from the teacher's
safetensors files costs the student's size in memory and I/O instead of the teacher's. The result is
the same model `cut_student(load_model(teacher_dir), keep)` gives (tests/test_cut.py checks every
tensor); when the files do not hold the model's own parameter names (a checkpoint in an older layout
that transformers renames at load), `from_files` returns None and the caller loads the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raykd import models


def _files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def from_files(model_dir, keep: list[int], dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A trainable student holding copies of teacher layers `keep` (in order), read from `model_dir`'s
    safetensors files; None when they cannot give every parameter by name (load the teacher instead)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = _files(model_dir)
    if not files:
        return None
    config = models.student_config(models.load_config(model_dir, trust_remote_code), keep)
    student = models.empty_model(config, dtype, trust_remote_code)
    prefix, new_index = models._layers_prefix(student), {old: new for new, old in enumerate(keep)}
    wanted, state = student.state_dict(), {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                name = models.student_key(key, prefix, new_index)
                if name is None:
                    continue  # a dropped layer
                if name not in wanted:
                    return None  # a name the model does not use: an older layout, renamed at load
                state[name] = fh.get_tensor(key).to(dtype)
    if set(wanted) - set(state) - models._tied_keys(student):
        return None
    student.load_state_dict(state, strict=False)  # tied head weights are absent from the files
    student.tie_weights()
    return student.requires_grad_(True).train()
