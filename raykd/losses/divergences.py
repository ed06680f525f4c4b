"""Distillation losses for causal LMs (pure torch, no Ray).

Conventions: N tokens (leading batch dims are flattened), V vocabulary, H hidden width.
p = softmax(teacher_logits / T) and q = softmax(student_logits / T). Losses run in fp32
(fp64 stays fp64) whatever the input dtype, via log_softmax/logsumexp; 0·log 0 terms are
exactly 0 in value and gradient. A mask is bool [N], True = the token counts: masked rows
are removed by index selection before any math, so they add nothing and get exactly zero
gradient even if they hold garbage; the mean is over the True rows, and an all-False mask
gives 0 (graph intact). ``mask=None`` means every token counts. Scaled logits are clamped to
±1e30, so -inf logits (e.g. a padded vocabulary, in both models) act as probability 0.

Two kinds of logit loss share the `LOGIT_LOSSES` signature: per-token ones (`TOKEN_LOSSES`, a
masked mean over tokens; what `loss.kd` names) and batch-level ones (`BATCH_LOSSES`: class-wise
KL over the batch's tokens, weighted by its own `loss.weights.class_kd`; `loss.kd` refuses them).
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "dkd",
    *(f"{n}_per_token" for n in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                 "skew_reverse_kl", "tvd", "dkd")),
    "class_kl", "TOKEN_LOSSES", "BATCH_LOSSES", "LOGIT_LOSSES", "LOSS_PARAMS", "NEEDS_TARGETS", "SPARSE_UNSUPPORTED",
    "check_logit_loss",
    "suggest", "cross_entropy", "HIDDEN_LOSSES",
    "mse_hidden", "cosine_hidden", "nmse_hidden",
]


_FLOOR = 1e30  # scaled logits are clamped to ±_FLOOR so that -inf logits cannot make NaNs


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    z = _upcast(logits) / temperature  # always a fresh tensor, so the in-place clamp is safe
    return z.clamp_(-_FLOOR, _FLOOR)


def _pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float, dim: int = -1):
    """Return (log q, log p), both [N, V] in fp32/fp64, normalised over `dim` (-1: over the vocabulary)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; KD needs a shared vocabulary")
    if not temperature > 0:
        raise ValueError(f"loss.temperature: must be > 0, got {temperature!r}")
    logq = torch.log_softmax(_scaled(student_logits, temperature), dim=dim)
    logp = torch.log_softmax(_scaled(teacher_logits, temperature), dim=dim)
    return logq, logp


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last dim. Every log-prob here is finite (the
    logits are clamped), so where p underflows to 0 the term is 0·finite = 0, gradient too."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(w: float, loga: Tensor, logb: Tensor) -> Tensor:
    """log(w·a + (1−w)·b) computed in log space, for w in [0, 1]."""
    if w <= 0:
        return logb
    if w >= 1:
        return loga
    return torch.logaddexp(loga + math.log(w), logb + math.log1p(-w))


# ----------------------------------------------------------------------------- per-token losses
# Each takes student_logits [N, V], teacher_logits [N, V] (any float dtype) and returns [N]
# fp32 (fp64 for fp64 inputs), without the T² factor and without a mask.

def forward_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL(p‖q), mode-covering; the classic KD loss (Hinton et al. 2015). -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    return _kl(logp, logq)


def reverse_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Reverse KL(q‖p), mode-seeking (MiniLLM, Gu et al. ICLR 2024). -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    return _kl(logq, logp)


def jsd_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  beta: float = 0.5) -> Tensor:
    """Generalised JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q
    (GKD, Agarwal et al. ICLR 2024). β=0.5 is the symmetric JSD; β∈{0,1} gives exactly 0.
    Note: TRL's GKDTrainer special-cases β=0/1 as forward/reverse KL; this follows the formula. -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    logm = _log_mix(beta, logp, logq)
    out = logq[..., 0] * 0  # keeps the student in the graph when beta == 1
    if beta > 0:
        out = out + beta * _kl(logp, logm)
    if beta < 1:
        out = out + (1 - beta) * _kl(logq, logm)
    return out


def skew_forward_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                              alpha: float = 0.1) -> Tensor:
    """Skew KL: KL(p ‖ α·p + (1−α)·q) (DistiLLM, Ko et al. ICML 2024); α=0 is forward KL. -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    return _kl(logp, _log_mix(alpha, logp, logq))


def skew_reverse_kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                              alpha: float = 0.1) -> Tensor:
    """Skew reverse KL: KL(q ‖ α·q + (1−α)·p) (DistiLLM, Ko et al. ICML 2024); α=0 is reverse KL. -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    return _kl(logq, _log_mix(alpha, logq, logp))


def tvd_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½·Σ|p − q|, in [0, 1] (used as a KD objective e.g. in
    Wen et al. 2023, "f-Divergence Minimization for Sequence-Level KD"). -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def dkd_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, *,
                  targets: Tensor, alpha: float = 1.0, beta: float = 8.0) -> Tensor:
    """Decoupled KD (Zhao et al. CVPR 2022): α·KL(b_p‖b_q) + β·KL(p̂‖q̂), where b_x =
    [x_target, 1 − x_target] and p̂, q̂ are the non-target distributions renormalised
    (target logit masked out, then log_softmax). targets: [N] long token ids. -> [N]."""
    logq, logp = _pair(student_logits, teacher_logits, temperature)
    idx = targets.reshape(-1, 1).long()

    def split(logx: Tensor):
        log_t = logx.gather(-1, idx).squeeze(-1)
        logx_nt = logx.scatter(-1, idx, -_FLOOR)  # target removed; p_target becomes exactly 0
        log_nt = torch.logsumexp(logx_nt, -1)  # log(1 − x_target), stable when x_target ≈ 1
        return torch.stack([log_t, log_nt], -1), logx_nt - log_nt.unsqueeze(-1)

    bq, hat_q = split(logq)
    bp, hat_p = split(logp)
    return alpha * _kl(bp, bq) + beta * _kl(hat_p, hat_q)


TOKEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "jsd": jsd_per_token,
    "skew_forward_kl": skew_forward_kl_per_token,
    "skew_reverse_kl": skew_reverse_kl_per_token,
    "tvd": tvd_per_token,
    "dkd": dkd_per_token,
}

LOSS_PARAMS: dict[str, dict[str, float]] = {
    "forward_kl": {}, "reverse_kl": {}, "tvd": {},
    "jsd": {"beta": 0.5},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "dkd": {"alpha": 1.0, "beta": 8.0},
}

NEEDS_TARGETS = frozenset({"dkd"})  # losses whose per-token fn takes targets=[N] token ids

# (loss, param) -> (low, high, high_inclusive, text)
_RANGES = {
    ("jsd", "beta"): (0.0, 1.0, True, "[0, 1]"),
    ("skew_forward_kl", "alpha"): (0.0, 1.0, False, "[0, 1)"),
    ("skew_reverse_kl", "alpha"): (0.0, 1.0, False, "[0, 1)"),
    ("dkd", "alpha"): (0.0, math.inf, False, ">= 0"),
    ("dkd", "beta"): (0.0, math.inf, False, ">= 0"),
}


def _flatten_rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _masked_mean_loss(name: str, token_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
             temperature: float = 1.0, **params) -> Tensor:
        s, t = _flatten_rows(student_logits), _flatten_rows(teacher_logits)
        n = s.shape[0]
        params = {k: (v.reshape(n) if torch.is_tensor(v) and v.numel() == n else v) for k, v in params.items()}
        if mask is not None:
            mask = mask.reshape(n).bool()
            s, t = s[mask], t[mask]
            params = {k: (v[mask] if torch.is_tensor(v) and v.dim() == 1 else v) for k, v in params.items()}
            count = mask.sum().clamp_min(1)
        else:
            count = max(n, 1)
        return token_fn(s, t, temperature, **params).sum() / count * (temperature * temperature)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = (f"Masked mean of {token_fn.__name__} × T².\n\n"
                    f"student_logits, teacher_logits: [N, V]; mask: [N] bool or None -> scalar.\n\n"
                    f"{token_fn.__doc__}")
    return loss


forward_kl = _masked_mean_loss("forward_kl", forward_kl_per_token)
reverse_kl = _masked_mean_loss("reverse_kl", reverse_kl_per_token)
jsd = _masked_mean_loss("jsd", jsd_per_token)
skew_forward_kl = _masked_mean_loss("skew_forward_kl", skew_forward_kl_per_token)
skew_reverse_kl = _masked_mean_loss("skew_reverse_kl", skew_reverse_kl_per_token)
tvd = _masked_mean_loss("tvd", tvd_per_token)
dkd = _masked_mean_loss("dkd", dkd_per_token)


# ----------------------------------------------------------------------------- batch-level losses
def class_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
             temperature: float = 1.0) -> Tensor:
    """Class-level KL of class-aware logit KD (CLKD: Zhang, Liu, Hopcroft, He 2022, "Class-aware
    Information for Logit-based Knowledge Distillation", arXiv:2211.14773): each vocabulary entry c
    is a distribution over the batch's n unmasked tokens, P[:, c] = softmax(U[:, c]) and
    Q[:, c] = softmax(S[:, c]) with U = teacher/T, S = student/T ([n, V], softmax over dim 0), and

        loss = T² · mean over the columns c of Σ_i P[i, c]·(log P[i, c] − log Q[i, c])

    student_logits, teacher_logits: [N, V] (leading dims flattened); mask: [N] bool or None -> scalar.
    Not a per-token loss: its value depends on every token of the batch. Columns whose teacher
    logits are -inf on every token (a padded vocabulary) are left out of the mean, so padding equals
    dropping the column; fewer than one token gives 0 (graph intact). Gradient (the same as forward
    KL's, transposed): d loss / d student_logits[i, c] = T·(Q[i, c] − P[i, c]) / (live columns).
    """
    s, t = _flatten_rows(student_logits), _flatten_rows(teacher_logits)
    if mask is not None:
        keep = mask.reshape(s.shape[0]).bool()
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        _pair(s, t, temperature)  # the shape and temperature checks still apply
        return _upcast(s).sum() * 0.0
    logq, logp = _pair(s, t, temperature, dim=0)
    live = (_scaled(t.detach(), temperature).amax(0) > -_FLOOR)  # [V]: columns the teacher gives any mass
    per_class = _kl(logp.t(), logq.t())  # [V]
    return per_class[live].sum() / live.sum().clamp_min(1) * (temperature * temperature)


BATCH_LOSSES: dict[str, Callable[..., Tensor]] = {"class_kl": class_kl}  # weighted by loss.weights.class_kd, never loss.kd
LOSS_PARAMS["class_kl"] = {}
# need the dense teacher distribution (dkd: the target's share; class_kl: every token's logits): not served by cached top-k
SPARSE_UNSUPPORTED = NEEDS_TARGETS | frozenset(BATCH_LOSSES)

LOGIT_LOSSES: dict[str, Callable[..., Tensor]] = {**{n: globals()[n] for n in TOKEN_LOSSES}, **BATCH_LOSSES}


def suggest(name: str, choices) -> str:
    """"did you mean 'x'?" for the closest of `choices` to `name` (difflib), or "" if none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def check_logit_loss(name: str, params: dict | None) -> None:
    """Validate a logit-loss name and its user params; raise a one-line ValueError naming the
    config field (``loss.kd`` / ``loss.kd_params.<param>``) and the fix. ``loss.kd`` takes the
    per-token losses (`TOKEN_LOSSES`) only: a batch-level one is refused, pointing at its weight."""
    if name in BATCH_LOSSES:
        raise ValueError(f"loss.kd: {name} is a batch-level (class-wise) loss, not a per-token one; set "
                         f"loss.weights.class_kd to use it beside loss.kd (e.g. loss.kd=forward_kl loss.weights.class_kd=0.5)")
    if name not in TOKEN_LOSSES:
        hint = suggest(name, TOKEN_LOSSES)
        raise ValueError(f"loss.kd: unknown logit loss {name!r}; {hint + ' ' if hint else ''}"
                         f"choose one of: {', '.join(TOKEN_LOSSES)}")
    allowed = LOSS_PARAMS[name]
    for key, value in (params or {}).items():
        field = f"loss.kd_params.{key}"
        if key not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            extra = "; targets come from the batch labels" if key == "targets" and name in NEEDS_TARGETS else ""
            hint = suggest(key, allowed)
            raise ValueError(f"{field}: {name!r} takes no parameter {key!r}; "
                             f"{hint + ' ' if hint else ''}it takes: {takes}{extra}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{field}: {name} {key} must be a number, got {value!r}; "
                             f"e.g. {key}: {allowed[key]}")
        lo, hi, hi_incl, text = _RANGES[(name, key)]
        if not (value >= lo and (value <= hi if hi_incl else value < hi)):
            raise ValueError(f"{field}: {name} {key} must be {'in ' if text[0] == '[' else ''}{text}, "
                             f"got {value!r}; set it {'within' if text[0] == '[' else 'to a value'} "
                             f"{text} (default {allowed[key]})")


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token CE over True rows of `mask`. logits [N, V], targets [N] long,
    mask [N] bool -> scalar (fp32 math)."""
    x = _flatten_rows(logits)
    n = x.shape[0]
    y = targets.reshape(n).long()
    if mask is not None:
        mask = mask.reshape(n).bool()
        x, y, count = x[mask], y[mask], mask.sum().clamp_min(1)
    else:
        count = max(n, 1)
    return F.cross_entropy(_upcast(x), y, reduction="sum") / count


# ----------------------------------------------------------------------------- hidden states
def _select_hidden(student: Tensor, teacher: Tensor, mask: Tensor | None):
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden {tuple(student.shape)} vs teacher hidden {tuple(teacher.shape)}: "
                         "project the student to the teacher's width first")
    s, t = _upcast(_flatten_rows(student)), _upcast(_flatten_rows(teacher))
    if mask is None:
        return s, t, max(s.shape[0], 1)
    mask = mask.reshape(s.shape[0]).bool()
    return s[mask], t[mask], mask.sum().clamp_min(1)


def mse_hidden(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of the feature-mean squared error; with a learned student→teacher
    projection this is the FitNets hint loss (Romero et al. ICLR 2015). [N, H] x2 -> scalar."""
    s, t, count = _select_hidden(student, teacher, mask)
    return (s - t).pow(2).mean(-1).sum() / count


def cosine_hidden(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of 1 − cos(s, t) (DistilBERT's cosine embedding loss, Sanh et al. 2019).
    [N, H] x2 -> scalar."""
    s, t, count = _select_hidden(student, teacher, mask)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum() / count


def nmse_hidden(student: Tensor, teacher: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Mean over tokens of ‖s − t‖² / (‖t‖² + eps): MSE normalised by the teacher's scale,
    robust to the very different norms across layers. [N, H] x2 -> scalar."""
    s, t, count = _select_hidden(student, teacher, mask)
    return ((s - t).pow(2).sum(-1) / (t.pow(2).sum(-1) + eps)).sum() / count


HIDDEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse_hidden, "cosine": cosine_hidden, "nmse": nmse_hidden,
}

