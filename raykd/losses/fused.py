"""The fused LM-head loss: CE + logit KD (+ the class-level KL, `raykd.losses.classwise`) from final
hidden states, chunked over tokens so that full [N, V] logits never exist; teacher targets dense
(teacher hidden + head) or cached top-k (`raykd.losses.topk`). Pure torch, no Ray; re-exported as
`raykd.losses.fused_head_losses`."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.losses.classwise import class_kl_chunked
from raykd.losses.divergences import (
    NEEDS_TARGETS,
    SPARSE_UNSUPPORTED,
    TOKEN_LOSSES,
    _upcast,
    check_logit_loss,
)
from raykd.losses.topk import TopK, closed_form_kd, sparse_bins
from raykd.losses.workspace import HeadWorkspace, _exp_lse, _logits_into, _scaled_

# ----------------------------------------------------------------------------- fused LM head
CLOSED_FORM = frozenset({"forward_kl", "reverse_kl"})  # KD losses whose chunk gradient is written out (no autograd)


def _dense_kd(logq: Tensor, logp: Tensor, kd: str, a: float, c, need_grad: bool, ws: HeadWorkspace, tgt: Tensor | None):
    """Forward / reverse KL of one chunk from the student's and teacher's logits over T (buffers it overwrites):
    (kd_sum, g = a · dKL/du + c · q in a buffer or None, −log q at tgt [C, 1] or None), as `closed_form_kd`."""
    logq.sub_(_exp_lse(logq, ws, "w", normalise=False)[0])
    lse_p, p = _exp_lse(logp, ws, "w")
    logp.sub_(lse_p)
    nll = None if tgt is None else -logq.gather(1, tgt[:, None])
    g = None
    if kd == "forward_kl":
        kd_sum = logp.sub_(logq).mul_(p).sum()  # Σ p·(log p − log q); logp's buffer is spent
        if need_grad:  # a·(q − p) [+ c·q]
            g = logq.exp_().mul_(a + c).sub_(p, alpha=a)
    else:  # reverse_kl
        q = torch.exp(logq, out=p)  # p is not needed by reverse KL
        diff = logq.sub_(logp)  # log q − log p
        rows = torch.mul(q, diff, out=logp).sum(-1, keepdim=True)
        kd_sum = rows.sum()
        if need_grad:  # q ⊙ (a·(diff − KL) [+ c])
            g = diff.sub_(rows).mul_(a).add_(c).mul_(q)
    return kd_sum, g, nll


# On CPU only; an accelerator takes the whole chunk at once (there each block would be more kernel launches, not cache)
ROW_BLOCK = 8  # rows of a chunk the elementwise passes work on at once, so their [8, V] fp32 temporaries stay in cache
AUTOGRAD_ROW_BLOCK = 32  # rows per autograd graph on the other losses: [32, V] temporaries, few enough graphs per chunk


def row_block(device: torch.device, rows: int, cpu_rows: int) -> int:
    """Rows per elementwise block of a [rows, V] chunk: `cpu_rows` on CPU, all of them elsewhere."""
    return cpu_rows if device.type == "cpu" else rows


def _closed_form_chunk(h, th, sw, sb, tw, tb, tgt, kd, temperature, ce_w, kd_w, scale, need_grad, ws, cdt, keep=None):
    """CE and forward/reverse KL of one chunk with the gradient written out, in place in workspace
    buffers, so that a chunk costs two GEMMs, a few passes over [C, V] and no autograd graph (the
    same derivatives Liger Kernel's fused kernels use; own implementation).

    h [C, Hs], th [C, Ht], a `TopK` [C, k] of cached targets (raykd.losses.topk.closed_form_kd) or None
    (CE only), tgt [C] valid ids; logits are computed in `cdt` into the [C, V] buffers "s" and "t"
    (the GEMMs want the whole chunk), then every elementwise pass runs on `row_block` rows (CPU: ROW_BLOCK) at a time in
    fp32 [block, V] temporaries (`_closed_form_rows`), so the passes stay in cache and only the two
    [C, V] buffers in `cdt` exist at full size; each block's gradient is written back over its
    student logits. Returns (ce_sum, kd_sum, g): sums over the chunk ([], None when the term is off;
    kd_sum without T²) and g [C, V] in `cdt` (buffer "s") = scale · d(ce_w·ce_sum + kd_w·T²·kd_sum)/d
    logits, or None. `keep` [C] (or None: every row 1) weighs each row's CE (`fused_head_losses`' ce_mask).
    """
    f = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = _logits_into(ws, "s", h, sw, sb, cdt)
    t = _logits_into(ws, "t", th, tw, tb, cdt) if kd is not None and not isinstance(th, TopK) else None
    sums, block = [None, None], row_block(z.device, z.shape[0], ROW_BLOCK)
    for r0 in range(0, z.shape[0], block):
        r = slice(r0, r0 + block)
        zb = z[r] if cdt == f else ws.take("s32", *z[r].shape, f, z.device).copy_(z[r])
        tt = th.rows(r) if isinstance(th, TopK) else None if t is None else t[r] if cdt == f else ws.take("t32", *zb.shape, f, z.device).copy_(t[r])
        *part, g = _closed_form_rows(zb, tt, tgt[r], kd, temperature, ce_w, kd_w, scale, need_grad, ws,
                                     None if keep is None else keep[r])
        sums = [b if a is None else a if b is None else a + b for a, b in zip(sums, part)]
        if g is not None and g.data_ptr() != z[r].data_ptr():
            z[r].copy_(g)  # the block's gradient over its logits, in `cdt`
    return *sums, z if need_grad and (ce_w != 0 or kd is not None) else None


def _closed_form_rows(z, t, tgt, kd, temperature, ce_w, kd_w, scale, need_grad, ws, keep=None):
    """CE and forward/reverse KL of a block of rows and their logit gradient, in place: z [R, V] the
    student's logits and t [R, V] the teacher's (fp32 / fp64 buffers this overwrites), or t a `TopK`
    [R, k] or None. Returns (ce_sum, kd_sum, g [R, V] in z's buffer or a workspace one, or None). With
    q = softmax(z/T), p = softmax(t/T): d CE/dz = softmax(z) − onehot(tgt); d T²·KL(p‖q)/dz = T·(q − p);
    d T²·KL(q‖p)/dz = T·q ⊙ (log q − log p − KL(q‖p))."""
    f, T = z.dtype, float(temperature)
    ce_sum = kd_sum = g = ce_g = None
    keep = None if keep is None else keep.to(f)[:, None]
    cs = ce_w * scale if keep is None else keep * (ce_w * scale)  # CE's gradient coefficient: a number, or one per row [C, 1]
    kept = lambda rows: rows.sum() if keep is None else (rows * keep).sum()  # noqa: E731  (CE summed over the chunk's rows)
    shared = kd is not None and ce_w != 0 and T == 1.0  # CE's softmax is the KD's q
    if ce_w != 0 and not shared:  # CE on the raw logits, before z is overwritten
        lse, ce_g = _exp_lse(z, ws, "ce")
        ce_sum = kept(lse - z.gather(1, tgt[:, None]))
        if need_grad:
            ce_g.mul_(cs)
    a = kd_w * T * scale  # T² · (1/T) from the chain rule through z/T
    c = cs if shared else 0.0
    if kd is not None:
        u = _scaled_(z, T)
        if isinstance(t, TopK):  # cached top-k targets: the (k+1)-bin KL (raykd.losses.topk)
            kd_sum, g, nll = closed_form_kd(u, t, kd, T, a, c, need_grad, tgt if shared else None)
        else:
            kd_sum, g, nll = _dense_kd(u, _scaled_(t, T), kd, a, c, need_grad, ws, tgt if shared else None)
        if shared:
            ce_sum = kept(nll)
        if ce_g is not None and need_grad:
            g.add_(ce_g)
    elif need_grad:
        g = ce_g
    if g is None:
        return ce_sum, kd_sum, None
    if ce_w != 0:
        src = torch.full((tgt.shape[0], 1), -cs, dtype=g.dtype, device=g.device) if keep is None else (-cs).to(g.dtype)
        g.scatter_add_(1, tgt[:, None], src)
    return ce_sum, kd_sum, g


@dataclass(frozen=True)
class HeadLoss:
    """What one fused-head call computes: ce_weight·CE + kd_weight·KD(kd, temperature, **kd_params)
    + class_weight·class_kl(temperature)."""

    kd: str | None  # the logit loss (raykd.losses.divergences.TOKEN_LOSSES name); None: CE only
    temperature: float
    kd_params: dict
    ce_weight: float
    kd_weight: float
    chunk_size: int  # tokens per chunk: only [chunk_size, V] logits exist at once
    class_weight: float = 0.0  # the batch-level class_kl term (loss.weights.class_kd); 0: off


def _fused_pass(sh, sw, sb, th, tw, tb, targets, mask, keep, cfg: HeadLoss, ws, need_h, need_w, need_b):
    """Chunked forward that also builds the gradients (see fused_head_losses); keep [N]: CE row weights or None."""
    kd, temperature, chunk = cfg.kd, cfg.temperature, cfg.chunk_size
    ce_w, kd_w = cfg.ce_weight, cfg.kd_weight
    idx = None if mask is None else mask.nonzero().squeeze(1)
    n = sh.shape[0] if idx is None else idx.numel()
    denom = max(n, 1)
    acc = torch.float64 if sh.dtype == torch.float64 else torch.float32
    sums = {k: torch.zeros((), dtype=acc, device=sh.device) for k in ("ce", "kd", "class_kd")}
    gh = torch.zeros_like(sh) if need_h else None
    gw = torch.zeros(sw.shape, dtype=acc, device=sw.device) if need_w else None
    gb = torch.zeros(sb.shape, dtype=acc, device=sb.device) if need_b else None
    need_any = need_h or need_w or need_b
    kd_fn = TOKEN_LOSSES[kd] if kd is not None else None
    sparse = isinstance(th, TopK)  # cached top-k teacher targets instead of teacher hidden + head
    # written-out gradients for CE and forward/reverse KL; other losses (and ignore-index targets) use autograd
    closed = (kd_fn is None or kd in CLOSED_FORM) and not bool(((targets if idx is None else targets[idx]) < 0).any())
    dev = sh.device.type
    # the dtype F.linear would give the logits (autocast's, else the input's); the closed form calls torch.mm itself
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and sh.dtype != torch.float64 else sh.dtype
    if closed or cfg.class_weight != 0:  # once per call, not per chunk; once per run for a head without gradient (HeadWorkspace.cast)
        sw_c, tw_c = ws.cast("sw", sw, cdt), None if tw is None else ws.cast("tw", tw, cdt)
    chunks = [slice(a, min(a + chunk, n)) if idx is None else idx[a:a + chunk] for a in range(0, n, chunk)]
    for rows in chunks if ce_w != 0 or kd_fn is not None else ():  # the token terms
        h, tgt = sh[rows], targets[rows]
        if closed:
            ce_c, kd_c, g = _closed_form_chunk(h, None if th is None else th.rows(rows) if sparse else th[rows], sw_c, sb, tw_c, tb, tgt,
                                               kd if kd_fn is not None else None, temperature, ce_w, kd_w,
                                               1.0 / denom, need_any, ws, cdt, None if keep is None else keep[rows])
            for key, val in (("ce", ce_c), ("kd", kd_c)):
                if val is not None:
                    sums[key] += val
            if g is not None:
                _accumulate(g, h, sw_c, rows, gh, gw, gb, acc)  # sw_c: no per-chunk cast of the head under autocast
            continue
        g = _autograd_chunk(h, th, sw, sb, tw, tb, tgt, rows, cfg, sparse, need_any, denom, sums, None if keep is None else keep[rows])
        if g is not None:
            _accumulate(g, h, sw, rows, gh, gw, gb, acc)
    if cfg.class_weight != 0 and chunks:  # two more passes over the same chunks (raykd.losses.classwise)
        sums["class_kd"] += _class_term(sh, sw_c, sb, th, tw_c, tb, chunks, cfg, ws, cdt, need_any, (gh, gw, gb), acc)
    ce = sums["ce"] / denom
    kd_term = sums["kd"] * (temperature * temperature) / denom
    total = ce_w * ce + (kd_w * kd_term if kd_fn is not None else 0.0) + cfg.class_weight * sums["class_kd"]
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return total, ce, kd_term, sums["class_kd"], cast(gh, sh), cast(gw, sw), cast(gb, sb)


def _class_term(sh, sw_c, sb, th, tw_c, tb, chunks, cfg: HeadLoss, ws, cdt, need_grad, grads, acc):
    """T² · class_kl over the rows of `chunks` (raykd.losses.classwise), its gradient (× class_weight)
    accumulated into grads = (gh, gw, gb); head weights already in the logits dtype `cdt`."""
    f = torch.float64 if sh.dtype == torch.float64 else torch.float32

    def logits(side, rows):  # scaled, clamped [C, V] logits in workspace buffer "s" / "t"
        h, w, b = (sh, sw_c, sb) if side == "s" else (th, tw_c, tb)
        return _scaled_(_logits_into(ws, side, h[rows], w, b, cdt, f), cfg.temperature)

    def on_grad(rows, g):
        _accumulate(g.to(cdt), sh[rows], sw_c, rows, *grads, acc)

    return class_kl_chunked(logits, chunks, cfg.temperature, cfg.class_weight, need_grad, on_grad,
                            lambda r, c: ws.take("w", r, c, f, sh.device))


def _autograd_chunk(h, th, sw, sb, tw, tb, tgt, rows, cfg: HeadLoss, sparse: bool, need_grad: bool, denom: int, sums: dict, keep=None):
    """One chunk through autograd (losses without a written-out gradient): both models' [C, V] logits
    from one GEMM each, then autograd on AUTOGRAD_ROW_BLOCK rows at a time (on CPU), so the loss's own
    temporaries are [block, V], not [C, V]; adds the chunk's CE / KD sums to `sums` (CE rows weighed
    by `keep` [C] when given); returns the logit gradient [C, V] (written over the logits) or None."""
    kd_fn = TOKEN_LOSSES[cfg.kd] if cfg.kd is not None else None
    with torch.no_grad():
        logits = F.linear(h, sw, sb)  # [C, V] in the input dtype
        t_logits = F.linear(th[rows], tw, tb) if kd_fn is not None and not sparse else None
    targets = th.rows(rows) if kd_fn is not None and sparse else t_logits
    got = False
    step = row_block(logits.device, logits.shape[0], AUTOGRAD_ROW_BLOCK)
    for r0 in range(0, logits.shape[0], step):
        r = slice(r0, r0 + step)
        with torch.enable_grad() if need_grad else nullcontext():
            leaf = logits[r].detach().requires_grad_(need_grad)
            obj = _autograd_objective(leaf, None if targets is None else targets.rows(r) if sparse else targets[r], tgt[r],
                                      cfg, sums, None if keep is None else keep[r]) / denom
        if need_grad and torch.is_tensor(obj) and obj.requires_grad:
            (g,) = torch.autograd.grad(obj, leaf)  # [block, V], input dtype
            logits[r].copy_(g)
            got = True
    return logits if got else None


def _autograd_objective(leaf, target, tgt, cfg: HeadLoss, sums: dict, keep):
    """ce_weight·CE + kd_weight·T²·KD summed over the rows of `leaf` [R, V] (student logits) against `target`
    (teacher logits [R, V] or `TopK` [R, k]); adds the sums to `sums`."""
    obj = 0.0
    if cfg.ce_weight != 0:
        ce_c = (F.cross_entropy(_upcast(leaf), tgt, reduction="sum") if keep is None
                else (F.cross_entropy(_upcast(leaf), tgt, reduction="none") * keep).sum())
        sums["ce"] += ce_c.detach()
        obj = obj + cfg.ce_weight * ce_c
    if cfg.kd is not None:
        kd_fn = TOKEN_LOSSES[cfg.kd]
        if isinstance(target, TopK):  # (k+1)-bin distributions, already at temperature (raykd.losses.topk)
            kd_c = kd_fn(*sparse_bins(leaf, target, cfg.temperature), 1.0, **cfg.kd_params).sum()
        else:
            extra = {"targets": tgt} if cfg.kd in NEEDS_TARGETS else {}
            kd_c = kd_fn(leaf, target, cfg.temperature, **cfg.kd_params, **extra).sum()
        sums["kd"] += kd_c.detach()
        obj = obj + cfg.kd_weight * cfg.temperature * cfg.temperature * kd_c
    return obj


def _accumulate(g, h, sw, rows, gh, gw, gb, acc):
    """Chain one chunk's logit gradient g [C, V] (input dtype) into the hidden [N, Hs], weight [V, Hs]
    and bias [V] gradient buffers (None when not wanted)."""
    if gh is not None:
        gh[rows] += (g @ sw).to(gh.dtype)  # += : the class term adds to the rows the token terms filled
    if gw is not None:
        if gw.dtype == g.dtype:
            gw.addmm_(g.t(), h)
        else:
            gw += (g.t() @ h).to(acc)
    if gb is not None:
        gb += g.sum(0).to(acc)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, targets, mask, keep, cfg, ws):
        need = ctx.needs_input_grad
        total, ce, kd, cls, gh, gw, gb = _fused_pass(sh, sw, sb, th, tw, tb, targets, mask, keep, cfg, ws,
                                                     need[0], need[1], sb is not None and need[2])
        # only [N, Hs], [V, Hs] and [V] survive the forward. Kept as a plain attribute, not saved tensors, so that
        # backward can hand them over: scaled in place and returned with no other reference left, autograd takes
        # them as the .grad instead of copying a [V, Hs] buffer (a fresh 113 MB for SmolLM2's head every step)
        ctx.grads = [gh, gw, gb]
        ctx.mark_non_differentiable(ce, kd, cls)
        return total, ce, kd, cls

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd, _grad_cls):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_head_losses: its backward runs once (retain_graph=True and a second backward are not supported)")
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        del grads
        return (*scaled, None, None, None, None, None, None, None, None)


def _teacher_side(teacher_hidden, teacher_weight, teacher_bias, kd: str, kd_params: dict, n: int, vocab: int, class_kd: bool):
    """Checked, detached teacher inputs (th [N, Ht] or TopK, tw [V, Ht] | None, tb [V] | None) for KD on n tokens."""
    check_logit_loss(kd, kd_params)
    if isinstance(teacher_hidden, TopK):
        if class_kd:
            raise ValueError("loss.weights.class_kd: class_kl needs every token's dense teacher logits; cached top-k targets "
                             "cannot serve it; set loss.weights.class_kd=0 or run the teacher online")
        if kd in SPARSE_UNSUPPORTED:
            raise ValueError(f"loss.kd: {kd} needs the dense teacher distribution; cached top-k targets serve the others")
        th = teacher_hidden.flat()
        if th.idx.shape[0] != n or th.vocab != vocab:
            raise ValueError(f"top-k teacher targets {tuple(th.idx.shape)} over V={th.vocab} do not match {n} student tokens over V={vocab}")
        return th, None, None
    if teacher_weight is None:
        raise ValueError("fused_head_losses: teacher_hidden given without teacher_weight")
    th, tw = teacher_hidden.detach().reshape(n, -1), teacher_weight.detach()
    if tw.shape != (vocab, th.shape[1]):
        raise ValueError(f"teacher_weight {tuple(tw.shape)} does not match [V={vocab}, Ht={th.shape[1]}]; KD needs a shared vocabulary")
    return th, tw, None if teacher_bias is None else teacher_bias.detach()


def _ce_rows(ce_mask: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """CE row weights [N]: n / n_ce on the n_ce rows of `mask` that `ce_mask` keeps, else 0, so that the
    head's sums over its n rows divided by n give CE's mean over the kept rows (no host sync)."""
    rows = ce_mask if mask is None else ce_mask & mask
    n = float(rows.numel()) if mask is None else mask.sum()
    return rows.to(torch.float64 if dtype == torch.float64 else torch.float32) * (n / rows.sum().clamp(min=1))


def fused_head_losses(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None,
                      teacher_weight: Tensor | None, targets: Tensor, mask: Tensor | None, *,
                      kd: str = "forward_kl", temperature: float = 1.0, kd_params: dict | None = None,
                      ce_weight: float = 1.0, kd_weight: float = 1.0, chunk_size: int = 256,
                      student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                      workspace: HeadWorkspace | None = None, class_weight: float = 0.0,
                      ce_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + logit KD computed from final hidden states and LM-head weights, chunked over tokens
    so that full [N, V] logits never exist (idea as in Liger Kernel's fused linear
    cross-entropy, Hsu et al. 2024, and torchtune's chunked CE; own implementation).

    student_hidden [N, Hs], student_weight [V, Hs], teacher_hidden [N, Ht] or None,
    teacher_weight [V, Ht] (or teacher_hidden a `raykd.losses.topk.TopK` [N, k] of cached sparse
    targets and teacher_weight None: KD on the (k+1)-bin distributions, see raykd.losses.topk),
    targets [N] long, mask [N] bool or None (leading dims flattened).
    Returns (total, terms): total = ce_weight·CE + kd_weight·KD + class_weight·CLASS where
    CE == cross_entropy(...), KD == LOGIT_LOSSES[kd](..., temperature, **kd_params) and
    CLASS == class_kl(..., temperature) (T² included; the batch-level class-aware KD term of Zhang
    et al. 2022, arXiv:2211.14773, by two more passes over the chunks: column log-sum-exps, then
    loss and gradient, see raykd.losses.classwise; dense teacher only) on the full logits;
    terms = {"ce", "kd", "class_kd"} detached (a skipped term is absent: CE when ce_weight == 0,
    KD / class_kd when teacher_hidden is None or their weight is 0). Gradients for the student hidden
    states, weight and bias are computed chunk by chunk in the forward (written out for CE and
    forward/reverse KL, `CLOSED_FORM`; autograd on each chunk's logits for the other losses)
    and kept as [N, Hs] / [V, Hs] buffers (weight grad accumulated in fp32); the teacher gets no
    gradient. Logits in the input dtype (autocast's under autocast), losses in fp32. `workspace`: a
    `HeadWorkspace` to reuse [chunk, V] buffers across calls. `ce_mask` [N] bool: CE is the mean over the
    rows of `mask` it keeps, KD / class_kd count all of them (on-policy KD: no CE on the student's samples).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    use_kd = teacher_hidden is not None and kd_weight != 0
    use_class = teacher_hidden is not None and class_weight != 0
    kd_params = dict(kd_params or {})
    hs = student_hidden.shape[-1]
    sh = student_hidden.reshape(-1, hs)
    n = sh.shape[0]
    if student_weight.shape[-1] != hs:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} does not match hidden width {hs}")
    th, tw, tb = (_teacher_side(teacher_hidden, teacher_weight, teacher_bias, kd, kd_params, n, student_weight.shape[0], use_class)
                  if use_kd or use_class else (None, None, None))
    tgt = targets.reshape(n).long()
    m = None if mask is None else mask.reshape(n).bool()
    keep = None if ce_mask is None or ce_weight == 0 else _ce_rows(ce_mask.reshape(n).bool(), m, sh.dtype)
    cfg = HeadLoss(kd if use_kd else None, float(temperature), kd_params, float(ce_weight), float(kd_weight), int(chunk_size),
                   float(class_weight) if use_class else 0.0)
    args = (sh, student_weight, student_bias, th, tw, tb, tgt, m, keep, cfg, workspace or HeadWorkspace())
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (sh, student_weight, student_bias)):
        total, ce, kd_term, cls = _FusedHeadLoss.apply(*args)
    else:
        with torch.no_grad():
            total, ce, kd_term, cls = _fused_pass(*args, False, False, False)[:4]
    terms = {}
    if ce_weight != 0:
        terms["ce"] = ce.detach()
    if use_kd:
        terms["kd"] = kd_term.detach()
    if use_class:
        terms["class_kd"] = cls.detach()
    return total, terms
