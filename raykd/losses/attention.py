"""Attention-level KD losses on q/k/v captured by :class:`raykd.capture.Capture`.

* :func:`attention_kl`: attention-map distillation, KL(teacher attention || student attention) per
  query row (TinyBERT, Jiao et al., 2020, arXiv:1909.10351; MiniLM, Wang et al., NeurIPS 2020,
  arXiv:2002.10957).
* :func:`relation_loss`: MiniLMv2 multi-head self-attention relation distillation (Wang et al.,
  Findings of ACL 2021, arXiv:2012.15828): q-q, k-k and v-v relations over ``R`` relation heads,
  which works across different head counts and widths.

Masking conventions: keys are causal (key ``j`` visible from query ``i`` iff
``j <= i``; additionally ``i - j < sliding_window`` when the layer has one), keys whose ``mask`` entry
is False are hidden (the query's own position always stays visible, so no row is empty), and query
rows whose ``mask`` entry is False do not count. Losses are means over the valid ``(batch, row)``
pairs (token-weighted across the batch) and over heads. All scores are computed in fp32 from
log-softmax, over chunks of ``q_chunk`` query rows; the gradient is written out per chunk (or, for
head-averaged maps and soft-capped students, each chunk is recomputed in backward with
``torch.utils.checkpoint``), so only ``[B, heads, q_chunk, T]`` tensors ever exist at once.
The teacher side is always detached.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from raykd.capture import QKV

__all__ = ["attention_kl", "attention_probs", "default_relation_heads", "relation_loss"]

# ---------------------------------------------------------------------------------------------
# attention maps
# ---------------------------------------------------------------------------------------------
def _fp32(fn):
    """Run `fn` with autocast off on every device: attention scores stay fp32 under bf16 autocast
    (a bf16 q·k^T loses the small logit differences the KL measures). Inputs are upcast inside."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapped


def _causal_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    row0: int,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked fp32 attention logits of query rows ``row0..row0+c``.

    q [B,H,c,d], k [B,Hkv,T,d] with Hkv | H (GQA groups as HF repeat_kv, without materializing it);
    key_mask [B,T] bool or None. Returns [B,H,c,T] with -inf at hidden keys (the diagonal is kept).
    """
    B, H, c, d = q.shape
    hkv, T = k.shape[1], k.shape[2]
    if H % hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({hkv})")
    qg = q.float().reshape(B, hkv, H // hkv, c, d)
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)).reshape(B, H, c, T) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    rows = torch.arange(row0, row0 + c, device=q.device)[:, None]
    cols = torch.arange(T, device=q.device)[None, :]
    allowed = cols <= rows  # [c,T]
    if sliding_window is not None:
        allowed = allowed & (cols > rows - sliding_window)
    if key_mask is not None:
        allowed = (key_mask.to(torch.bool)[:, None, :] & allowed) | (cols == rows)  # [B,c,T]
        allowed = allowed[:, None]
    return s.masked_fill(~allowed, float("-inf"))


@_fp32
def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal softmax(q k^T * scaling) in fp32: q [B,H,T,d], k [B,Hkv,T,d] -> [B,H,T,T].

    GQA: query head h uses kv head h // (H // Hkv). Reference helper (materializes the full map).
    """
    return torch.softmax(_causal_logits(q, k, scaling, 0, key_mask, sliding_window, softcap), dim=-1)


def _kl_rows(ls: torch.Tensor, lt: torch.Tensor, average_heads: bool) -> torch.Tensor:
    """Per-row KL(teacher || student) from log-probs ls/lt [B,Hs|Ht,c,T]; -> [B,H',c]."""
    if average_heads:  # log of the head-averaged probabilities; hidden keys (-inf in every head) clamped to a
        # finite floor first: logsumexp over all -inf has a NaN gradient, the clamp passes none back to them
        ls = torch.logsumexp(ls.clamp_min(-1e30), dim=1, keepdim=True) - math.log(ls.shape[1])
        lt = torch.logsumexp(lt.clamp_min(-1e30), dim=1, keepdim=True) - math.log(lt.shape[1])
    pt = lt.exp()
    return torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)


def _chunked_kl(
    qs, ks, sc_s, qt, kt, sc_t, mask, q_chunk, kw_s=None, kw_t=None, checkpoint=True
) -> torch.Tensor:
    """Mean over valid rows and heads of KL(teacher map || student map), chunked over query rows."""
    B, Hs, T, _ = qs.shape
    Ht = qt.shape[1]
    if qt.shape[0] != B or qt.shape[2] != T or ks.shape[2] != T or kt.shape[2] != T:
        raise ValueError(f"student/teacher batch or length differ: {tuple(qs.shape)} vs {tuple(qt.shape)}")
    if q_chunk < 1:
        raise ValueError(f"q_chunk must be >= 1, got {q_chunk}")
    kw_s, kw_t = kw_s or {}, kw_t or {}
    average = Hs != Ht
    qt, kt = qt.detach(), kt.detach()
    if mask is not None:
        mask = mask.to(device=qs.device, dtype=torch.bool)
        if mask.shape != (B, T):
            raise ValueError(f"mask must be [B,T]={B, T}, got {tuple(mask.shape)}")
        n_rows = mask.sum()
    else:
        n_rows = torch.tensor(B * T, device=qs.device)
    heads = 1 if average else Hs

    def chunk_loss(q_s, k_s, row0: int):
        ls = torch.log_softmax(_causal_logits(q_s, k_s, sc_s, row0, mask, **kw_s), dim=-1)
        with torch.no_grad():
            q_t = qt[:, :, row0 : row0 + q_s.shape[2]]
            lt = torch.log_softmax(_causal_logits(q_t, kt, sc_t, row0, mask, **kw_t), dim=-1)
        kl = _kl_rows(ls, lt, average)  # [B,H',c]
        if mask is not None:
            kl = kl * mask[:, None, row0 : row0 + q_s.shape[2]]
        return kl.sum()

    wants_grad = torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad)
    if wants_grad and not average and kw_s.get("softcap") is None:  # the common case: gradient written out
        total = _ClosedFormKL.apply(qs, ks, qt, kt, sc_s, sc_t, mask, q_chunk, kw_s, kw_t)
        return total / (n_rows.clamp_min(1).float() * heads)
    use_ckpt = checkpoint and wants_grad
    total = qs.new_zeros((), dtype=torch.float32)
    for row0 in range(0, T, q_chunk):
        q_s = qs[:, :, row0 : row0 + q_chunk]
        if use_ckpt:
            total = total + _checkpoint(chunk_loss, q_s, ks, row0, use_reentrant=False)
        else:
            total = total + chunk_loss(q_s, ks, row0)
    return total / (n_rows.clamp_min(1).float() * heads)


class _ClosedFormKL(torch.autograd.Function):
    """Σ over valid rows and heads of KL(teacher map || student map), head h matched with head h and no
    student soft-cap, with its gradient built chunk by chunk in the forward: for z = scaling · q k^T,
    dKL/dz = softmax(z) − p_teacher on visible keys (0 on hidden ones), so dq = scaling · G k and
    dk = scaling · Gᵀ q (summed over each GQA group). Nothing [B,H,c,T] is saved and nothing is
    recomputed in backward (the checkpointed autograd path recomputed both maps); only dq [B,H,T,d]
    and dk [B,Hkv,T,d] survive the forward."""

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, sc_s, sc_t, mask, q_chunk, kw_s, kw_t):
        B, H, T, d = qs.shape
        hkv = ks.shape[1]
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device) if need_q else None
        dk = torch.zeros(ks.shape, dtype=torch.float32, device=ks.device) if need_k else None
        k32 = ks.float().unsqueeze(2)  # [B,Hkv,1,T,d]
        total = torch.zeros((), dtype=torch.float32, device=qs.device)
        for row0 in range(0, T, q_chunk):
            q_s = qs[:, :, row0 : row0 + q_chunk]
            c = q_s.shape[2]
            z = _causal_logits(q_s, ks, sc_s, row0, mask, **kw_s)  # [B,H,c,T], -inf at hidden keys
            hidden = torch.isinf(z)
            ls = torch.log_softmax(z, dim=-1)
            lt = torch.log_softmax(_causal_logits(qt[:, :, row0 : row0 + c], kt, sc_t, row0, mask, **kw_t), dim=-1)
            kl = _kl_rows(ls, lt, False)  # [B,H,c]
            pt = lt.exp_()
            rows = None if mask is None else mask[:, None, row0 : row0 + c].float()
            total += (kl if rows is None else kl * rows).sum()
            if dq is None and dk is None:
                continue
            g = ls.exp_().sub_(pt).masked_fill_(hidden, 0.0).mul_(sc_s)  # [B,H,c,T]
            if rows is not None:
                g.mul_(rows[..., None])
            g = g.reshape(B, hkv, H // hkv, c, T)
            if dq is not None:
                dq[:, :, row0 : row0 + c] = torch.matmul(g, k32).reshape(B, H, c, d)
            if dk is not None:
                dk += torch.matmul(g.transpose(-1, -2), q_s.float().reshape(B, hkv, H // hkv, c, d)).sum(2)
        ctx.save_for_backward(dq, dk)
        ctx.dtypes = (qs.dtype, ks.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        dq, dk = ctx.saved_tensors
        out_q = None if dq is None else (dq * grad).to(ctx.dtypes[0])
        out_k = None if dk is None else (dk * grad).to(ctx.dtypes[1])
        return out_q, out_k, None, None, None, None, None, None, None, None


@_fp32
def attention_kl(
    student: QKV,
    teacher: QKV,
    mask: torch.Tensor | None = None,
    q_chunk: int = 256,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Attention-map distillation loss (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020): scalar.

    KL(teacher attention || student attention) for every query row over its causal keys, averaged
    over valid query rows (``mask`` [B,T] True; all rows if None; False positions are also hidden as
    keys), heads and batch. Each side uses its own ``scaling``, sliding window and soft-cap. When the
    two models have the same number of query heads, head h is matched with head h; otherwise the
    head-averaged maps ``mean_h softmax(...)`` [B,T,T] are compared. Computed in fp32 from
    log-softmax over chunks of ``q_chunk`` query rows, so at most [B,H,q_chunk,T] maps per model are
    alive. With equal head counts and no student soft-cap the gradient is written out chunk by chunk
    in the forward (:class:`_ClosedFormKL`: no saved maps, no recompute); otherwise, with
    ``checkpoint`` (and autograd on), each chunk is recomputed in backward. Gradients reach the
    student's q/k only (teacher detached).
    """
    return _chunked_kl(
        student.q, student.k, student.scaling, teacher.q, teacher.k, teacher.scaling, mask, q_chunk,
        {"sliding_window": student.sliding_window, "softcap": student.softcap},
        {"sliding_window": teacher.sliding_window, "softcap": teacher.softcap},
        checkpoint,
    )


def _widths(x) -> dict[str, int]:
    """Concatenated-head widths {'q','k','v'} of a QKV, an HF config, or a model with a config."""
    if isinstance(x, QKV):
        nh, nkv, hd = x.num_heads, x.num_kv_heads, x.head_dim
    else:
        cfg = getattr(x, "config", x)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        nh = cfg.num_attention_heads
        nkv = getattr(cfg, "num_key_value_heads", None) or nh
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    return {"q": nh * hd, "k": nkv * hd, "v": nkv * hd}


def default_relation_heads(student, teacher, kinds: Sequence[str] = ("q", "k", "v"), max_heads: int = 64) -> int:
    """Largest R <= ``max_heads`` dividing every concatenated width involved (for :func:`relation_loss`).

    ``student``/``teacher`` are :class:`QKV` objects, HF configs, or models. The widths are
    ``num_heads*head_dim`` for q and ``num_kv_heads*head_dim`` for k/v (GQA), for both models, over
    ``kinds``. MiniLMv2 uses 48 (base) / 64 (large) relation heads; with GQA the k/v widths are small, so
    R is often limited by gcd of the k/v widths (e.g. SmolLM2-135M: q 576, k/v 192 -> R = 64 if the student
    widths allow it). Always >= 1.
    """
    ws, wt = _widths(student), _widths(teacher)
    g = 0
    for kind in kinds:
        g = math.gcd(g, math.gcd(ws[kind], wt[kind]))
    return max(r for r in range(1, max(1, min(max_heads, g)) + 1) if g % r == 0)


def _relation_heads(x: torch.Tensor, r: int) -> torch.Tensor:
    """[B,n,T,hd] -> concatenate heads [B,T,n*hd] -> R relation heads [B,R,T,n*hd/R]."""
    B, n, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, r, (n * hd) // r).transpose(1, 2)


@_fp32
def relation_loss(
    student: QKV,
    teacher: QKV,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
    kinds: Sequence[str] = ("q", "k", "v"),
    q_chunk: int = 256,
    checkpoint: bool = True,
) -> torch.Tensor:
    """MiniLMv2 multi-head self-attention relation distillation (Wang et al., Findings of ACL 2021): scalar.

    For each kind X in ``kinds`` (q, k, v): concatenate heads to [B,T,W] (W = nh*hd for q, nkv*hd for
    k/v), split into R = ``num_relation_heads`` relation heads of width d_r = W/R, relation
    ``softmax(X_r X_r^T / sqrt(d_r))`` over causal keys [B,R,T,T]; KL(teacher relation || student
    relation) averaged over valid query rows, relation heads and batch; then the mean over kinds.
    Teacher and student may differ in heads and widths (the relation maps are T x T either way);
    R must divide every width. q and k are the post-rotary ones (what the attention actually dots:
    their relations then encode relative position the same way in both models, and they are what
    :class:`Capture` records). No sliding window or soft-cap applies to relations.
    """
    r = int(num_relation_heads)
    for kind in kinds:
        if kind not in ("q", "k", "v"):
            raise ValueError(f"relation kinds must be among q, k, v; got {kind!r}")
        xs, xt = getattr(student, kind), getattr(teacher, kind)
        if xs is None or xt is None:
            raise ValueError(f"relation_loss needs `{kind}` captured for both models (Capture(..., want_v=True))")
        ws, wt = xs.shape[1] * xs.shape[3], xt.shape[1] * xt.shape[3]
        if r < 1 or ws % r or wt % r:
            raise ValueError(
                f"loss.relation_heads={r} must divide the student and teacher {kind} widths ({ws}, {wt}); "
                f"try {default_relation_heads(student, teacher, kinds)}"
            )
    losses = []
    for kind in kinds:
        xs = _relation_heads(getattr(student, kind), r)
        xt = _relation_heads(getattr(teacher, kind), r)
        losses.append(
            _chunked_kl(
                xs, xs, xs.shape[-1] ** -0.5, xt, xt, xt.shape[-1] ** -0.5, mask, q_chunk, checkpoint=checkpoint
            )
        )
    return torch.stack(losses).mean()
