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


def freeze_embeddings(student, teacher=None) -> int:
    """`student.freeze_embeddings`: the student's token embeddings and output head (and its bias) keep their
    initial weights: requires_grad off, so neither gets a gradient, the fused head loss skips its [V, H] weight
    gradient and AdamW keeps no state for them (for SmolLM2's 10-layer cut: 28 M of 64 M parameters, ~450 MB
    of weights' gradient and AdamW moments in fp32). With `teacher` (a student cut from it, whose tensors
    equal the student's), the student holds the teacher's tensors instead of its copies. Returns the number of
    parameters frozen (tied weights counted once)."""
    pairs = [(student.get_input_embeddings(), teacher.get_input_embeddings() if teacher is not None else None)]
    out, t_out = student.get_output_embeddings(), teacher.get_output_embeddings() if teacher is not None else None
    if out is not None:
        pairs.append((out, t_out))
    frozen = {}
    for mod, t_mod in pairs:
        for name, p in list(mod.named_parameters(recurse=False)):
            t_p = getattr(t_mod, name, None) if t_mod is not None else None
            if (isinstance(t_p, torch.nn.Parameter) and t_p.shape == p.shape and t_p.dtype == p.dtype
                    and t_p.device == p.device and torch.equal(t_p, p)):
                p = t_p  # the teacher's own tensor: one copy in memory
                setattr(mod, name, p)
            p.requires_grad_(False)
            frozen[id(p)] = p.numel()
    return sum(frozen.values())
