"""On-policy KD (raykd.onpolicy, loss.on_policy) on the tiny teacher: the on-policy batch keeps the
block's shape, its prompt is the corpus and its continuation the student's own (greedy at temperature 0),
sampling leaves no gradient and the student's mode as it was, the micro-batch choice is a function of
(seed, step, micro) only (same on every rank and on resume), CE skips the sampled tokens while the logit
loss on them equals a by-hand reference, the fused head's ce_mask against full logits; the bad-input
lines of the CLI; and one end-to-end `raykd distill` on local Ray (2 DDP workers) reporting gen_s."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raykd.config import LossConfig, LossWeights, OnPolicyConfig
from raykd.layer_map import layer_map
from raykd.losses import fused_head_losses
from raykd.models import cut_student, load_tokenizer
from raykd.objective import Distiller, teacher_forward
from raykd.onpolicy import OnPolicy, chosen, continue_blocks

KEPT = [0, 3, 5]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blocks(tiny_teacher_dir):
    """[4, 24] packed blocks of real text (pydoc prose) in the tiny teacher's vocabulary."""
    from pydoc_data.topics import topics

    tok = load_tokenizer(tiny_teacher_dir)
    ids = tok(" ".join(list(topics.values())[:20]))["input_ids"][: 4 * 24]
    return torch.tensor(ids).reshape(4, 24)


def student_of(teacher):
    torch.manual_seed(0)
    return cut_student(teacher, KEPT)


def on_policy(n=6, temperature=0.0, fraction=1.0, rank=0, seed=0):
    return OnPolicy(OnPolicyConfig(fraction=fraction, max_new_tokens=n, temperature=temperature), seed, rank)


def distiller(teacher, student, loss="reverse_kl", temperature=1.0, **weights):
    cfg = LossConfig(kd=loss, temperature=temperature, chunk_size=13, weights=LossWeights(**weights))
    return Distiller.build(student, cfg, layer_map("auto", 6, 3, kept=KEPT), teacher.config.hidden_size, 6)


def greedy_by_hand(model, prompts, n):
    """The student's greedy continuation, one full forward per token (no KV cache)."""
    seq = prompts
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.shape[1]:]


def test_on_policy_batch_keeps_the_shape_the_prompt_and_is_the_students_greedy_continuation(tiny_teacher, blocks):
    student, n = student_of(tiny_teacher), 6
    ids, mask, gen = on_policy(n).apply(student, blocks, step=3, micro=0)
    p = blocks.shape[1] - n
    assert ids.shape == blocks.shape and ids.dtype == torch.long
    assert torch.equal(ids[:, :p], blocks[:, :p])  # the prompt is the corpus
    assert torch.equal(ids[:, p:], greedy_by_hand(student, blocks[:, :p], n))  # the continuation is the student's own
    assert not torch.equal(ids[:, p:], blocks[:, p:])
    assert mask.dtype == torch.bool and mask[:, :p].all() and not mask[:, p:].any()
    assert set(gen) == {"gen_s"} and gen["gen_s"].dtype == torch.float64 and gen["gen_s"].dim() == 0 and float(gen["gen_s"]) > 0
    # the teacher's continuation would differ: the tokens are the student's, not the teacher's
    assert not torch.equal(ids[:, p:], greedy_by_hand(tiny_teacher, blocks[:, :p], n))


def test_sampling_has_no_gradient_runs_in_eval_mode_and_restores_train_mode(tiny_teacher, blocks):
    student = student_of(tiny_teacher).train()
    seen = []
    handle = student.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    try:
        with torch.enable_grad():
            ids = continue_blocks(student, blocks, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(seen) == 5 and all(mode == (False, False) for mode in seen)  # eval mode, no autograd, 1 forward per token (KV cache)
    assert student.training and not ids.requires_grad and ids.grad_fn is None
    assert all(p.grad is None for p in student.parameters())
    student.eval()
    continue_blocks(student, blocks, 2, temperature=0.0)
    assert not student.training  # the mode it had, not train()
    with pytest.raises(ValueError, match=r"max_new_tokens: must be in \[1, 23\]"):
        continue_blocks(student, blocks, 24, temperature=0.0)


def test_samples_repeat_per_step_micro_and_rank(tiny_teacher, blocks):
    student = student_of(tiny_teacher)
    a = on_policy(8, temperature=1.0).apply(student, blocks, 5, 1)[0]
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, on_policy(8, temperature=1.0).apply(student, blocks, 5, 1)[0])  # a resumed worker redraws them
    assert not torch.equal(a, on_policy(8, temperature=1.0, rank=1).apply(student, blocks, 5, 1)[0])
    assert not torch.equal(a, on_policy(8, temperature=1.0).apply(student, blocks, 6, 1)[0])


def test_the_choice_is_deterministic_rank_consistent_and_near_the_fraction():
    pairs = [(step, micro) for step in range(500) for micro in range(4)]
    picks = [chosen(7, s, m, 0.3) for s, m in pairs]
    assert abs(sum(picks) / len(picks) - 0.3) < 0.03
    assert picks == [chosen(7, s, m, 0.3) for s, m in pairs]  # again (a resume) the same
    assert picks != [chosen(8, s, m, 0.3) for s, m in pairs]  # the seed matters
    assert not any(chosen(7, s, m, 0.0) for s, m in pairs) and all(chosen(7, s, m, 1.0) for s, m in pairs)
    out = on_policy(fraction=0.0).apply(None, torch.zeros(1, 8, dtype=torch.long), 0, 0)
    assert out[1] is None and out[2] == {}  # an unchosen micro-batch passes through untouched, the student not called


def test_every_rank_samples_the_same_micro_batches(tiny_teacher, blocks):
    """The decision does not depend on the rank: all ranks sample (the same number of student forwards,
    the same FSDP gathers) or none, step after step."""
    student = student_of(tiny_teacher)
    ranks = [on_policy(n=1, fraction=0.5, rank=r, seed=3) for r in range(3)]
    seen = [[r.apply(student, blocks[:1, :4], s, m)[1] is not None for s in range(6) for m in range(2)] for r in ranks]
    assert seen[0] == seen[1] == seen[2] == [chosen(3, s, m, 0.5) for s in range(6) for m in range(2)]
    assert 0 < sum(seen[0]) < 12


@pytest.mark.parametrize("kd, temperature", [("reverse_kl", 1.0), ("jsd", 2.0)])
def test_ce_skips_the_sampled_tokens_and_the_logit_loss_on_them_matches_a_reference(tiny_teacher, blocks, kd, temperature):
    student, n = student_of(tiny_teacher), 6
    dist = distiller(tiny_teacher, student, loss=kd, temperature=temperature, ce=1.0, kd=1.0)
    ids, mask, _ = on_policy(n).apply(student, blocks, 0, 0)
    t_out = teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs())
    loss, terms = dist(ids, t_out, data_mask=mask)
    p = ids.shape[1] - n
    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1].double() / temperature
        t = tiny_teacher(input_ids=ids).logits[:, :-1].double() / temperature
    logq, logp = s.log_softmax(-1), t.log_softmax(-1)
    if kd == "reverse_kl":  # KL(q || p) per position, by hand
        per = (logq.exp() * (logq - logp)).sum(-1)
    else:  # JSD(0.5): 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
        logm = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        per = 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)
    per = per * temperature**2
    torch.testing.assert_close(terms["kd"].double(), per.mean(), rtol=1e-4, atol=1e-6)  # every position, the samples included
    assert per[:, p - 1:].mean() > 0  # positions predicting the student's tokens carry a loss
    ce_ref = F.cross_entropy(s[:, : p - 1].reshape(-1, s.shape[-1]) * temperature, ids[:, 1:p].reshape(-1))
    torch.testing.assert_close(terms["ce"].double(), ce_ref, rtol=1e-4, atol=1e-6)  # data positions only
    ce_all = F.cross_entropy(s.reshape(-1, s.shape[-1]) * temperature, ids[:, 1:].reshape(-1))
    assert abs(float(ce_all) - float(ce_ref)) > 1e-3
    loss.backward()


def test_ce_gradient_ignores_the_sampled_tokens(tiny_teacher, blocks):
    """CE alone on an on-policy batch: the same loss and gradient whatever the sampled tokens are (they
    are targets of no counted position, and causal attention hides them from the counted ones)."""
    n, grads, losses = 6, [], []
    for tail in (0, 1):
        student = student_of(tiny_teacher)
        dist = distiller(tiny_teacher, student, ce=1.0, kd=0.0)
        ids = blocks.clone()
        ids[:, -n:] = (ids[:, -n:] + 17 * tail) % student.config.vocab_size
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, -n:] = False
        loss, _ = dist(ids, None, data_mask=mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_every_term_runs_on_an_on_policy_batch(tiny_teacher, blocks):
    weights = dict(ce=1.0, kd=1.0, class_kd=0.3, hidden=0.5, attention=0.2, relation=0.2, blockwise=0.3)
    student = student_of(tiny_teacher)
    dist = distiller(tiny_teacher, student, loss="forward_kl", **weights)
    ids, mask, _ = on_policy(6, temperature=1.0).apply(student, blocks, 0, 0)
    loss, terms = dist(ids, teacher_forward(tiny_teacher, ids, dist.spec.teacher_needs()), data_mask=mask)
    assert set(terms) == {"loss", *weights} and all(torch.isfinite(v) for v in terms.values())
    torch.testing.assert_close(terms["loss"], sum(w * terms[k] for k, w in weights.items()), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("kd, temperature, masked", [("forward_kl", 1.0, False), ("reverse_kl", 2.0, True), ("jsd", 1.0, True)])
def test_fused_head_ce_mask_equals_full_logits(kd, temperature, masked):
    """ce_mask: CE is the mean over its rows (of mask), KD still over every row of mask; values and
    gradients against full float64 logits (closed-form losses and an autograd one)."""
    from raykd.losses import LOGIT_LOSSES

    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 8, 50
    sh = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    sw = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    th, tw = torch.randn(n, 10, dtype=torch.float64, generator=g), torch.randn(v, 10, dtype=torch.float64, generator=g)
    tgt = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2 if masked else None
    ce_mask = torch.arange(n) < 20
    total, terms = fused_head_losses(sh, sw, th, tw, tgt, mask, kd=kd, temperature=temperature, ce_weight=0.7,
                                     kd_weight=1.3, chunk_size=8, ce_mask=ce_mask)
    total.backward()
    got = (sh.grad.clone(), sw.grad.clone())
    sh.grad = sw.grad = None
    m = torch.ones(n, dtype=torch.bool) if mask is None else mask
    z, t = sh @ sw.t(), th @ tw.t()
    ce = F.cross_entropy(z[m & ce_mask], tgt[m & ce_mask])
    kd_ref = LOGIT_LOSSES[kd](z, t, m, temperature)
    (0.7 * ce + 1.3 * kd_ref).backward()
    torch.testing.assert_close(terms["ce"], ce.detach())
    torch.testing.assert_close(terms["kd"], kd_ref.detach())
    torch.testing.assert_close(got[0], sh.grad)
    torch.testing.assert_close(got[1], sw.grad)


def test_window_metrics_report_gen_s_per_window_per_worker(tiny_teacher):
    dist = Distiller.build(student_of(tiny_teacher), LossConfig(on_policy=OnPolicyConfig(fraction=0.5)),
                           layer_map("auto", 6, 3, kept=KEPT), 64, 6)
    assert dist.spec.report_terms == ("loss", "ce", "kd", "gen_s")
    # sums over 2 workers x 3 micro-steps: loss terms are means per micro-step, gen_s seconds per worker
    assert dist.spec.window_metrics([6.0, 3.0, 12.0, 5.0, 6.0], world=2) == {"loss": 1.0, "ce": 0.5, "kd": 2.0, "gen_s": 2.5}
    assert "gen_s" not in distiller(tiny_teacher, student_of(tiny_teacher), ce=1.0, kd=1.0).spec.report_terms


def test_plan_names_the_on_policy_share(capsys, tiny_teacher_dir):
    from raykd.cli import main

    assert main(["plan", "jobs/smoke.yaml", "loss.on_policy.fraction=0.5", "loss.on_policy.max_new_tokens=16"]) == 0
    assert "on-policy  0.5 of micro-batches: the student samples the last 16 of 64 tokens (T=1)" in capsys.readouterr().out
    assert main(["plan", "jobs/smoke.yaml"]) == 0
    assert "on-policy" not in capsys.readouterr().out


@pytest.mark.parametrize("overrides, start", [
    (["teacher.cache=/tmp/nocache", "loss.weights.attention=0", "loss.weights.relation=0", "loss.weights.blockwise=0"],
     "loss.on_policy: the teacher must score the student's own samples"),
    (["loss.on_policy.fraction=1.5"], "loss.on_policy.fraction: must be in [0, 1], got 1.5"),
    (["loss.on_policy.fraction=-0.1"], "loss.on_policy.fraction: must be in [0, 1], got -0.1"),
    (["loss.on_policy.max_new_tokens=0"], "loss.on_policy.max_new_tokens: must be an integer >= 1, got 0"),
    (["loss.on_policy.max_new_tokens=64"], "loss.on_policy.max_new_tokens: must be below data.block_size=64"),
    (["loss.on_policy.temperature=-1"], "loss.on_policy.temperature: must be >= 0, got -1.0"),
])
def test_bad_on_policy_input_exits_2_with_one_line(overrides, start, tmp_path):
    extra = [] if "fraction" in overrides[0] else ["loss.on_policy.fraction=0.5"]
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", "distill", "jobs/smoke.yaml", f"output_dir={tmp_path / 'out'}",
                           *extra, *overrides], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"raykd: error: {start}"), lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.ray
def test_distill_on_policy_two_ddp_workers_reports_gen_s(tmp_path):
    """`raykd distill` of the smoke job with half the micro-batches on-policy, 2 DDP workers, 2 micro-batches
    per step: the run finishes its steps, the progress lines and metrics.json's history carry gen_s, which
    is > 0 exactly in the report windows that held a chosen micro-batch."""
    out, steps = tmp_path / "out", 6
    cmd = [sys.executable, "-m", "raykd.cli", "distill", "jobs/smoke.yaml", f"output_dir={out}", f"train.max_steps={steps}",
           "train.report_every=2", "train.grad_accum=2", "loss.on_policy.fraction=0.5", "loss.on_policy.max_new_tokens=16",
           "loss.kd=reverse_kl", "eval.tasks=[]", "train.generation_eval=false"]
    env = {**__import__("os").environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["num_workers"] == 2
    assert metrics["tokens_seen"] == steps * 2 * 4 * 64 * 2
    history = metrics["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    for h in history:  # decisions are (seed, step, micro) hashes: which windows sampled is known in advance
        sampled = any(chosen(0, s, m, 0.5) for s in range(h["step"] - 2, h["step"]) for m in range(2))
        assert (h["gen_s"] > 0) == sampled, (h, sampled)
    assert any(h["gen_s"] > 0 for h in history)
    progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "raykd: step " in line]
    assert {line.split("raykd: step ")[1].split()[0] for line in progress} == {"2/6", "4/6", "6/6"}, progress
    assert all(" gen_s " in line for line in progress), progress
