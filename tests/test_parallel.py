"""The three parallel strategies train the same student: 2 gloo processes, each on half of
every batch, end with the weights of one process that saw the whole batch (no Ray here)."""

import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # 2 gloo processes for all the cases: about 1 minute on 2 cores
HANG_S = 600  # a rank still running after this long prints every thread's stack and exits: a hang fails, named

CFG = {
    "teacher": {"model": "tiny-random"},
    "student": {"num_layers": 3, "init": "list", "layers": [0, 2, 5]},
    "loss": {"hidden": "cosine", "weights": {"ce": 1.0, "kd": 1.0, "hidden": 0.5, "attention": 0.1, "relation": 0.1, "blockwise": 0.1}},
    "data": {"train": ["pydoc"], "block_size": 32},
    "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.5},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [  # (strategy, grad_accum, shard_teacher, activation checkpointing)
    ("ddp", 1, False, False), ("ddp", 2, False, False), ("fsdp2", 1, False, False), ("fsdp2", 2, False, False),
    ("fsdp2", 1, True, False), ("deepspeed", 1, False, False),
    # train.activation_checkpointing: the student's layers recomputed in backward, inside the strategy's wrapping
    ("ddp", 2, False, True), ("fsdp2", 1, False, True), ("deepspeed", 1, False, True),
]


def _train(rank, world, teacher_dir, strategy, grad_accum, shard_teacher, ckpt) -> dict:
    """One case in this process group: a fresh teacher, student and engine, three steps on fixed data."""
    from raykd.config import from_dict
    from raykd.layer_map import layer_map
    from raykd.models import cut_student, load_model
    from raykd.objective import Distiller, teacher_forward
    from raykd.parallel import make_engine

    cfg = from_dict({**CFG, "scale": {"strategy": strategy, "zero_stage": 3, "num_workers": world, "shard_teacher": shard_teacher},
                     "train": {**CFG["train"], "grad_accum": grad_accum, "batch_size": 4 // world // grad_accum, "activation_checkpointing": ckpt}})
    torch.manual_seed(0)
    teacher = load_model(teacher_dir, frozen=True)
    student = cut_student(teacher, cfg.student.layers)
    pairs = layer_map("kept", 6, 3, cfg.student.layers)
    distiller = Distiller.build(student, cfg.loss, pairs, teacher.config.hidden_size, 6)
    needs = distiller.spec.teacher_needs()
    init = {k: v.detach().clone() for k, v in student.state_dict().items()}
    q_calls = []  # forwards of a student layer's q projection: twice per micro-step when recomputed in backward
    student.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *_: q_calls.append(1))
    engine = make_engine(distiller, teacher, cfg, torch.device("cpu"), world)
    data = torch.randint(0, 1024, (cfg.train.max_steps, 4, 32), generator=torch.Generator().manual_seed(1))
    per = 4 // world
    losses = []
    for step in range(cfg.train.max_steps):
        mine = data[step, rank * per:(rank + 1) * per]
        for micro, ids in enumerate(mine.split(per // grad_accum)):
            loss, terms = engine.forward(ids, teacher_forward(teacher, ids, needs))
            engine.backward(loss, micro == grad_accum - 1)
            engine.micro_step()
            losses.append(float(terms["loss"]))
        engine.step()
    return {"state": engine.student_state(rank), "init": init, "losses": losses, "q_calls": len(q_calls) / len(losses)}


def _worker(rank, world, port, teacher_dir, out, cases):
    """Every case in turn in one gloo group (one process start and import per rank, not one per case).
    The rank leaves by os._exit, as Ray ends its workers: the interpreter's teardown of gloo and DeepSpeed state
    aborted a rank now and then ('terminate called without an active exception', no Python frame left), after
    its results were written."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = [_train(rank, world, teacher_dir, *case) for case in cases]
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(world, cases, tiny_teacher_dir, out) -> list[dict]:
    """Run the ranks to their end; any rank still alive when this returns or raises is killed, so that a hung rank
    cannot keep pytest from exiting (multiprocessing joins its children at exit: CI once hung on that for an hour)."""
    ctx = mp.start_processes(_worker, args=(world, _port(), str(tiny_teacher_dir), str(out), cases), nprocs=world,
                             start_method="spawn", join=False)
    try:
        while not ctx.join():
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, tmp_path_factory):
    return _run(1, [("ddp", 1, False, False)], tiny_teacher_dir, tmp_path_factory.mktemp("ref") / "ref.pt")[0]


@pytest.fixture(scope="module")
def two_workers(tiny_teacher_dir, tmp_path_factory):
    """Each case's result from one run of two gloo processes."""
    return dict(zip(CASES, _run(2, CASES, tiny_teacher_dir, tmp_path_factory.mktemp("two") / "two.pt")))


@pytest.mark.parametrize("strategy,grad_accum,shard_teacher,ckpt", CASES)
def test_two_workers_match_one(strategy, grad_accum, shard_teacher, ckpt, reference, two_workers):
    got = two_workers[(strategy, grad_accum, shard_teacher, ckpt)]
    assert got["q_calls"] == (2 if ckpt else 1)
    ref = reference["state"]
    assert set(got["state"]) == set(ref)
    moved = max((ref[k] - reference["init"][k]).abs().max().item() for k in ref)
    assert moved > 5e-4  # three AdamW steps at lr 1e-3 moved the weights...
    for k in ref:  # ...and the sharded runs moved them the same way (Adam amplifies float noise on ~0 grads)
        torch.testing.assert_close(got["state"][k], ref[k], rtol=1e-3, atol=1e-4, msg=f"{strategy}: {k}")
