"""Reusable [chunk, V] buffers and the in-place passes the fused LM-head losses share (dense teacher,
`raykd.losses.fused`, and cached top-k targets, `raykd.losses.topk`). Pure torch, no Ray."""

from __future__ import annotations

import torch
from torch import Tensor

from raykd.losses.divergences import _FLOOR


class HeadWorkspace:
    """Reusable [chunk, V] buffers for the closed-form path of `fused_head_losses`.

    Every fresh [chunk, V] tensor costs the kernel a page fault per 4 KiB and the zeroing of its
    memory; on this project's 2-core CPU that was about a third of the LM head's time (≈400 k
    faults, 1.6 GB, per 1,020-token KD step at V = 49,152). A training loop that keeps one
    workspace (`Distiller` does) pays that once. Holds the chunk's two [chunk, V] logits buffers in
    the logits dtype, at most four [ROW_BLOCK, V] fp32 ones on CPU (whole-chunk ones elsewhere, or
    with the class-level KL on) and the casts of heads without gradient (`cast`);
    `fused_head_losses` makes a throw-away one when given none.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self._casts: dict[str, tuple[Tensor, int, Tensor]] = {}  # name -> (source, its version when cast, the cast)

    def cast(self, name: str, w: Tensor, dtype: torch.dtype) -> Tensor:
        """`w` in `dtype`. A weight that takes no gradient (the teacher's head, a frozen student head) is
        cast once and reused while it is the same memory, unmodified (its version counter), instead of
        on every call; the entry keeps its source alive, so equal memory means the same tensor. A head
        the teacher and a frozen student share is cast once for both."""
        if w.dtype == dtype:
            return w
        if w.requires_grad:
            return w.to(dtype)
        for src, version, out in self._casts.values():
            if (src.data_ptr(), src.shape, src.stride(), version, out.dtype) == (w.data_ptr(), w.shape, w.stride(), w._version, dtype):
                return out
        out = w.to(dtype)
        self._casts[name] = (w, w._version, out)
        return out

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A [rows, cols] view of buffer `name` (contents undefined), grown or re-made as needed."""
        b = self._bufs.get(name)
        if b is None or b.dtype != dtype or b.device != device or b.shape[1] != cols or b.shape[0] < rows:
            self._bufs.pop(name, None)
            b = self._bufs[name] = torch.empty(rows, cols, dtype=dtype, device=device)
        return b[:rows]

    @property
    def nbytes(self) -> int:
        bufs = [*self._bufs.values(), *(c for _, _, c in self._casts.values())]
        return sum(b.numel() * b.element_size() for b in bufs)


def _logits_into(ws: HeadWorkspace, name: str, h: Tensor, w: Tensor, b: Tensor | None, cdt: torch.dtype,
                 f: torch.dtype | None = None) -> Tensor:
    """h [C, H] @ w[V, H]^T (+ b) computed in `cdt` into buffer `name`; returned as [C, V] in `f` (a buffer too; None: `cdt`)."""
    out = ws.take(name, h.shape[0], w.shape[0], cdt, h.device)
    torch.mm(h.to(cdt), w.t(), out=out)
    if b is not None:
        out.add_(b)
    return out if f is None or cdt == f else ws.take(name + "32", h.shape[0], w.shape[0], f, h.device).copy_(out)


def _exp_lse(x: Tensor, ws: HeadWorkspace, name: str, normalise: bool = True) -> tuple[Tensor, Tensor]:
    """x [C, V] -> (logsumexp [C, 1], softmax(x) [C, V] in buffer `name`, or exp(x − max) when not
    `normalise`: for the log-sum-exp alone); one exp pass, no fresh [C, V]."""
    m = x.amax(-1, keepdim=True)
    m.masked_fill_(~torch.isfinite(m), 0.0)  # a row of -inf stays -inf, not NaN
    e = torch.sub(x, m, out=ws.take(name, *x.shape, x.dtype, x.device)).exp_()
    ssum = e.sum(-1, keepdim=True)
    return ssum.log().add_(m), e.div_(ssum) if normalise else e


def _scaled_(x: Tensor, temperature: float) -> Tensor:
    """raykd.losses' scaling (÷T, clamp to ±_FLOOR) in place, on a buffer that is ours to overwrite."""
    return (x.div_(temperature) if temperature != 1.0 else x).clamp_(-_FLOOR, _FLOOR)
