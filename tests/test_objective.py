import pytest
import torch

from raykd.config import LossConfig, LossWeights
from raykd.layer_map import layer_map
from raykd.models import build_tiny_random, cut_student, load_model
from raykd.objective import Distiller, teacher_forward

ALL = dict(ce=1.0, kd=1.0, hidden=0.5, attention=0.2, relation=0.2, blockwise=0.3)


def make(teacher, student, kept, **weights):
    cfg = LossConfig(weights=LossWeights(**weights), chunk_size=37)
    L, S = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    pairs = layer_map("auto", L, S, kept=kept)
    return Distiller.build(student, cfg, pairs, teacher.config.hidden_size, L)


def ids_for(teacher, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, teacher.config.vocab_size, (b, t), generator=g)


def test_every_term_is_computed_and_trains(tiny_teacher):
    torch.manual_seed(0)
    kept = [0, 3, 5]
    dist = make(tiny_teacher, cut_student(tiny_teacher, kept), kept, **ALL)
    ids = ids_for(tiny_teacher)
    out = teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs())
    loss, terms = dist(ids, out)
    assert set(terms) == {"ce", "kd", "hidden", "attention", "relation", "blockwise", "loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    expected = sum(ALL[k] * terms[k] for k in ALL)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    grads = [p.grad for p in dist.student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert not any(p.grad is not None for p in tiny_teacher.parameters())
    # a few steps on one batch: the objective falls
    opt = torch.optim.AdamW(dist.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(15):
        opt.zero_grad()
        loss, _ = dist(ids, out)
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first


def test_ce_matches_the_models_own_loss(tiny_teacher):
    kept = [0, 2, 5]
    student = cut_student(tiny_teacher, kept)
    dist = make(tiny_teacher, student, kept, ce=1.0, kd=0.0)
    ids = ids_for(tiny_teacher)
    assert dist.spec.teacher_needs().hidden == () and dist.spec.teacher_needs().qkv == ()
    _, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()))
    torch.testing.assert_close(terms["ce"], student(ids, labels=ids).loss.detach(), rtol=1e-5, atol=1e-5)
    assert "kd" not in terms
    # CE only: the training loop runs no teacher forward, and the loss without one is the same
    assert not dist.spec.uses_teacher and make(tiny_teacher, student, kept, ce=1.0, kd=0.5).spec.uses_teacher
    torch.testing.assert_close(dist(ids, None)[1]["ce"], terms["ce"], rtol=1e-6, atol=1e-6)


def test_a_student_identical_to_the_teacher_has_zero_alignment_losses(tiny_teacher):
    kept = list(range(tiny_teacher.config.num_hidden_layers))
    dist = make(tiny_teacher, cut_student(tiny_teacher, kept), kept, **ALL)
    ids = ids_for(tiny_teacher)
    _, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()))
    for name in ("kd", "hidden", "attention", "relation", "blockwise"):
        assert abs(float(terms[name])) < 1e-4, (name, terms[name])


def test_weight_zero_terms_capture_nothing(tiny_teacher):
    kept = [0, 3, 5]
    dist = make(tiny_teacher, cut_student(tiny_teacher, kept), kept, ce=1.0, kd=1.0)
    t, s = dist.spec.teacher_needs(), dist.spec.student_needs()
    assert (t.hidden, t.qkv, t.layer_inputs, s.hidden, s.qkv) == ((), (), (), (), ())
    dist = make(tiny_teacher, cut_student(tiny_teacher, kept), kept, ce=1.0, blockwise=1.0)
    assert dist.spec.block_pairs == ((3, 1),) and dist.spec.teacher_needs().layer_inputs == (4, 5)


def test_hf_student_of_another_width_uses_learned_projections(tiny_teacher):
    student = load_model(build_tiny_random("tiny-random:layers=2,hidden=32,heads=2,kv_heads=1"))
    dist = make(tiny_teacher, student, None, ce=1.0, kd=1.0, hidden=1.0, relation=0.5, blockwise=0.5)
    assert dist.spec.pairs == ((2, 0), (5, 1))
    ids = ids_for(tiny_teacher)
    loss, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()))
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in dist.projections.maps)
    assert float(terms["hidden"]) > 0


@pytest.mark.parametrize("kd", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "dkd"])
def test_every_logit_loss_runs_in_the_objective(tiny_teacher, kd):
    kept = [0, 3, 5]
    cfg = LossConfig(kd=kd, temperature=2.0, weights=LossWeights(ce=0.5, kd=1.0))
    dist = Distiller.build(cut_student(tiny_teacher, kept), cfg, layer_map("auto", 6, 3, kept=kept), 64, 6)
    ids = ids_for(tiny_teacher)
    loss, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()))
    loss.backward()
    assert torch.isfinite(loss) and float(terms["kd"]) >= 0
