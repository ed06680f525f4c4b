"""What a train worker builds before its engine: the student, the frozen teacher (or, with a teacher cache, what
of it the cached targets still need) and the `Distiller` around the student.

The student is cut from the teacher (`student.layers`, resolved by `raykd.plan`) or loaded (`student.model`);
`student.dropped: linear` folds the stand-ins' maps in (`raykd.replace`) and `student.freeze_embeddings` freezes
its embeddings. With `teacher.cache` no teacher is kept while training: a cut student's layers are read from the
teacher's files (`raykd.cut`; the teacher is loaded only when they cannot give them by name), and a dense cache
(`teacher.cache_topk: 0`, which stores the teacher's final hidden state) keeps the teacher's LM head alone.
"""

from __future__ import annotations

import torch

from raykd import cut, models, replace
from raykd.config import Config
from raykd.objective import Distiller, head
from raykd.spec import weights_of


def build(cfg: Config, maps: dict | None = None):
    """(teacher_dir, frozen teacher or None, the teacher's head (weight [V, H], bias [V] | None) for a dense cache
    or None, Distiller), on the CPU; the engine places them. `maps`: the stand-ins' maps the driver shared
    (`raykd.train.build_trainer`; None: this node's cache, or fitted here)."""
    trc = cfg.teacher.trust_remote_code
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log=lambda m: None)
    t_config = models.load_config(teacher_dir, trc)
    cached = bool(cfg.teacher.cache)
    if cfg.student.model:
        student = models.load_model(models.resolve_model(cfg.student.model, "student.model"), torch.float32, trc).requires_grad_(True).train()
    else:
        student = cut.from_files(teacher_dir, cfg.student.layers, torch.float32, trc) if cached else None
    teacher = None if (cached and student is not None) else models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), trc, frozen=True)
    if student is None:
        student = models.cut_student(teacher, cfg.student.layers, dtype=torch.float32)
    t_head = _dense_cache_head(cfg, teacher_dir, teacher, student) if cached else None  # before any change to the student
    replace.stand_ins(cfg, teacher_dir, student, teacher, maps=maps)  # student.dropped=linear: the maps the plan fitted, folded in
    if cfg.student.freeze_embeddings:  # shared with the teacher only where no strategy re-partitions the student
        cut.freeze_embeddings(student, teacher if cfg.scale.strategy == "ddp" else None)
    pairs = [tuple(p) for p in cfg.layer_map.pairs]  # explicit: written by raykd.plan.resolve
    distiller = Distiller.build(student, cfg.loss, pairs, t_config.hidden_size, models.num_layers(t_config))
    return teacher_dir, None if cached else teacher, t_head, distiller


def _dense_cache_head(cfg: Config, teacher_dir, teacher, student) -> tuple | None:
    """A copy of the teacher's LM head when a dense cache serves KD (None otherwise): from the teacher when it was
    loaded, else from a student cut from its files before any training (the same tensors), else loaded for it."""
    if cfg.teacher.cache_topk or not {"kd", "class_kd"} & set(weights_of(cfg.loss)):
        return None
    if teacher is None and cfg.student.model:  # another model's head is not the teacher's
        teacher = models.load_model(teacher_dir, models.resolve_dtype(cfg.teacher.dtype), cfg.teacher.trust_remote_code, frozen=True)
    w, b = head(teacher if teacher is not None else student)
    dtype = models.resolve_dtype(cfg.teacher.dtype)
    return w.detach().to(dtype, copy=True), None if b is None else b.detach().to(dtype, copy=True)
