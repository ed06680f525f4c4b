"""train.compile: the student layers' MLPs and norms run torch.compile'd (inductor), the attention and the layers
stay eager so raykd's per-step capture hooks still fire, and the whole multi-task loss (every capture term) and
its gradients are those of the eager run; DeepSpeed is refused by name. Tiny random models, one process, no Ray."""
import pytest
import torch

from raykd.config import ConfigError, from_dict
from raykd.layer_map import layer_map
from raykd.models import cut_student
from raykd.objective import Distiller, teacher_forward
from raykd.parallel import make_engine

KEPT = [0, 3, 5]
WEIGHTS = {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.2, "relation": 0.2, "blockwise": 0.3}


def _engine(teacher, **train):
    cfg = from_dict({"teacher": {"model": "tiny-random"}, "student": {"init": "list", "layers": KEPT},
                     "loss": {"weights": WEIGHTS, "chunk_size": 37}, "train": train})
    torch.manual_seed(0)
    student = cut_student(teacher, KEPT)
    depth = teacher.config.num_hidden_layers
    distiller = Distiller.build(student, cfg.loss, layer_map("auto", depth, len(KEPT), kept=KEPT), teacher.config.hidden_size, depth)
    return make_engine(distiller, teacher, cfg, torch.device("cpu"), 1)


def _two_steps(engine, teacher):
    """Two optimizer steps on fixed batches: the loss terms of each, and the gradients of the last."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, teacher.config.vocab_size, (2, 40), generator=gen)
        loss, terms = engine.forward(ids, teacher_forward(teacher, ids, engine.distiller.spec.teacher_needs()))
        engine.backward(loss, True)
        grads = {n: p.grad.clone() for n, p in engine.distiller.named_parameters() if p.grad is not None}
        engine.step()
        out.append({k: float(v) for k, v in terms.items()})
    return out, grads


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_mlps_and_norms_train_as_the_eager_student(tiny_teacher, ckpt):
    eager, compiled = _engine(tiny_teacher, activation_checkpointing=ckpt), _engine(tiny_teacher, compile=True, activation_checkpointing=ckpt)
    layers = compiled.distiller.student.model.layers
    assert all(layer.mlp._compiled_call_impl is not None and layer.input_layernorm._compiled_call_impl is not None
               and layer.self_attn._compiled_call_impl is None and layer._compiled_call_impl is None for layer in layers)
    (terms0, grads0), (terms1, grads1) = _two_steps(eager, tiny_teacher), _two_steps(compiled, tiny_teacher)
    assert set(terms0[0]) == set(WEIGHTS) | {"loss"}  # every capture term is computed (the hooks fired)
    for step0, step1 in zip(terms0, terms1):
        for name in step0:
            assert step1[name] == pytest.approx(step0[name], rel=1e-4, abs=1e-6), name
    assert set(grads1) == set(grads0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-5, rtol=1e-3, msg=name)


def test_compile_is_refused_with_deepspeed():
    with pytest.raises(ConfigError, match=r"^train\.compile: not with scale\.strategy=deepspeed .*use ddp or fsdp2"):
        from_dict({"train": {"compile": True}, "scale": {"strategy": "deepspeed"}})
