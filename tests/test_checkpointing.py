"""train.activation_checkpointing: the student's decoder layers are recomputed in backward, the
gradients of the whole multi-task loss (CE, KD, class KD, hidden, attention, relation, block-wise,
all from captures of checkpointed layers) are those of the run without it, and the forward keeps
fewer activations. Tiny random models, one process, no Ray."""
import pytest
import torch

from raykd.config import ConfigError, from_dict
from raykd.layer_map import layer_map
from raykd.models import cut_student
from raykd.objective import Distiller, teacher_forward
from raykd.parallel import checkpoint_activations, make_engine

KEPT = [0, 3, 5]
WEIGHTS = {"ce": 1.0, "kd": 1.0, "class_kd": 0.5, "hidden": 0.5, "attention": 0.2, "relation": 0.2, "blockwise": 0.3}


def _engine(teacher, ckpt: bool):
    cfg = from_dict({"teacher": {"model": "tiny-random"}, "student": {"init": "list", "layers": KEPT},
                     "loss": {"weights": WEIGHTS, "chunk_size": 37}, "train": {"activation_checkpointing": ckpt}})
    torch.manual_seed(0)  # same student cut, same projection init
    student = cut_student(teacher, KEPT)
    depth = teacher.config.num_hidden_layers
    distiller = Distiller.build(student, cfg.loss, layer_map("auto", depth, len(KEPT), kept=KEPT), teacher.config.hidden_size, depth)
    return make_engine(distiller, teacher, cfg, torch.device("cpu"), 1)


def _batch(teacher):
    return torch.randint(0, teacher.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))


def _step(engine, teacher, ids):
    """One engine forward + backward; (loss terms, {name: grad}, q_proj forward calls per student layer)."""
    calls = [0] * len(KEPT)
    layers = engine.distiller.student.model.layers
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        loss, terms = engine.forward(ids, teacher_forward(teacher, ids, engine.distiller.spec.teacher_needs()))
        engine.backward(loss, True)
    finally:
        for h in hooks:
            h.remove()
    return terms, {n: p.grad for n, p in engine.distiller.named_parameters()}, calls


def test_checkpointed_student_gets_the_same_gradients(tiny_teacher):
    ids = _batch(tiny_teacher)
    (terms0, grads0, calls0), (terms1, grads1, calls1) = (_step(_engine(tiny_teacher, ckpt), tiny_teacher, ids) for ckpt in (False, True))
    assert calls0 == [1, 1, 1]
    assert calls1 == [2, 2, 2]  # every student layer ran again in backward: checkpointing is on
    assert set(terms0) == set(WEIGHTS) | {"loss"}
    for name in terms0:
        torch.testing.assert_close(terms1[name], terms0[name], atol=1e-6, rtol=0, msg=name)
    # every student weight and projection gets a gradient, the same one (q/k of every layer included)
    must = {f"student.model.layers.{i}.self_attn.{w}_proj.weight" for i in range(len(KEPT)) for w in ("q", "k", "v")}
    assert must <= set(grads0) and set(grads1) == set(grads0)
    for name, g in grads0.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], g, atol=1e-6, rtol=0, msg=name)
    assert not any(p.grad is not None for p in tiny_teacher.parameters())


def _saved_activation_bytes(engine, teacher, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward during the Distiller's forward."""
    params = {p.untyped_storage().data_ptr() for p in engine.distiller.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    t_out = teacher_forward(teacher, ids, engine.distiller.spec.teacher_needs())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = engine.forward(ids, t_out)
    loss.backward()
    return sum(seen.values())


def test_checkpointing_keeps_fewer_activations(tiny_teacher):
    ids = _batch(tiny_teacher)
    off, on = (_saved_activation_bytes(_engine(tiny_teacher, ckpt), tiny_teacher, ids) for ckpt in (False, True))
    assert on < 0.7 * off, (on, off)  # 0.57 here: the layers keep only their inputs


def test_checkpointing_refuses_a_model_without_support(tiny_teacher):
    student = cut_student(tiny_teacher, KEPT)
    student.supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        checkpoint_activations(student)
