"""Sparse top-k teacher targets (raykd.losses.topk): exact at k = V, error shrinking with k, and the fused
LM-head path on cached targets equal to the plain sparse loss (values and gradients)."""

import pytest
import torch

from raykd.losses import LOGIT_LOSSES, SPARSE_UNSUPPORTED, fused_head_losses
from raykd.losses.topk import TopK, sparse_logit_loss, teacher_topk

SERVED = [n for n in LOGIT_LOSSES if n not in SPARSE_UNSUPPORTED]
PARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def _logits(n=64, v=300, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale, torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def test_topk_keeps_the_exact_tail_mass():
    t, _ = _logits()
    top = teacher_topk(t, 10)
    mass = top.logp.exp().sum(-1) + top.tail.exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-6)
    assert top.idx.dtype == torch.int32 and top.idx.shape == (64, 10)
    assert torch.equal(top.idx.long(), t.topk(10).indices)
    assert torch.isneginf(teacher_topk(t, 300).tail).all()
    with pytest.raises(ValueError, match="cache_topk"):
        teacher_topk(t, 301)


@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_dense_when_k_is_the_vocabulary(name, temperature):
    s, t = _logits()
    mask = torch.rand(64, generator=torch.Generator().manual_seed(1)) > 0.2
    dense = LOGIT_LOSSES[name](s, t, mask, temperature=temperature, **PARAMS.get(name, {}))
    sparse = sparse_logit_loss(name, s, teacher_topk(t, 300), mask, temperature=temperature, **PARAMS.get(name, {}))
    assert torch.allclose(sparse.double(), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SERVED)
def test_sparse_error_shrinks_as_k_grows(name):
    # LM-like distributions: Zipf-shaped teacher (p ~ rank^-1.5), a student close to it
    g = torch.Generator().manual_seed(0)
    n, v = 64, 2000
    zipf = -1.5 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))
    base = torch.stack([zipf[torch.randperm(v, generator=g)] for _ in range(n)])
    t = base + 0.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    s = base + 1.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    dense = float(LOGIT_LOSSES[name](s, t, None, **PARAMS.get(name, {})))
    errs = [abs(float(sparse_logit_loss(name, s, teacher_topk(t, k), None, **PARAMS.get(name, {}))) - dense) for k in (4, 32, 256, 1024)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05 * errs[0] and errs[-1] < 0.02 * abs(dense), errs
    if name == "forward_kl":  # pooling the tail is a lower bound of the full KL (log-sum inequality)
        assert float(sparse_logit_loss(name, s, teacher_topk(t, 32), None)) <= dense + 1e-9


def test_dkd_is_refused_with_sparse_targets():
    s, t = _logits()
    with pytest.raises(ValueError, match="dense teacher"):
        sparse_logit_loss("dkd", s, teacher_topk(t, 8))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_head_on_cached_targets_matches_the_plain_sparse_loss(temperature):
    g = torch.Generator().manual_seed(3)
    n, h, v, k = 40, 16, 120, 12
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    top = teacher_topk(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, k)
    top = TopK(top.idx, top.logp.half(), top.tail, v)  # as stored: fp16 log-probs
    total, terms = fused_head_losses(hidden, weight, top, None, targets, mask, kd="jsd", kd_params={"beta": 0.4},
                                     temperature=temperature, ce_weight=0.5, kd_weight=2.0, chunk_size=7)
    total.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    kd = sparse_logit_loss("jsd", logits, top, mask, temperature=temperature, beta=0.4)
    ce = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    ref = 0.5 * ce + 2.0 * kd
    ref.backward()
    assert torch.allclose(total, ref, rtol=1e-6) and torch.allclose(terms["kd"], kd.detach(), rtol=1e-6)
    assert torch.allclose(g_h, hidden.grad, rtol=1e-5, atol=1e-8) and torch.allclose(g_w, weight.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kd", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature,ce_weight,k", [(1.0, 0.5, 12), (2.0, 0.5, 12), (1.0, 0.0, 12), (1.5, 1.0, 120)])
def test_written_out_sparse_gradient_matches_autograd_on_the_bins(kd, temperature, ce_weight, k):
    # forward/reverse KL on cached targets skip autograd (raykd.losses.topk.closed_form_kd); the reference is
    # autograd through sparse_bins on full logits, with a token mask, CE row weights and k = V (empty tail)
    g = torch.Generator().manual_seed(5)
    n, h, v = 40, 16, 120
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    mask, ce_mask = torch.rand(n, generator=g) > 0.25, torch.rand(n, generator=g) > 0.3
    top = teacher_topk(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, k)
    top = TopK(top.idx, top.logp.half(), top.tail, v)
    total, terms = fused_head_losses(hidden, weight, top, None, targets, mask, kd=kd, temperature=temperature,
                                     ce_weight=ce_weight, kd_weight=2.0, chunk_size=7, ce_mask=ce_mask)
    total.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    kd_ref = sparse_logit_loss(kd, logits, top, mask, temperature=temperature)
    ref = 2.0 * kd_ref
    if ce_weight:
        ref = ref + ce_weight * torch.nn.functional.cross_entropy(logits[mask & ce_mask], targets[mask & ce_mask])
    ref.backward()
    assert torch.allclose(total, ref, rtol=1e-6) and torch.allclose(terms["kd"], kd_ref.detach(), rtol=1e-6)
    assert torch.allclose(g_h, hidden.grad, rtol=1e-5, atol=1e-8) and torch.allclose(g_w, weight.grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # evaluation (no gradient wanted) gives the same value
        again, _ = fused_head_losses(hidden, weight, top, None, targets, mask, kd=kd, temperature=temperature,
                                     ce_weight=ce_weight, kd_weight=2.0, chunk_size=7, ce_mask=ce_mask)
    assert torch.allclose(again, ref.detach(), rtol=1e-6)


def test_written_out_sparse_gradient_in_fp32_stays_close_to_fp64():
    # the cached-target path as training runs it (fp32 logits, fp16 stored log-probs, a confident student)
    g = torch.Generator().manual_seed(6)
    n, h, v = 64, 32, 4000
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    top = teacher_topk(torch.randn(n, v, generator=g, dtype=torch.float64) * 4, 64)
    top = TopK(top.idx, top.logp.half(), top.tail, v)
    out = {}
    for dt in (torch.float64, torch.float32):
        hd, wt = hidden.to(dt).clone().requires_grad_(True), weight.to(dt).clone().requires_grad_(True)
        total, _ = fused_head_losses(hd, wt, top, None, targets, None, kd="forward_kl", temperature=2.0, chunk_size=16)
        total.backward()
        out[dt] = (total.double(), hd.grad.double())
    assert torch.isfinite(out[torch.float32][1]).all()
    assert torch.allclose(out[torch.float32][0], out[torch.float64][0], rtol=1e-4)
    assert torch.allclose(out[torch.float32][1], out[torch.float64][1], rtol=1e-3, atol=1e-6)
