"""Sparse (top-k) teacher targets for logit KD: what the teacher cache stores, and the losses on it.

A teacher distribution p over V tokens is kept as its k most probable tokens plus the mass
of the rest ("tail"), as DistillKit stores offline teacher logits, but with the tail kept
explicitly instead of renormalising over the top k:

    idx   [N, k] int   the top-k token ids (at temperature 1)
    logp  [N, k]       log p_i of those tokens, normalised over the FULL vocabulary
    tail  [N]    fp32  log(1 - sum_i p_i) = log of the mass outside the top k (-inf when k == V)

A logit loss D(p || q) is then computed on the (k+1)-bin distributions: the k kept tokens
and one bin that pools the other V-k tokens, for the teacher and the student alike
(the student's bins come from its full softmax). By the log-sum inequality this collapsed
KL is a lower bound of the full KL and equals it when k == V; the error shrinks as k grows
and the tail mass vanishes (tested against the dense losses).

Temperature T != 1: the top-k log-probs scale exactly (log p_i / T up to a constant); the
tail's shape is unknown, so it is taken as spread evenly over its V-k tokens, each with
log-mass tail - log(V-k), raised to 1/T. Exact at T = 1, an approximation otherwise
(documented; the dense teacher is exact at every T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from raykd.losses.divergences import SPARSE_UNSUPPORTED, TOKEN_LOSSES, check_logit_loss

_NEG = -1e30  # an "empty" bin: probability 0 without -inf arithmetic


@dataclass
class TopK:
    """Sparse teacher targets; leading dims are free ([N, k] / [B, T, k] with tail [N] / [B, T])."""

    idx: Tensor  # [..., k] token ids (int32 / int64)
    logp: Tensor  # [..., k] log-probs over the full vocabulary (fp16 / bf16 / fp32)
    tail: Tensor  # [...] log of the mass outside the top k (fp32; -inf or very negative when empty)
    vocab: int  # V, the teacher's vocabulary size

    @property
    def k(self) -> int:
        return self.idx.shape[-1]

    def rows(self, rows) -> TopK:
        """Index the leading (token) dimension of flat [N, k] targets."""
        return TopK(self.idx[rows], self.logp[rows], self.tail[rows], self.vocab)

    def flat(self) -> TopK:
        """[..., k] -> [N, k]."""
        return TopK(self.idx.reshape(-1, self.k), self.logp.reshape(-1, self.k), self.tail.reshape(-1), self.vocab)

    def shifted(self) -> TopK:
        """[B, T, k] -> [B*(T-1), k]: the targets of positions 0..T-2 (next-token prediction)."""
        return TopK(self.idx[:, :-1], self.logp[:, :-1], self.tail[:, :-1], self.vocab).flat()

    def to(self, device) -> TopK:
        return TopK(self.idx.to(device), self.logp.to(device), self.tail.to(device), self.vocab)


@torch.no_grad()
def teacher_topk(logits: Tensor, k: int) -> TopK:
    """Top-k of teacher logits [N, V] at temperature 1, with the exact tail mass."""
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"teacher.cache_topk: must be between 1 and the vocabulary size {v}, got {k}")
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
    vals, idx = torch.topk(z, k, dim=-1)
    rest = z.scatter(-1, idx, float("-inf"))
    tail = (torch.logsumexp(rest, dim=-1, keepdim=True) - lse).squeeze(-1) if k < v else torch.full_like(lse.squeeze(-1), float("-inf"))
    return TopK(idx.to(torch.int32), vals - lse, tail, v)


def _teacher_bins(t: TopK, temperature: float, dtype: torch.dtype) -> Tensor:
    """[N, k+1] unnormalised log-weights of the teacher's bins at `temperature`."""
    logp = t.logp.to(dtype) / temperature
    rest = t.vocab - t.k
    if rest == 0:
        tail = torch.full_like(t.tail, _NEG, dtype=dtype)
    else:  # the tail spread evenly over its `rest` tokens, each raised to 1/T
        lr = math.log(rest)
        tail = (lr + (t.tail.to(dtype) - lr) / temperature).clamp_min(_NEG)
    return torch.cat([logp, tail.unsqueeze(-1)], dim=-1)


def _student_bins(student_logits: Tensor, t: TopK, temperature: float) -> Tensor:
    """[N, k+1] log-probs of the student's bins (full softmax at `temperature`, then pooled)."""
    z = student_logits.to(_dtype(student_logits)) / temperature
    logq = torch.log_softmax(z.clamp(-1e30, 1e30), dim=-1)  # [N, V]
    idx = t.idx.long()
    top = logq.gather(-1, idx)
    if t.vocab - t.k == 0:
        tail = torch.full_like(top[:, :1], _NEG)
    else:
        tail = torch.logsumexp(logq.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True).clamp_min(_NEG)
    return torch.cat([top, tail], dim=-1)


def sparse_bins(student_logits: Tensor, teacher: TopK, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(student, teacher) [N, k+1] bin log-weights; any `raykd.losses.TOKEN_LOSSES` entry called on
    them at temperature 1 gives the sparse loss (its log_softmax normalises the teacher's bins)."""
    if student_logits.shape[-1] != teacher.vocab:
        raise ValueError(f"student logits have {student_logits.shape[-1]} classes, the cached teacher {teacher.vocab}; KD needs a shared vocabulary")
    if not temperature > 0:
        raise ValueError(f"loss.temperature: must be > 0, got {temperature!r}")
    return _student_bins(student_logits, teacher, temperature), _teacher_bins(teacher, temperature, _dtype(student_logits))


def _dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # losses run in fp32, fp64 stays fp64


def sparse_logit_loss(name: str, student_logits: Tensor, teacher: TopK, mask: Tensor | None = None,
                      temperature: float = 1.0, **params) -> Tensor:
    """LOGIT_LOSSES[name] with top-k teacher targets: student_logits [N, V], teacher TopK [N, k],
    mask [N] bool -> scalar mean over unmasked tokens, T² scaled (as the dense registry)."""
    check_logit_loss(name, params)
    if name in SPARSE_UNSUPPORTED:
        raise ValueError(f"loss.kd: {name} needs the dense teacher distribution; the teacher cache serves "
                         f"{', '.join(n for n in TOKEN_LOSSES if n not in SPARSE_UNSUPPORTED)}")
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student_logits, teacher = student_logits[keep], teacher.rows(keep)
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s, t = sparse_bins(student_logits, teacher, temperature)
    return TOKEN_LOSSES[name](s, t, 1.0, **params).mean() * temperature ** 2


@torch.no_grad()
def closed_form_kd(u: Tensor, teacher: TopK, kd: str, temperature: float, a: float, c, need_grad: bool, tgt: Tensor | None = None):
    """Forward or reverse KL on the (k+1)-bin distributions with the gradient written out, in place in `u`
    (what `sparse_bins` + autograd computes, at a fraction of its passes over [C, V]).

    u [C, V]: the student's logits over the temperature (fp32 / fp64, a buffer this function
    overwrites), teacher [C, k] top-k targets, tgt [C] or None. With q = softmax(u), Q its bins
    (Q_i = q at the teacher's i-th token, Q_tail = the rest's mass) and P the teacher's bins at
    `temperature`, the derivative of KL(P‖Q) with respect to u_j is q_j − P_i at the i-th kept token
    and q_j − P_tail · q_j / Q_tail elsewhere; of KL(Q‖P) it is q_j · (D_b − KL), D_b = log Q_b − log P_b
    of j's bin b. Returns (kd_sum [] without T², g [C, V] = a · dKL/du + c · q in u's buffer or None,
    −log q at tgt [C, 1] or None); `c` a number or [C, 1] (a CE sharing q, at T = 1)."""
    f = u.dtype
    idx = teacher.idx.long()
    m = u.amax(-1, keepdim=True)
    m.masked_fill_(~torch.isfinite(m), 0.0)
    u_top = u.gather(1, idx)  # [C, k]
    u_tgt = None if tgt is None else u.gather(1, tgt[:, None])
    e = u.sub_(m).exp_()  # exp(u − m): q times the row's sum
    ssum = e.sum(-1, keepdim=True)
    lse = ssum.log().add_(m)
    e.scatter_(1, idx, 0.0)  # the tail's exps only
    tail = e.sum(-1, keepdim=True)
    logq = torch.cat([u_top - lse, (tail.log() - ssum.log()).clamp_min(_NEG)], dim=-1)  # [C, k+1]
    logp = torch.log_softmax(_teacher_bins(teacher, temperature, f), dim=-1)
    nll = None if u_tgt is None else lse - u_tgt
    if kd == "forward_kl":
        p = logp.exp()
        kd_sum = (p * (logp - logq)).sum()
    elif kd == "reverse_kl":
        q = logq.exp()
        diff = logq - logp  # D_b
        rows = (q * diff).sum(-1, keepdim=True)  # KL(Q‖P) per row
        kd_sum = rows.sum()
    else:
        raise ValueError(f"closed_form_kd: {kd} has no written-out sparse gradient (forward_kl and reverse_kl do)")
    if not need_grad:
        return kd_sum, None, nll
    q_top = logq[:, :-1].exp()
    if kd == "forward_kl":  # tail: q_j·(a + c) − a·P_tail·e_j / tail; kept: q·(a + c) − a·P_i
        coef = (a + c) / ssum - a * p[:, -1:] / tail.clamp_min(1e-30)
        top = q_top * (a + c) - a * p[:, :-1]
    else:  # q_j·(a·(D_b − KL) + c)
        coef = (a * (diff[:, -1:] - rows) + c) / ssum
        top = q_top * (a * (diff[:, :-1] - rows) + c)
    return kd_sum, e.mul_(coef).scatter_(1, idx, top), nll
