"""raykd.cut: a student read from the teacher's safetensors files equals the one cut from the loaded teacher."""

import json

import torch
from safetensors.torch import save_file

from raykd import cut, models


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_from_files_equals_cutting_the_loaded_teacher(tiny_teacher_dir):
    teacher = models.load_model(tiny_teacher_dir, torch.float32, frozen=True)
    for keep in ([0, 1], [0, 3], [2]):
        student = cut.from_files(tiny_teacher_dir, keep)
        _same(student, models.cut_student(teacher, keep, dtype=torch.float32))
        assert student.training and all(p.requires_grad for p in student.parameters())
        assert student.config.num_hidden_layers == len(keep)


def test_sharded_files_and_a_foreign_layout(tiny_teacher_dir, tmp_path):
    teacher = models.load_model(tiny_teacher_dir, torch.float32, frozen=True)
    state = {k: v.contiguous() for k, v in teacher.state_dict().items() if k != "lm_head.weight" or not teacher.config.tie_word_embeddings}
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tiny_teacher_dir / "config.json").read_text())
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, part in halves.items() for k in part}}))
    _same(cut.from_files(sharded, [1, 2]), models.cut_student(teacher, [1, 2], dtype=torch.float32))
    # names the model does not use (an older layout transformers would rename at load): None, the caller loads the teacher
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text((tiny_teacher_dir / "config.json").read_text())
    save_file({k.replace("model.", "transformer.", 1): v for k, v in state.items()}, str(foreign / "model.safetensors"))
    assert cut.from_files(foreign, [0, 1]) is None
    assert cut.from_files(tmp_path, [0]) is None  # no safetensors files at all
