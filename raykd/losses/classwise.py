"""The class-level KL of class-aware logit KD over chunks of tokens, so that neither model's [N, V]
logits exist at once (the chunked form of `raykd.losses.class_kl`; the fused LM head calls it).

Class-aware logit KD (CLKD: Zhang, Liu, Hopcroft, He 2022, "Class-aware Information for Logit-based
Knowledge Distillation", arXiv:2211.14773) also matches the logits column by column: with
S = student_logits / T and U = teacher_logits / T over the batch's n tokens ([n, V]), each
vocabulary entry c gets distributions over the tokens, P[:, c] = softmax(U[:, c]) and
Q[:, c] = softmax(S[:, c]), and

    loss = T² / V' · Σ_c KL(P[:, c] ‖ Q[:, c])        (V' = columns the teacher gives any mass)

A softmax over dim 0 needs every token of a column, so it runs in two passes over the row chunks:

1. the column log-sum-exps lse_S, lse_U [V] by an online (running max, rescaled sum) log-sum-exp;
2. per chunk, log Q = S − lse_S and log P = U − lse_U, the loss Σ P·(log P − log Q), and its
   gradient. lse_S depends on every row, but Σ_i P[i, c] = 1 makes it drop out:
   KL_c = Σ_i P log P − Σ_i P[i, c]·S[i, c] + lse_S[c], and d lse_S[c] / d S[i, c] = Q[i, c], so
   d KL_c / d S[i, c] = Q[i, c] − P[i, c]; through S = z / T and the T² / V' factor,
   d loss / d z[i, c] = T·(Q[i, c] − P[i, c]) / V' (0 in the left-out columns). Each chunk's
   gradient therefore needs only its own rows and the two [V] column LSEs.

Pure torch, no Ray. Only [V] vectors and a few [chunk, V] buffers exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from raykd.losses.divergences import _FLOOR


def column_lse(chunks: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Log-sum-exp over the rows of a stream of [C, V] chunks (finite, e.g. clamped, values; each chunk
    is a buffer this overwrites) -> (lse [V], column max [V]); one running max and rescaled sum."""
    m = total = None
    for x in chunks:
        cm = x.amax(0)
        new = cm if m is None else torch.maximum(m, cm)
        part = x.sub_(new).exp_().sum(0)
        total = part if total is None else total.mul_((m - new).exp_()).add_(part)
        m = new
    if m is None:
        raise ValueError("column_lse: no rows")
    return total.log().add_(m), m


def class_kl_chunked(logits: Callable[[str, object], Tensor], row_chunks: Sequence, temperature: float,
                     weight: float, need_grad: bool, on_grad: Callable[[object, Tensor], None],
                     scratch: Callable[[int, int], Tensor]) -> Tensor:
    """T² · class-level KL over the rows of `row_chunks` (see the module docstring), one chunk at a time.

    logits(side, rows): the scaled, clamped logits [C, V] (side "s": student z/T, "t": teacher) of
    those rows, in fp32/fp64, in a buffer this may overwrite (each side its own); called twice per
    chunk and side. scratch(C, V): a third [C, V] buffer. on_grad(rows, g): receives
    g [C, V] = weight · d loss / d z of those rows (a buffer, used before the next call) when
    `need_grad`. Returns the loss, a scalar. `row_chunks` must hold at least one row.
    """
    T = float(temperature)
    lse_s, _ = column_lse(logits("s", r) for r in row_chunks)
    lse_t, max_t = column_lse(logits("t", r) for r in row_chunks)
    live = (max_t > -_FLOOR).to(lse_t.dtype)  # [V]: 0 where the teacher's column is -inf throughout (padded vocabulary)
    n_live = live.sum().clamp_min(1)
    grad_col = live * (weight * T) / n_live  # [V]: weight · T / V' in the live columns, 0 elsewhere
    total = torch.zeros((), dtype=lse_t.dtype, device=lse_t.device)
    for rows in row_chunks:
        logq = logits("s", rows).sub_(lse_s)  # [C, V] log Q
        logp = logits("t", rows).sub_(lse_t)  # [C, V] log P
        p = torch.exp(logp, out=scratch(*logp.shape)).mul_(live)  # P, 0 in left-out columns
        total += logp.sub_(logq).mul_(p).sum()  # Σ P·(log P − log Q); every log is finite, so 0·log = 0
        if need_grad:
            on_grad(rows, logq.exp_().sub_(p).mul_(grad_col))  # weight · T·(Q − P) / V'
    return total * (T * T) / n_live
