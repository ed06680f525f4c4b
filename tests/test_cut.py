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


def _tied_copy(model_dir, out):
    """The tiny teacher with its head tied to its embeddings (as SmolLM2's is), saved to `out`."""
    teacher = models.load_model(model_dir, torch.float32)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher.save_pretrained(out)
    return out


def test_a_student_keeping_every_layer_computes_what_the_teacher_does(tiny_teacher_dir, tmp_path):
    """Students are built without transformers' random init (models.empty_model) and then loaded: any parameter or
    buffer left unloaded (or a head left untied) would be garbage memory. Keeping every layer, both ways of cutting
    must give the teacher's logits, for an untied and a tied head."""
    for model_dir in (tiny_teacher_dir, _tied_copy(tiny_teacher_dir, tmp_path / "tied")):
        teacher = models.load_model(model_dir, torch.float32, frozen=True)
        ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        every = list(range(teacher.config.num_hidden_layers))
        with torch.no_grad():
            want = teacher(ids).logits
            for student in (cut.from_files(model_dir, every), models.cut_student(teacher, every, dtype=torch.float32)):
                torch.testing.assert_close(student(ids).logits, want)
                assert {n for n, _ in student.named_buffers()} == {n for n, _ in teacher.named_buffers()}
                shared = student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
                assert shared == teacher.config.tie_word_embeddings  # a tied head stays one parameter


def _freeze_engine(teacher, freeze: bool):
    from raykd.config import from_dict
    from raykd.layer_map import layer_map
    from raykd.objective import Distiller
    from raykd.parallel import make_engine

    keep = [0, 3, 5]
    cfg = from_dict({"teacher": {"model": "tiny-random"}, "student": {"init": "list", "layers": keep, "freeze_embeddings": freeze},
                     "loss": {"weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.1}, "chunk_size": 37},
                     "train": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 4}})
    torch.manual_seed(0)
    student = models.cut_student(teacher, keep, dtype=torch.float32)
    if freeze:
        assert cut.freeze_embeddings(student, teacher) == teacher.config.vocab_size * teacher.config.hidden_size
    depth = teacher.config.num_hidden_layers
    distiller = Distiller.build(student, cfg.loss, layer_map("auto", depth, len(keep), kept=keep), teacher.config.hidden_size, depth)
    return make_engine(distiller, teacher, cfg, torch.device("cpu"), 1)


def test_frozen_embeddings_are_the_teachers_and_leave_every_other_gradient_as_it_was(tiny_teacher_dir):
    """student.freeze_embeddings: the cut student holds the teacher's embedding/head tensor (one copy), which gets
    no gradient, no AdamW state and no update, while every other weight gets the gradient it gets without freezing
    (the fused head loss skips only the head's weight gradient) and trains."""
    from raykd.objective import teacher_forward

    teacher = models.load_model(tiny_teacher_dir, torch.float32, frozen=True)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    runs = {}
    for freeze in (False, True):
        engine = _freeze_engine(teacher, freeze)
        loss, terms = engine.forward(ids, teacher_forward(teacher, ids, engine.distiller.spec.teacher_needs()))
        engine.backward(loss, True)
        runs[freeze] = engine, terms, {n: p.grad.clone() for n, p in engine.distiller.named_parameters() if p.grad is not None}
    engine, terms, grads = runs[True]
    student, emb = engine.distiller.student, teacher.get_input_embeddings().weight
    assert student.get_input_embeddings().weight is emb and student.get_output_embeddings().weight is emb
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert before and all("embed_tokens" not in n for n in grads)  # the tied head is listed under embed_tokens
    assert set(grads) == {n for n in runs[False][2] if "embed_tokens" not in n}
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, runs[False][2][name], atol=1e-6, rtol=1e-5, msg=name)
    for name in terms:
        torch.testing.assert_close(terms[name], runs[False][1][name], msg=name)
    engine.micro_step()
    engine.step()
    assert emb not in engine.optimizer.state and torch.equal(student.get_input_embeddings().weight, before["model.embed_tokens.weight"])
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("embed_tokens" not in n for n in moved)
    assert len(moved) == len([n for n, p in student.named_parameters() if p.requires_grad])


def test_frozen_embeddings_not_shared_with_a_teacher_of_another_dtype(tiny_teacher_dir):
    teacher = models.load_model(tiny_teacher_dir, torch.bfloat16, frozen=True)
    student = models.cut_student(models.load_model(tiny_teacher_dir, torch.float32, frozen=True), [0, 2])
    n = cut.freeze_embeddings(student, teacher)
    w = student.get_input_embeddings().weight
    assert n == w.numel() and w.dtype == torch.float32 and w is not teacher.get_input_embeddings().weight
    assert not w.requires_grad and student.get_output_embeddings().weight is w  # still tied, still one tensor
    assert all(p.requires_grad for name, p in student.named_parameters() if "embed_tokens" not in name)
