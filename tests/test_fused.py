"""Tests for the fused LM-head loss (raykd.losses.fused): equal to the naive full-logits losses in value and
gradient, chunking, masks, dtypes, memory (no [N, V] tensor), the closed-form gradients and buffer reuse."""
from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_losses import CASE_IDS, CASES

from raykd import losses as L
from raykd.losses import fused as fused_mod


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
    # the loss's graphs (one per AUTOGRAD_ROW_BLOCK rows of a chunk) save [block, V] tensors at most ...
    assert saved and max(saved) <= fused_mod.AUTOGRAD_ROW_BLOCK * v < chunk * v, max(saved)
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


def _largest_output(fn):
    """(the most elements of any tensor an op makes while `fn` runs, fn's result); private torch API."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    largest = [0]

    class Watch(dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    largest[0] = max(largest[0], o.numel())
            return out

    with Watch():
        result = fn()
    return largest[0], result


def _head_inputs(n: int, v: int, h: int, seed: int):
    """Student hidden [n, h] and head [v, h] (with grad), teacher hidden and head, labels [n]: seeded."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, h, generator=g, requires_grad=True)
    sw = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    return sh, sw, th, tw, torch.randint(0, v, (n,), generator=g)


def test_fused_never_materialises_n_by_v():
    """Stronger than the saved-tensor check: watch every op the forward runs (private torch API)."""
    n, v, chunk = 1024, 4096, 128
    sh, sw, th, tw, y = _head_inputs(n, v, 16, seed=27)
    largest, (total, _) = _largest_output(lambda: L.fused_head_losses(sh, sw, th, tw, y, None, kd="skew_reverse_kl", chunk_size=chunk))
    assert largest <= chunk * v, largest  # nothing bigger than one chunk of logits
    assert torch.isfinite(total)
    # control: the naive path does materialise [N, V]
    largest, _ = _largest_output(lambda: _naive(sh, sw, th, tw, y, None, kd="skew_reverse_kl", T=1.0, params={}, ce_w=1.0, kd_w=1.0))
    assert largest >= n * v




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
    (same shapes) allocates no new buffer: it reuses the same memory. Only the two logits buffers
    are [chunk, V]; the elementwise passes' temporaries are [ROW_BLOCK, V]."""
    sh, sw, th, tw, y, mask, _, _ = _head(seed=29, dtype=torch.float32)
    ws = fused_mod.HeadWorkspace()
    chunk, block = 3 * fused_mod.ROW_BLOCK, fused_mod.ROW_BLOCK

    def run(workspace):
        x, w = _leaves(sh, sw)
        total, _ = L.fused_head_losses(x, w, th, tw, y, mask, kd="forward_kl", temperature=2.0, chunk_size=chunk,
                                       workspace=workspace)
        total.backward()
        return total.detach(), x.grad, w.grad

    fresh = run(None)
    first = run(ws)
    ptrs, size = {k: b.data_ptr() for k, b in ws._bufs.items()}, ws.nbytes
    assert {k: b.shape[0] for k, b in ws._bufs.items()} == {"s": chunk, "t": chunk, "w": block, "ce": block}
    assert size == (2 * chunk + 2 * block) * sw.shape[0] * 4
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


# ----------------------------------------------------------------------------- class_kl in the fused head
def _class_naive(sh, sw, th, tw, y, mask, *, kd, T, ce_w, kd_w, cls_w, sb=None, tb=None):
    """The unfused objective on full [N, V] logits: CE + KD + class_kl (raykd.losses.class_kl)."""
    total = _naive(sh, sw, th, tw, y, mask, kd=kd, T=T, params={}, ce_w=ce_w, kd_w=kd_w, sb=sb, tb=tb)
    return total + cls_w * L.class_kl(F.linear(sh, sw, sb), F.linear(th, tw, tb), mask, T)


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])  # N = 37: 7 does not divide it, 1000 is one chunk
@pytest.mark.parametrize("kd,T,kd_w,pad", [("forward_kl", 2.0, 1.3, "both"), ("forward_kl", 1.0, 0.0, "both"),
                                           ("jsd", 0.5, 0.8, "both"), ("forward_kl", 1.5, 0.5, "teacher")])
def test_fused_class_kl_matches_unfused(chunk, kd, T, kd_w, pad):
    """Two passes over the chunks (column log-sum-exps, then loss and written-out gradient) equal class_kl on
    the full logits, with the token terms beside it (closed-form and autograd chunks), a mask, and -inf
    vocabulary padding (in both heads, or in the teacher's only); gradients w.r.t. the student hidden states,
    head weight and bias."""
    sh, sw, th, tw, y, mask, sb, tb = _head(bias=True, seed=33)
    tb[-3:] = -math.inf
    if pad == "both":
        sb[-3:] = -math.inf
    y = y.clamp_max(sw.shape[0] - 4)  # targets never sit in the padding
    kw = dict(kd=kd, T=T, ce_w=0.7, kd_w=kd_w, cls_w=0.5)
    a, b = _leaves(sh, sw, sb), _leaves(sh, sw, sb)
    want = _class_naive(a[0], a[1], th, tw, y, mask, sb=a[2], tb=tb, **kw)
    got, terms = L.fused_head_losses(b[0], b[1], th, tw, y, mask, kd=kd, temperature=T, ce_weight=0.7, kd_weight=kd_w,
                                     class_weight=0.5, chunk_size=chunk, student_bias=b[2], teacher_bias=tb)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    cls = L.class_kl(F.linear(sh, sw, sb), F.linear(th, tw, tb), mask, T)
    assert set(terms) == {"ce", "class_kd"} | ({"kd"} if kd_w else set()) and not terms["class_kd"].requires_grad
    torch.testing.assert_close(terms["class_kd"], cls, rtol=1e-10, atol=1e-12)
    want.backward()
    (got * 0.5).backward()  # grad_output != 1 is applied
    for xa, xb in zip(a, b):
        assert torch.isfinite(xb.grad).all()
        torch.testing.assert_close(xb.grad, 0.5 * xa.grad, rtol=1e-9, atol=1e-11)
    if pad == "both":
        assert torch.all(b[2].grad[-3:] == 0)  # no gradient into the padding


def test_fused_class_kl_alone_eval_and_empty_mask():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=34)
    cls = L.class_kl(sh @ sw.T, th @ tw.T, mask, 1.5)
    x = sh.clone().requires_grad_()
    total, terms = L.fused_head_losses(x, sw, th, tw, y, mask, temperature=1.5, ce_weight=0.0, kd_weight=0.0,
                                       class_weight=2.0, chunk_size=6)
    assert set(terms) == {"class_kd"}
    torch.testing.assert_close(total, 2.0 * cls)
    total.backward()
    x2 = sh.clone().requires_grad_()
    (2.0 * L.class_kl(x2 @ sw.T, th @ tw.T, mask, 1.5)).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad():  # eval (no grad anywhere): the same number
        total2, _ = L.fused_head_losses(sh, sw, th, tw, y, mask, temperature=1.5, ce_weight=0.0, kd_weight=0.0,
                                        class_weight=2.0, chunk_size=6)
    torch.testing.assert_close(total2, 2.0 * cls)
    # no teacher: the term is off, like KD
    assert set(L.fused_head_losses(sh, sw, None, None, y, mask, class_weight=1.0)[1]) == {"ce"}
    x, w = _leaves(sh, sw)
    total, terms = L.fused_head_losses(x, w, th, tw, y, torch.zeros_like(mask), class_weight=1.0, chunk_size=5)
    total.backward()
    assert total.item() == 0.0 and terms["class_kd"].item() == 0.0
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_fused_class_kl_refuses_cached_topk_targets():
    sh, sw, th, tw, y, mask, _, _ = _head(seed=35)
    top = L.teacher_topk(th @ tw.T, 5)
    with pytest.raises(ValueError, match=r"^loss\.weights\.class_kd: class_kl needs every token's dense teacher logits") as e:
        L.fused_head_losses(sh, sw, top, None, y, mask, class_weight=0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^loss\.kd: class_kl is a batch-level"):
        L.fused_head_losses(sh, sw, th, tw, y, mask, kd="class_kl")


def test_fused_class_kl_never_materialises_n_by_v():
    """The column log-sum-exps run over chunks: no op of the forward makes anything bigger than one chunk of logits."""
    v, chunk = 2048, 64
    sh, sw, th, tw, y = _head_inputs(512, v, 16, seed=36)
    largest, (total, _) = _largest_output(
        lambda: L.fused_head_losses(sh, sw, th, tw, y, None, kd="forward_kl", class_weight=1.0, chunk_size=chunk))
    assert largest <= chunk * v, largest
    total.backward()
    assert torch.isfinite(sh.grad).all() and sw.grad.abs().sum() > 0


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_class_kl_fp32_and_bf16_autocast(autocast):
    """fp32 inputs against the float64 unfused loss; under CPU bf16 autocast (logits in bf16, as F.linear)
    within bf16 rounding of the unfused loss on the same autocast logits."""
    sh, sw, th, tw, y, mask, _, _ = _head(n=40, hs=32, ht=32, v=64, seed=37, dtype=torch.float32)
    x, w = _leaves(sh, sw)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, _ = L.fused_head_losses(x, w, th, tw, y, mask, temperature=2.0, ce_weight=0.0, kd_weight=0.0,
                                       class_weight=1.0, chunk_size=16)
    total.backward()
    x2, w2 = _leaves(sh.double(), sw.double())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        s_logits, t_logits = F.linear(x2.float(), w2.float()), F.linear(th, tw)
    want = L.class_kl(s_logits.double(), t_logits.double(), mask, 2.0)
    want.backward()
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    assert total.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(total.double(), want, **tol)
    torch.testing.assert_close(x.grad.double(), x2.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w2.grad, **tol)
