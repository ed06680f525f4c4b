"""Tests for raykd.losses: float64 references written from the formulas, masks, dtypes (the fused head: test_fused.py)."""
from __future__ import annotations

import inspect
import math
import zlib

import pytest
import torch

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
    assert set(L.TOKEN_LOSSES) | set(L.BATCH_LOSSES) == set(L.LOGIT_LOSSES) == set(L.LOSS_PARAMS)
    assert not set(L.TOKEN_LOSSES) & set(L.BATCH_LOSSES) and set(L.BATCH_LOSSES) <= L.SPARSE_UNSUPPORTED
    for name, fn in L.BATCH_LOSSES.items():  # the LOGIT_LOSSES signature, no user params
        assert list(inspect.signature(fn).parameters) == ["student_logits", "teacher_logits", "mask", "temperature"]
        assert L.LOSS_PARAMS[name] == {} and L.LOGIT_LOSSES[name] is fn
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
    for name in L.TOKEN_LOSSES:
        L.check_logit_loss(name, dict(L.LOSS_PARAMS[name]))
        L.check_logit_loss(name, None)
    with pytest.raises(ValueError) as e:
        L.check_logit_loss("forwrd_kl", {})
    msg = str(e.value)
    assert msg.startswith("loss.kd: unknown logit loss 'forwrd_kl'; did you mean 'forward_kl'? choose one of:")
    assert "skew_reverse_kl" in msg and "class_kl" not in msg and "\n" not in msg
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


# ----------------------------------------------------------------------------- class_kl (batch-level)
def ref_class_kl(s, t, mask, T):
    """Class-aware logit KD's class-level KL (Zhang et al. 2022), from the formula: each vocabulary
    column is a distribution over the unmasked tokens; T² × the mean over columns of KL(P_c ‖ Q_c)."""
    rows = [i for i in range(s.shape[0]) if mask is None or mask[i]]
    total = 0.0
    for c in range(s.shape[1]):
        p = torch.stack([torch.exp(t[i, c] / T) for i in rows])
        q = torch.stack([torch.exp(s[i, c] / T) for i in rows])
        total = total + _kl(p / p.sum(), q / q.sum())
    return total / s.shape[1] * T * T


@pytest.mark.parametrize("T", [0.7, 1.0, 2.5])
def test_class_kl_matches_reference(T):
    s, t, _, mask = _data(n=10, v=7, seed=40 + int(T * 10))
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = L.LOGIT_LOSSES["class_kl"](s1, t1, mask, T)
    want = ref_class_kl(s2, t2, mask, T)
    assert got.dtype == torch.float64 and got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-8, atol=1e-11)
    assert torch.all(s1.grad[~mask] == 0) and torch.all(t1.grad[~mask] == 0)
    # finite differences, both inputs
    assert torch.autograd.gradcheck(lambda a, b: L.class_kl(a, b, mask, T), (s.clone().requires_grad_(), t.clone().requires_grad_()))
    # no mask = every token
    torch.testing.assert_close(L.class_kl(s, t, None, T), ref_class_kl(s, t, None, T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 1.6])
def test_class_kl_gradient_is_written_out_form(T):
    """d loss / d s[i, c] = T·(Q[i, c] − P[i, c]) / V on unmasked rows (P, Q softmax over the tokens), 0 elsewhere:
    the form the fused head writes out. Masked rows may hold garbage."""
    s, t, _, mask = _data(n=12, v=9, seed=44)
    P, Q = torch.softmax(t[mask] / T, 0), torch.softmax(s[mask] / T, 0)
    x = s.clone()
    x[~mask] = float("nan")
    x.requires_grad_()
    y = t.clone()
    y[~mask] = float("inf")
    loss = L.class_kl(x, y, mask, T)
    loss.backward()
    want = torch.zeros_like(s)
    want[mask] = T * (Q - P) / s.shape[1]
    torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad.sum(0), torch.zeros(s.shape[1], dtype=s.dtype), rtol=0, atol=1e-12)


def test_class_kl_is_class_wise_not_token_wise():
    s, t, _, mask = _data(n=10, v=8, seed=45)
    assert abs(L.class_kl(s, s.clone(), mask, 1.7).item()) < 1e-12 and abs(L.class_kl(t, t.clone(), None).item()) < 1e-12
    # a constant added to a whole vocabulary column (over the tokens) leaves each class distribution unchanged ...
    shift = torch.randn(1, 8, dtype=s.dtype) * 3
    torch.testing.assert_close(L.class_kl(s + shift, t, mask, 1.3), L.class_kl(s, t, mask, 1.3))
    # ... while one added to a token row (which no per-token loss sees) changes it
    row = torch.randn(10, 1, dtype=s.dtype) * 3
    assert not torch.allclose(L.class_kl(s + row, t, mask, 1.3), L.class_kl(s, t, mask, 1.3))
    torch.testing.assert_close(L.forward_kl(s + row, t, mask, 1.3), L.forward_kl(s, t, mask, 1.3))
    # the batch matters: one token's teacher changes every other token's loss share
    t2 = t.clone()
    t2[0] += torch.randn(8, dtype=t.dtype)
    assert not torch.allclose(L.class_kl(s, t2, mask), L.class_kl(s, t, mask))
    # leading dims are flattened; T² scaling against the reference
    torch.testing.assert_close(L.class_kl(s.view(2, 5, 8), t.view(2, 5, 8), mask.view(2, 5), 1.3), L.class_kl(s, t, mask, 1.3))


def test_class_kl_masks_padding_and_dtypes():
    s, t, _, mask = _data(n=10, v=12, seed=46)
    x = s.clone().requires_grad_()
    empty = L.class_kl(x, t, torch.zeros(10, dtype=torch.bool), 2.0)
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.all(x.grad == 0)
    # -inf logits in both models (a padded vocabulary) equal dropping the column
    sp, tp = s.clone(), t.clone()
    sp[:, 10:], tp[:, 10:] = -math.inf, -math.inf
    x = sp.clone().requires_grad_()
    got = L.class_kl(x, tp, mask, 1.5)
    got.backward()
    torch.testing.assert_close(got, ref_class_kl(s[:, :10], t[:, :10], mask, 1.5), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 10:] == 0)
    # a column only the teacher pads (-inf on every token) is left out too: no loss, no gradient
    x = s.clone().requires_grad_()
    got = L.class_kl(x, tp, mask, 1.5)
    got.backward()
    torch.testing.assert_close(got, ref_class_kl(s[:, :10], t[:, :10], mask, 1.5), rtol=1e-10, atol=1e-12)
    assert torch.all(x.grad[:, 10:] == 0)
    # fp32 / bf16 inputs: fp32 math, close to the fp64 value
    for dt in (torch.float32, torch.bfloat16):
        val = L.class_kl(s.to(dt), t.to(dt), mask, 1.5)
        assert val.dtype == torch.float32
        torch.testing.assert_close(val.double(), ref_class_kl(s.to(dt).double(), t.to(dt).double(), mask, 1.5), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shared vocabulary"):
        L.class_kl(s, t[:, :-1], mask)
    with pytest.raises(ValueError, match="loss.temperature"):
        L.class_kl(s, t, mask, 0.0)


def test_class_kl_is_refused_as_a_token_loss():
    from raykd.config import ConfigError, LossConfig

    for call in (lambda: L.check_logit_loss("class_kl", {}), lambda: L.sparse_logit_loss("class_kl", *_data()[:2], None)):
        with pytest.raises(ValueError, match=r"^loss\.kd: class_kl is a batch-level .*loss\.weights\.class_kd") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^loss\.kd: class_kl is a batch-level"):
        LossConfig(kd="class_kl")
