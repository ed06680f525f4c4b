"""Tests for raykd.losses: float64 references written from the formulas, masks, dtypes, fused head."""
from __future__ import annotations

import inspect
import math
import weakref
import zlib

import pytest
import torch
import torch.nn.functional as F

from raykd import fused as fused_mod
from raykd import losses as L

NAMES = list(L.TOKEN_LOSSES)

# (name, params) cases covering every loss and several parameter values
CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
    ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}), ("jsd", {}),
    ("skew_forward_kl", {"alpha": 0.0}), ("skew_forward_kl", {"alpha": 0.1}), ("skew_forward_kl", {"alpha": 0.7}),
    ("skew_reverse_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.3}), ("skew_reverse_kl", {}),
    ("dkd", {}), ("dkd", {"alpha": 0.5, "beta": 2.0}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for n, p in CASES]


# ----------------------------------------------------------------------------- references (float64)
def _softmax(x, T):
    e = torch.exp(x / T)
    return e / e.sum(-1, keepdim=True)


def _kl(a, b):  # a, b: 1-D probability vectors
    return sum(a[j] * torch.log(a[j] / b[j]) for j in range(a.shape[0]))


def ref_token(name, s_row, t_row, T, target=None, **kw):
    q, p = _softmax(s_row, T), _softmax(t_row, T)
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        b = kw.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skew_forward_kl":
        a = kw.get("alpha", 0.1)
        return _kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return _kl(q, a * q + (1 - a) * p)
    if name == "tvd":
        return 0.5 * sum(torch.abs(p[j] - q[j]) for j in range(p.shape[0]))
    if name == "dkd":
        a, b = kw.get("alpha", 1.0), kw.get("beta", 8.0)
        bp = torch.stack([p[target], 1 - p[target]])
        bq = torch.stack([q[target], 1 - q[target]])
        keep = [j for j in range(p.shape[0]) if j != target]
        return a * _kl(bp, bq) + b * _kl(p[keep] / (1 - p[target]), q[keep] / (1 - q[target]))
    raise KeyError(name)


def ref_loss(name, s, t, mask, T, targets=None, **kw):
    rows = [i for i in range(s.shape[0]) if mask[i]]
    total = sum(ref_token(name, s[i], t[i], T, None if targets is None else int(targets[i]), **kw) for i in rows)
    return total / len(rows) * T * T


def _data(n=9, v=11, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=dtype) * scale
    t = torch.randn(n, v, generator=g, dtype=dtype) * scale
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    mask[0], mask[-1] = True, False
    return s, t, y, mask


def _call(name, s, t, mask, T, y, params):
    extra = {"targets": y} if name in L.NEEDS_TARGETS else {}
    return L.LOGIT_LOSSES[name](s, t, mask, T, **params, **extra)


# ----------------------------------------------------------------------------- registry
def test_registries_consistent():
    assert set(L.TOKEN_LOSSES) == set(L.LOGIT_LOSSES) == set(L.LOSS_PARAMS)
    for name, fn in L.TOKEN_LOSSES.items():
        sig = inspect.signature(fn).parameters
        for p, default in L.LOSS_PARAMS[name].items():
            assert sig[p].default == default, (name, p)
        assert ("targets" in sig) == (name in L.NEEDS_TARGETS)
    assert set(L.HIDDEN_LOSSES) == {"mse", "cosine", "nmse"}


# ----------------------------------------------------------------------------- values and grads
@pytest.mark.parametrize("T", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_logit_loss_matches_reference(name, params, T):
    s, t, y, mask = _data(seed=zlib.crc32(f"{name}{params}{T}".encode()) % 1000)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = _call(name, s1, t1, mask, T, y, params)
    want = ref_loss(name, s2, t2, mask, T, y if name in L.NEEDS_TARGETS else None, **params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_fp32_matches_fp64_reference(name, params):
    s, t, y, mask = _data(seed=3)
    s32 = s.float().requires_grad_()
    s64 = s.clone().requires_grad_()
    got = _call(name, s32, t.float(), mask, 1.5, y, params)
    want = ref_loss(name, s64, t, mask, 1.5, y if name in L.NEEDS_TARGETS else None, **params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_token_losses_shape_and_temperature_scaling(name, params):
    s, t, y, mask = _data(seed=5)
    extra = {"targets": y} if name in L.NEEDS_TARGETS else {}
    for T in (0.5, 2.0, 4.0):
        per = L.TOKEN_LOSSES[name](s, t, T, **params, **extra)
        assert per.shape == (s.shape[0],)
        want = per[mask].mean() * T * T
        torch.testing.assert_close(L.LOGIT_LOSSES[name](s, t, mask, T, **params, **extra), want)
    # no mask = every token
    per = L.TOKEN_LOSSES[name](s, t, 2.0, **params, **extra)
    torch.testing.assert_close(L.LOGIT_LOSSES[name](s, t, None, 2.0, **params, **extra), per.mean() * 4)


def test_fp16_bf16_token_losses_return_fp32():
    s, t, y, _ = _data(seed=6, dtype=torch.float32)
    for dt in (torch.bfloat16, torch.float16):
        for name in NAMES:
            extra = {"targets": y} if name in L.NEEDS_TARGETS else {}
            assert L.TOKEN_LOSSES[name](s.to(dt), t.to(dt), **extra).dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_leading_dims_are_flattened(name):
    s, t, y, mask = _data(n=12, seed=7)
    extra = {"targets": y} if name in L.NEEDS_TARGETS else {}
    flat = L.LOGIT_LOSSES[name](s, t, mask, 1.3, **extra)
    extra3 = {"targets": y.view(3, 4)} if name in L.NEEDS_TARGETS else {}
    shaped = L.LOGIT_LOSSES[name](s.view(3, 4, -1), t.view(3, 4, -1), mask.view(3, 4), 1.3, **extra3)
    torch.testing.assert_close(flat, shaped)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", NAMES)
def test_masked_tokens_zero_grad_even_with_garbage(name):
    s, t, y, mask = _data(seed=8)
    s = s.clone()
    s[~mask] = float("nan")
    t = t.clone()
    t[~mask] = float("inf")
    y = y.clone()
    y[~mask] = -100  # ignore-index style labels on padding
    s.requires_grad_()
    loss = _call(name, s, t, mask, 2.0, y, {})
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(s.grad[~mask] == 0)
    assert torch.isfinite(s.grad).all() and s.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_all_false_mask_gives_zero(name):
    s, t, y, _ = _data(seed=9)
    s.requires_grad_()
    loss = _call(name, s, t, torch.zeros(s.shape[0], dtype=torch.bool), 2.0, y, {})
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(s.grad == 0)


def test_cross_entropy_masked():
    s, _, y, mask = _data(seed=10)
    x = s.clone().requires_grad_()
    y2 = y.clone()
    y2[~mask] = -100
    got = L.cross_entropy(x, y2, mask)
    want = torch.stack([-torch.log(_softmax(s[i], 1.0)[y[i]]) for i in range(len(y)) if mask[i]]).mean()
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.all(x.grad[~mask] == 0)
    empty = L.cross_entropy(x, y, torch.zeros_like(mask))
    assert empty.item() == 0.0 and not torch.isnan(empty)
    assert L.cross_entropy(s.bfloat16(), y, mask).dtype == torch.float32


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_of_identical_is_zero(name, params):
    s, _, y, mask = _data(seed=11)
    val = _call(name, s, s.clone(), mask, 1.7, y, params)
    assert abs(val.item()) < 1e-12


def test_jsd_symmetric_and_degenerate_beta():
    s, t, y, mask = _data(seed=12)
    torch.testing.assert_close(L.jsd(s, t, mask, 1.0), L.jsd(t, s, mask, 1.0))
    for beta in (0.0, 1.0):
        x = s.clone().requires_grad_()
        val = L.jsd(x, t, mask, 1.0, beta=beta)
        val.backward()
        assert val.item() == 0.0 and torch.isfinite(x.grad).all()
    # skew KL at alpha=0 is plain (reverse) KL
    torch.testing.assert_close(L.skew_forward_kl(s, t, mask, alpha=0.0), L.forward_kl(s, t, mask))
    torch.testing.assert_close(L.skew_reverse_kl(s, t, mask, alpha=0.0), L.reverse_kl(s, t, mask))


def test_tvd_in_unit_interval():
    for scale in (0.1, 3.0, 100.0):
        s, t, _, _ = _data(n=50, v=30, seed=13, scale=scale)
        per = L.TOKEN_LOSSES["tvd"](s, t)
        assert (per >= 0).all() and (per <= 1 + 1e-12).all()
    s, _, _, _ = _data(seed=13)
    onehot = torch.full_like(s, -1e4)
    onehot[:, 0] = 1e4
    other = torch.full_like(s, -1e4)
    other[:, 1] = 1e4
    torch.testing.assert_close(L.TOKEN_LOSSES["tvd"](onehot, other), torch.ones(s.shape[0], dtype=s.dtype))


# ----------------------------------------------------------------------------- dtypes and extremes
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_bf16_close_to_fp32(name, params):
    s, t, y, mask = _data(n=16, v=64, seed=14, dtype=torch.float32)
    sb, tb = s.bfloat16().requires_grad_(), t.bfloat16()
    got = _call(name, sb, tb, mask, 2.0, y, params)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # same rounded inputs in fp32: the internal math is fp32, so this is tight
    torch.testing.assert_close(got, _call(name, sb.float(), tb.float(), mask, 2.0, y, params), rtol=1e-5, atol=1e-6)
    # against the unrounded fp32 logits: loose
    torch.testing.assert_close(got, _call(name, s, t, mask, 2.0, y, params), rtol=5e-2, atol=2e-2)
    got.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_finite(name, dtype):
    g = torch.Generator().manual_seed(15)
    s = (torch.randint(0, 2, (8, 32), generator=g) * 2 - 1).float() * 1e4
    t = (torch.randint(0, 2, (8, 32), generator=g) * 2 - 1).float() * 1e4
    t[:, :2] = -1e4  # keep some teacher mass off the targets below
    y = torch.zeros(8, dtype=torch.long)
    for T in (1.0, 4.0):
        x = s.to(dtype).requires_grad_()
        val = _call(name, x, t.to(dtype), None, T, y, {})
        val.backward()
        assert torch.isfinite(val) and torch.isfinite(x.grad.float()).all(), (name, dtype, T)


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_vocab_padding_equals_dropping_column(name):
    """-inf logits in both models (padded vocab) behave like the column does not exist."""
    s, t, y, mask = _data(n=10, v=12, seed=16)
    y = y.clamp_max(9)
    sp, tp = s.clone(), t.clone()
    sp[:, 10:], tp[:, 10:] = -math.inf, -math.inf
    x = sp.clone().requires_grad_()
    got = _call(name, x, tp, mask, 1.5, y, {})
    got.backward()
    want = _call(name, s[:, :10], t[:, :10], mask, 1.5, y, {})
    torch.testing.assert_close(got, want)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 10:] == 0)


# ----------------------------------------------------------------------------- check_logit_loss
def test_check_logit_loss_messages():
    for name, defaults in L.LOSS_PARAMS.items():
        L.check_logit_loss(name, dict(defaults))
        L.check_logit_loss(name, None)
    with pytest.raises(ValueError) as e:
        L.check_logit_loss("forwrd_kl", {})
    msg = str(e.value)
    assert msg.startswith("loss.kd: unknown logit loss 'forwrd_kl'; did you mean 'forward_kl'? choose one of:")
    assert "skew_reverse_kl" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"^loss\.kd: unknown logit loss 'zzz'; choose one of: forward_kl"):
        L.check_logit_loss("zzz", {})
    with pytest.raises(ValueError) as e:
        L.check_logit_loss("jsd", {"gamma": 1.0})
    assert str(e.value) == "loss.kd_params.gamma: 'jsd' takes no parameter 'gamma'; it takes: beta"
    with pytest.raises(ValueError, match=r"^loss\.kd_params\.alpha: 'forward_kl' takes no parameter 'alpha'; "
                                         r"it takes: no parameters$"):
        L.check_logit_loss("forward_kl", {"alpha": 0.1})
    with pytest.raises(ValueError, match=r"did you mean 'beta'\?"):
        L.check_logit_loss("dkd", {"betta": 1.0})
    with pytest.raises(ValueError, match=r"targets come from the batch labels"):
        L.check_logit_loss("dkd", {"targets": 1})
    bad = [("jsd", "beta", 1.5, r"\[0, 1\]"), ("jsd", "beta", -0.1, r"\[0, 1\]"),
           ("skew_forward_kl", "alpha", 1.0, r"\[0, 1\)"), ("skew_reverse_kl", "alpha", -0.5, r"\[0, 1\)"),
           ("dkd", "alpha", -1.0, ">= 0"), ("dkd", "beta", -8, ">= 0"),
           ("jsd", "beta", "0.5", "must be a number"), ("dkd", "alpha", True, "must be a number"),
           ("jsd", "beta", float("nan"), "must be a number")]
    for name, key, value, pattern in bad:
        with pytest.raises(ValueError, match=rf"^loss\.kd_params\.{key}: .*{pattern}") as e:
            L.check_logit_loss(name, {key: value})
        assert "\n" not in str(e.value)
    L.check_logit_loss("jsd", {"beta": 0})
    L.check_logit_loss("jsd", {"beta": 1})
    L.check_logit_loss("skew_forward_kl", {"alpha": 0})
    L.check_logit_loss("dkd", {"alpha": 0, "beta": 0})


def test_suggest():
    assert L.suggest("cosin", ["mse", "cosine"]) == "did you mean 'cosine'?"
    assert L.suggest("qqqq", ["mse", "cosine"]) == ""


# ----------------------------------------------------------------------------- fused head
def _head(n=37, hs=16, ht=24, v=50, dtype=torch.float64, seed=20, bias=False):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g, dtype=dtype)
    sw = torch.randn(v, hs, generator=g, dtype=dtype) * 0.5
    th = torch.randn(n, ht, generator=g, dtype=dtype)
    tw = torch.randn(v, ht, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    sb = torch.randn(v, generator=g, dtype=dtype) if bias else None
    tb = torch.randn(v, generator=g, dtype=dtype) if bias else None
    return sh, sw, th, tw, y, mask, sb, tb


def _naive(sh, sw, th, tw, y, mask, *, kd, T, params, ce_w, kd_w, sb=None, tb=None):
    logits = F.linear(sh, sw, sb)
    total = 0.0
    if ce_w:
        total = total + ce_w * L.cross_entropy(logits, y, mask)
    if th is not None and kd_w:
        extra = {"targets": y} if kd in L.NEEDS_TARGETS else {}
        total = total + kd_w * L.LOGIT_LOSSES[kd](logits, F.linear(th, tw, tb), mask, T, **params, **extra)
    return total


def _leaves(*xs):
    return [None if x is None else x.clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("chunk", [1, 10, 37, 1000])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_fused_matches_naive(name, params, chunk):
    sh, sw, th, tw, y, mask, sb, tb = _head(bias=chunk == 10)
    kw = dict(kd=name, T=2.0, params=params, ce_w=0.7, kd_w=1.3)
    a = _leaves(sh, sw, sb)
    b = _leaves(sh, sw, sb)
    want = _naive(a[0], a[1], th, tw, y, mask, sb=a[2], tb=tb, **kw)
    got, terms = L.fused_head_losses(b[0], b[1], th, tw, y, mask, kd=name, temperature=2.0, kd_params=params,
                                     ce_weight=0.7, kd_weight=1.3, chunk_size=chunk, student_bias=b[2],
                                     teacher_bias=tb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(0.7 * terms["ce"] + 1.3 * terms["kd"], got.detach())
    assert not terms["ce"].requires_grad and not terms["kd"].requires_grad
    want.backward()
    (got * 0.5).backward()  # grad_output != 1 is applied
    for xa, xb in zip(a, b):
        if xa is not None:
            torch.testing.assert_close(xb.grad, 0.5 * xa.grad, rtol=1e-9, atol=1e-11)


def test_fused_term_switches_and_eval():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=21)
    ce_only = L.cross_entropy(sh @ sw.T, y, mask)
    kd_only = L.reverse_kl(sh @ sw.T, th @ tw.T, mask, 1.5)
    for t_h, kd_w in ((None, 1.0), (th, 0.0)):
        total, terms = L.fused_head_losses(sh, sw, t_h, tw if t_h is not None else None, y, mask, kd_weight=kd_w,
                                           chunk_size=8)
        assert set(terms) == {"ce"}
        torch.testing.assert_close(total, ce_only)
    x = sh.clone().requires_grad_()
    total, terms = L.fused_head_losses(x, sw, th, tw, y, mask, kd="reverse_kl", temperature=1.5, ce_weight=0.0,
                                       chunk_size=7)
    assert set(terms) == {"kd"}
    torch.testing.assert_close(total, kd_only)
    total.backward()
    x2 = sh.clone().requires_grad_()
    L.reverse_kl(x2 @ sw.T, th @ tw.T, mask, 1.5).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    # eval (no grad anywhere) gives the same numbers
    with torch.no_grad():
        total2, _ = L.fused_head_losses(sh, sw, th, tw, y, mask, kd="reverse_kl", temperature=1.5, ce_weight=0.0)
    torch.testing.assert_close(total2, kd_only)
    # both weights zero: a zero that still backpropagates
    x = sh.clone().requires_grad_()
    total, terms = L.fused_head_losses(x, sw, th, tw, y, mask, ce_weight=0.0, kd_weight=0.0)
    assert terms == {} and total.item() == 0.0
    total.backward()
    assert torch.all(x.grad == 0)


def test_fused_masks_and_frozen_weight():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=22)
    sh = sh.clone()
    sh[~mask] = float("nan")
    y = y.clone()
    y[~mask] = -100
    x = sh.clone().requires_grad_()
    w = sw.clone()  # frozen head: no grad wanted
    total, _ = L.fused_head_losses(x, w, th, tw, y, mask, kd="dkd", chunk_size=5)
    total.backward()
    assert torch.isfinite(total) and torch.all(x.grad[~mask] == 0) and torch.isfinite(x.grad).all()
    assert w.grad is None
    x = sh.clone().requires_grad_()
    w = sw.clone().requires_grad_()
    total, terms = L.fused_head_losses(x, w, th, tw, y, torch.zeros_like(mask), chunk_size=5)
    total.backward()
    assert total.item() == 0.0 and terms["ce"].item() == 0.0 and terms["kd"].item() == 0.0
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_fused_tied_embedding_gets_both_grads():
    g = torch.Generator().manual_seed(23)
    v, hs, n = 40, 12, 29
    ids = torch.randint(0, v, (n,), generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    th, tw = torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randn(v, 20, generator=g, dtype=torch.float64)
    emb0 = torch.randn(v, hs, generator=g, dtype=torch.float64)
    mix = torch.randn(hs, hs, generator=g, dtype=torch.float64)

    def run(fused):
        emb = torch.nn.Parameter(emb0.clone())
        h = torch.tanh(F.embedding(ids, emb) @ mix)
        if fused:
            loss, _ = L.fused_head_losses(h, emb, th, tw, y, mask, kd="jsd", chunk_size=6)
        else:
            loss = _naive(h, emb, th, tw, y, mask, kd="jsd", T=1.0, params={}, ce_w=1.0, kd_w=1.0)
        loss.backward()
        return loss, emb.grad

    (lf, gf), (ln, gn) = run(True), run(False)
    torch.testing.assert_close(lf, ln)
    torch.testing.assert_close(gf, gn)
    # the grad really has both parts: the embedding-only rows differ from the head-only grad
    h = torch.tanh(F.embedding(ids, emb0) @ mix).detach()
    w = emb0.clone().requires_grad_()
    _naive(h, w, th, tw, y, mask, kd="jsd", T=1.0, params={}, ce_w=1.0, kd_w=1.0).backward()
    assert not torch.allclose(gf, w.grad)


def test_fused_bf16_and_leading_dims():
    sh, sw, th, tw, y, mask, _, _ = _head(n=24, seed=24, dtype=torch.float32)
    ref, _ = L.fused_head_losses(sh, sw, th, tw, y, mask, kd="forward_kl", temperature=2.0)
    x = sh.bfloat16().view(4, 6, -1).requires_grad_()
    w = sw.bfloat16().requires_grad_()
    total, terms = L.fused_head_losses(x, w, th.bfloat16().view(4, 6, -1), tw.bfloat16(), y.view(4, 6),
                                       mask.view(4, 6), kd="forward_kl", temperature=2.0, chunk_size=5)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref, rtol=3e-2, atol=3e-2)
    total.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    # same bf16 inputs through the naive path: grads agree to bf16 precision
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    naive = _naive(x2.view(24, -1), w2, th.bfloat16(), tw.bfloat16(), y, mask, kd="forward_kl", T=2.0, params={},
                   ce_w=1.0, kd_w=1.0)
    naive.backward()
    torch.testing.assert_close(total, naive, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), rtol=2e-2, atol=2e-3)


def test_fused_validates_inputs():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=25)
    with pytest.raises(ValueError, match="did you mean 'jsd'"):
        L.fused_head_losses(sh, sw, th, tw, y, mask, kd="jsdd")
    with pytest.raises(ValueError, match="loss.kd_params.beta"):
        L.fused_head_losses(sh, sw, th, tw, y, mask, kd="jsd", kd_params={"beta": 2.0})
    with pytest.raises(ValueError, match="shared vocabulary"):
        L.fused_head_losses(sh, sw, th, tw[:-1], y, mask)


def test_fused_keeps_no_n_by_v_tensors():
    n, v, h, chunk = 4096, 8192, 32, 256
    g = torch.Generator().manual_seed(26)
    sh = torch.randn(n, h, generator=g, requires_grad=True)
    sw = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    th, tw = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    mask[::7] = False
    saved, alive = [], []

    def pack(x):
        saved.append(x.numel())
        alive.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        total, _ = L.fused_head_losses(sh, sw, th, tw, y, mask, kd="jsd", chunk_size=chunk)
    # per-chunk graphs save [chunk, V] tensors at most ...
    assert saved and max(saved) <= chunk * v, max(saved)
    # ... and once the forward returns none of them survives (the [N, H] / [V, H] gradient buffers are held
    # by the autograd node, not saved through these hooks)
    survivors = [r().numel() for r in alive if r() is not None]
    assert all(x <= max(n, v) * h for x in survivors), survivors
    total.backward()
    assert sh.grad.shape == sh.shape and sw.grad.shape == sw.shape
    # control: the naive path does keep [N, V] tensors, so the hook would catch a regression
    saved.clear()
    alive.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _naive(sh[:1024], sw, th[:1024], tw, y[:1024], None, kd="jsd", T=1.0, params={}, ce_w=1.0, kd_w=1.0)
    assert max(saved) >= 1024 * v


def test_fused_never_materialises_n_by_v():
    """Stronger than the saved-tensor check: watch every op the forward runs (private torch API)."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    n, v, h, chunk = 1024, 4096, 16, 128
    g = torch.Generator().manual_seed(27)
    sh = torch.randn(n, h, generator=g, requires_grad=True)
    sw = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    largest = [0]

    class Watch(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    largest[0] = max(largest[0], o.numel())
            return out

    with Watch():
        total, _ = L.fused_head_losses(sh, sw, th, tw, y, None, kd="skew_reverse_kl", chunk_size=chunk)
    assert largest[0] <= chunk * v, largest[0]  # nothing bigger than one chunk of logits
    assert torch.isfinite(total)
    largest[0] = 0
    with Watch():  # control: the naive path does materialise [N, V]
        _naive(sh, sw, th, tw, y, None, kd="skew_reverse_kl", T=1.0, params={}, ce_w=1.0, kd_w=1.0)
    assert largest[0] >= n * v


# ----------------------------------------------------------------------------- hidden losses
def test_hidden_losses_match_reference():
    g = torch.Generator().manual_seed(30)
    s = torch.randn(11, 7, generator=g, dtype=torch.float64)
    t = torch.randn(11, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(11, generator=g) > 0.3
    rows = [i for i in range(11) if mask[i]]
    ref = {
        "mse": sum(sum((s[i, j] - t[i, j]) ** 2 for j in range(7)) / 7 for i in rows) / len(rows),
        "cosine": sum(1 - (s[i] @ t[i]) / (s[i].norm() * t[i].norm()) for i in rows) / len(rows),
        "nmse": sum(sum((s[i, j] - t[i, j]) ** 2 for j in range(7)) / (t[i] @ t[i]) for i in rows) / len(rows),
    }
    for name, fn in L.HIDDEN_LOSSES.items():
        x = s.clone()
        x[~mask] = float("nan")
        x.requires_grad_()
        val = fn(x, t, mask)
        torch.testing.assert_close(val, ref[name], rtol=1e-7, atol=1e-9)
        val.backward()
        assert torch.all(x.grad[~mask] == 0) and torch.isfinite(x.grad).all()
        assert fn(s, s.clone(), mask).abs().item() < 1e-7
        empty = fn(s.requires_grad_(False), t, torch.zeros_like(mask))
        assert empty.item() == 0.0
        assert fn(s.bfloat16(), t.bfloat16()).dtype == torch.float32
        torch.testing.assert_close(fn(s.view(1, 11, 7), t.view(1, 11, 7), mask.view(1, 11)), ref[name])
    with pytest.raises(ValueError, match="project the student"):
        L.mse_hidden(s[:, :5], t)


@pytest.mark.parametrize("kd", sorted(fused_mod.CLOSED_FORM))
@pytest.mark.parametrize("T,ce_w", [(1.0, 0.7), (1.0, 0.0), (2.0, 0.7), (0.5, 0.0)])
def test_fused_closed_form_equals_autograd(kd, T, ce_w, monkeypatch):
    """The written-out chunk gradients (CE, forward/reverse KL) equal autograd's, incl. T = 1 where CE
    shares the KD softmax, and -inf logits (a padded vocabulary) in both models."""
    sh, sw, th, tw, y, mask, sb, tb = _head(seed=28, bias=True)
    sb[-3:], tb[-3:] = -math.inf, -math.inf
    y = y.clamp_max(sw.shape[0] - 4)  # targets never sit in the padding

    def run():
        x, w, b = _leaves(sh, sw, sb)
        total, terms = L.fused_head_losses(x, w, th, tw, y, mask, kd=kd, temperature=T, ce_weight=ce_w, kd_weight=1.3,
                                           chunk_size=9, student_bias=b, teacher_bias=tb)
        (total * 0.5).backward()
        return total.detach(), terms, x.grad, w.grad, b.grad

    got = run()
    monkeypatch.setattr(fused_mod, "CLOSED_FORM", frozenset())
    want = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert set(got[1]) == set(want[1])
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2:], want[2:]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fused_backward_twice_is_a_clear_error():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=32)
    x = sh.clone().requires_grad_()
    total, _ = L.fused_head_losses(x, sw, th, tw, y, mask)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        total.backward()


def test_fused_workspace_is_reused_and_changes_nothing():
    """A kept HeadWorkspace gives the same loss and gradients as a fresh one, and a second call
    (same shapes) allocates no new [chunk, V] buffer: it reuses the same memory."""
    sh, sw, th, tw, y, mask, _, _ = _head(seed=29, dtype=torch.float32)
    ws = fused_mod.HeadWorkspace()

    def run(workspace):
        x, w = _leaves(sh, sw)
        total, _ = L.fused_head_losses(x, w, th, tw, y, mask, kd="forward_kl", temperature=2.0, chunk_size=8,
                                       workspace=workspace)
        total.backward()
        return total.detach(), x.grad, w.grad

    fresh = run(None)
    first = run(ws)
    ptrs, size = {k: b.data_ptr() for k, b in ws._bufs.items()}, ws.nbytes
    assert set(ptrs) == {"s", "t", "w", "ce"} and size == 4 * 8 * sw.shape[0] * 4
    second = run(ws)
    assert {k: b.data_ptr() for k, b in ws._bufs.items()} == ptrs and ws.nbytes == size
    for a, b, c in zip(fresh, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("kd", sorted(fused_mod.CLOSED_FORM))
def test_fused_closed_form_under_bf16_autocast(kd, monkeypatch):
    """Under CPU bf16 autocast the closed form computes logits in bf16 like F.linear would, and
    lands within bf16 rounding of the autograd path."""
    sh, sw, th, tw, y, mask, _, _ = _head(n=40, hs=32, ht=32, v=64, seed=30, dtype=torch.float32)

    def run():
        x, w = _leaves(sh, sw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _ = L.fused_head_losses(x, w, th, tw, y, mask, kd=kd, temperature=1.0, chunk_size=16)
        total.backward()
        return total.detach(), x.grad, w.grad

    got = run()
    monkeypatch.setattr(fused_mod, "CLOSED_FORM", frozenset())
    want = run()
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
