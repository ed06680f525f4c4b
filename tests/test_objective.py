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


def test_class_kd_term_is_reported_matches_class_kl_and_trains(tiny_teacher):
    """loss.weights.class_kd weights class_kl (class-aware logit KD) beside the per-token kd: the Distiller's
    step reports it under `class_kd`, it equals class_kl on the full logits of the predicting positions, and
    a few steps on one batch lower the objective."""
    from raykd.losses import class_kl

    torch.manual_seed(0)
    kept = [0, 3, 5]
    cfg = LossConfig(kd="forward_kl", temperature=2.0, chunk_size=13, weights=LossWeights(ce=1.0, kd=1.0, class_kd=0.5))
    dist = Distiller.build(cut_student(tiny_teacher, kept), cfg, layer_map("auto", 6, 3, kept=kept), 64, 6)
    assert dist.spec.weights == {"ce": 1.0, "kd": 1.0, "class_kd": 0.5} and dist.spec.uses_teacher
    assert dist.spec.report_terms == ("loss", "ce", "kd", "class_kd")
    ids = ids_for(tiny_teacher)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -5:] = False
    out = teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs())
    loss, terms = dist(ids, out, mask)
    assert set(terms) == {"loss", "ce", "kd", "class_kd"} and float(terms["class_kd"]) > 0
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kd"] + 0.5 * terms["class_kd"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        s_logits, t_logits = dist.student(ids).logits[:, :-1], tiny_teacher(ids).logits[:, :-1]
    pos = (mask[:, :-1] & mask[:, 1:])
    torch.testing.assert_close(terms["class_kd"], class_kl(s_logits, t_logits, pos, 2.0), rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW(dist.parameters(), lr=3e-3)
    first = float(terms["loss"])
    for _ in range(10):
        opt.zero_grad()
        loss, terms = dist(ids, out, mask)
        loss.backward()
        opt.step()
    assert float(terms["loss"]) < 0.9 * first, (first, terms)
    # the class term's own gradient trains: class_kd alone falls too
    cfg = LossConfig(temperature=2.0, chunk_size=13, weights=LossWeights(ce=0.0, kd=0.0, class_kd=1.0))
    dist = Distiller.build(cut_student(tiny_teacher, kept), cfg, layer_map("auto", 6, 3, kept=kept), 64, 6)
    opt = torch.optim.AdamW(dist.parameters(), lr=3e-3)
    history = []
    for _ in range(10):
        opt.zero_grad()
        loss, terms = dist(ids, out, mask)
        loss.backward()
        opt.step()
        history.append(float(terms["class_kd"]))
    assert set(terms) == {"loss", "class_kd"} and history[-1] < 0.8 * history[0], history


def test_class_kd_alone_and_identical_student(tiny_teacher):
    kept = list(range(tiny_teacher.config.num_hidden_layers))
    cfg = LossConfig(weights=LossWeights(ce=0.0, kd=0.0, class_kd=1.0))
    dist = Distiller.build(cut_student(tiny_teacher, kept), cfg, layer_map("auto", 6, 6, kept=kept), 64, 6)
    ids = ids_for(tiny_teacher)
    loss, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()))
    assert set(terms) == {"loss", "class_kd"} and abs(float(terms["class_kd"])) < 1e-5
    t = dist.spec.teacher_needs()
    assert dist.spec.uses_teacher and (t.hidden, t.qkv) == ((), ())


def test_class_kd_config_validation():
    """A top-k cache cannot serve class_kd (one line naming the field and the fix), a dense one can; loss.kd refuses class_kl."""
    from raykd.config import Config, ConfigError, TeacherConfig

    with pytest.raises(ConfigError) as e:
        Config(teacher=TeacherConfig(cache="x", cache_topk=256), loss=LossConfig(weights=LossWeights(class_kd=0.5)))
    msg = str(e.value)
    assert msg.startswith("loss.weights.class_kd: class_kl needs every token's dense teacher logits") and "\n" not in msg
    assert "set loss.weights.class_kd=0, teacher.cache_topk=0 (a dense cache) or drop teacher.cache" in msg
    Config(teacher=TeacherConfig(cache="x", cache_topk=256), loss=LossConfig(weights=LossWeights(class_kd=0.0)))  # off: served
    Config(teacher=TeacherConfig(cache="x"), loss=LossConfig(weights=LossWeights(class_kd=0.5)))  # a dense cache (the default) serves it
    with pytest.raises(ConfigError, match=r"^loss\.weights\.class_kd: negative weight"):
        LossWeights(class_kd=-0.5)
    with pytest.raises(ConfigError, match=r"^loss\.kd: class_kl is a batch-level .* loss\.weights\.class_kd"):
        LossConfig(kd="class_kl", weights=LossWeights(class_kd=0.5))
