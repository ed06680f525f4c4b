"""A frozen teacher's matmul weights stored in autocast's dtype (`raykd.capture.store_for_autocast`): under bf16
autocast the teacher gives the very same outputs (autocast would cast those weights on every call), the
engine stores them only in bf16 runs and hands the final evaluation a full-precision teacher. Tiny random
models, one process, no Ray."""
import torch

from raykd.capture import decoder_layers, store_for_autocast
from raykd.config import from_dict
from raykd.layer_map import layer_map
from raykd.models import cut_student, load_model
from raykd.objective import Distiller, teacher_forward
from raykd.parallel import make_engine
from raykd.spec import Needs

KEPT = [0, 3, 5]


def _linear_params(model) -> int:
    return sum(p.numel() for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())


def test_stored_teacher_gives_the_same_outputs_under_autocast(tiny_teacher_dir):
    ref = load_model(tiny_teacher_dir, frozen=True)
    stored = load_model(tiny_teacher_dir, frozen=True)
    assert store_for_autocast(stored, None) == 0 and all(p.dtype == torch.float32 for p in stored.parameters())
    assert store_for_autocast(stored, torch.bfloat16) == _linear_params(stored) > 0
    for name, p in stored.named_parameters():  # decoder matmuls only: embeddings, norms, the head keep fp32
        assert p.dtype == (torch.bfloat16 if "_proj." in name else torch.float32), name
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    needs = Needs(hidden=(1, 4), qkv=(2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = teacher_forward(ref, ids, needs), teacher_forward(stored, ids, needs)
        gen = [m.generate(ids[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0) for m in (ref, stored)]
    assert torch.equal(a.last_hidden, b.last_hidden)
    for layer in (1, 4):
        assert torch.equal(a.hidden[layer], b.hidden[layer])
    assert torch.equal(a.qkv[2].q, b.qkv[2].q) and torch.equal(a.qkv[2].k, b.qkv[2].k)
    assert torch.equal(gen[0], gen[1])
    assert store_for_autocast(stored, torch.bfloat16) == 0  # already stored: nothing more to convert


def _engine(teacher_dir, precision: str):
    teacher = load_model(teacher_dir, frozen=True)
    cfg = from_dict({"teacher": {"model": "tiny-random"}, "student": {"init": "list", "layers": KEPT},
                     "loss": {"weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5}}, "train": {"precision": precision}})
    depth = teacher.config.num_hidden_layers
    distiller = Distiller.build(cut_student(teacher, KEPT), cfg.loss, layer_map("auto", depth, len(KEPT), kept=KEPT),
                                teacher.config.hidden_size, depth)
    return make_engine(distiller, teacher, cfg, torch.device("cpu"), 1, precision=precision), teacher


def test_engine_stores_the_teacher_in_bf16_runs_and_evaluates_a_full_precision_one(tiny_teacher_dir):
    engine, teacher = _engine(tiny_teacher_dir, "bf16")
    assert engine.teacher_stored == _linear_params(teacher)
    assert teacher.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert engine.distiller.student.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # the student trains in fp32
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with engine.autocast():
        t_out = teacher_forward(teacher, ids, engine.distiller.spec.teacher_needs())
    loss, _ = engine.forward(ids, t_out)
    assert torch.isfinite(loss)
    loaded = []
    full = engine.eval_teacher(lambda: loaded.append(1) or load_model(tiny_teacher_dir, frozen=True))
    assert loaded == [1] and engine.teacher is None  # the stored one is let go before the reload
    assert all(p.dtype == torch.float32 for p in full.parameters())
    with torch.no_grad():  # the evaluation runs without autocast: fp32 weights, no dtype mismatch
        assert torch.isfinite(full(ids).logits).all()

    engine, teacher = _engine(tiny_teacher_dir, "fp32")
    assert engine.teacher_stored == 0 and all(p.dtype == torch.float32 for p in teacher.parameters())
    assert engine.eval_teacher(lambda: (_ for _ in ()).throw(AssertionError("fp32 runs keep their teacher"))) is teacher
