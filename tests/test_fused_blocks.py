"""The fused LM-head loss's row blocks and cast cache (raykd.losses.fused / workspace): every block size gives
the same loss and gradients as whole-chunk passes and autograd; a head without gradient is cast once."""
from __future__ import annotations

import pytest
import torch
from test_fused import _head, _leaves

from raykd import losses as L
from raykd.losses import fused as fused_mod


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kd,T,ce_w,topk", [("forward_kl", 1.0, 0.7, False), ("reverse_kl", 2.0, 0.7, False),
                                             ("forward_kl", 2.0, 0.0, False), (None, 1.0, 1.0, False),
                                             ("forward_kl", 1.0, 0.7, True), ("reverse_kl", 2.0, 0.7, True)])
def test_fused_row_blocks_change_nothing(kd, T, ce_w, topk, autocast, monkeypatch):
    """The closed form's elementwise passes over ROW_BLOCK rows at a time (1, 3, or the whole chunk at
    once) give the same loss and gradients, equal to autograd's, with a CE row mask, dense or top-k teacher targets, in fp32
    and under bf16 autocast (where each block's gradient is written back into the bf16 logits buffer)."""
    sh, sw, th, tw, y, mask, _, _ = _head(n=45, hs=32, ht=32, v=64, seed=33, dtype=torch.float32)
    ce_mask = torch.arange(45) % 4 != 0
    target = L.teacher_topk(th @ tw.T, 9) if topk else th

    def run(block):
        monkeypatch.setattr(fused_mod, "ROW_BLOCK", block)
        x, w = _leaves(sh, sw)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, terms = L.fused_head_losses(x, w, None if kd is None else target, None if kd is None or topk else tw, y,
                                               mask, kd=kd or "forward_kl", temperature=T, ce_weight=ce_w, chunk_size=20,
                                               ce_mask=ce_mask)
        total.backward()
        return total.detach(), *terms.values(), x.grad, w.grad

    whole = run(1000)
    for block in (1, 3):
        for a, b in zip(run(block), whole):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(fused_mod, "CLOSED_FORM", frozenset())  # and all of them equal autograd's gradients
    tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(run(3), whole):
        torch.testing.assert_close(a, b, **tol)


def test_frozen_head_is_cast_once_and_follows_changes():
    """Under bf16 autocast a head without gradient (the teacher's, a frozen student's, or one tensor shared by
    both) is cast to bf16 once and reused across calls, with the same results as a fresh cast; changed in place
    (its version moves) it is cast again; a trained head is never kept."""
    sh, sw, th, _, y, mask, _, _ = _head(n=40, hs=32, ht=32, v=64, seed=34, dtype=torch.float32)
    head = sw.clone()  # frozen, and the teacher's too (the teacher hidden has the same width)
    ws = fused_mod.HeadWorkspace()

    def run(workspace, weight=head):
        x = sh.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _ = L.fused_head_losses(x, weight, th, head.detach(), y, mask, chunk_size=16, workspace=workspace)
        total.backward()
        return total.detach(), x.grad

    first = run(ws)
    casts = {k: c.data_ptr() for k, (_, _, c) in ws._casts.items()}
    assert list(casts) == ["sw"]  # the teacher's detached view of the same memory found the student's cast
    for a, b in zip(run(ws), first):
        assert torch.equal(a, b)
    assert {k: c.data_ptr() for k, (_, _, c) in ws._casts.items()} == casts  # reused, not cast again
    for a, b in zip(run(None), first):
        assert torch.equal(a, b)
    head.mul_(0.5)  # an in-place change: the kept cast is stale and must not be used
    for a, b in zip(run(ws), run(None)):
        assert torch.equal(a, b)
    trained = sw.clone().requires_grad_()
    fresh = fused_mod.HeadWorkspace()
    run(fresh, trained)
    assert "sw" not in fresh._casts and "tw" in fresh._casts


def test_row_blocks_are_for_the_cpu_only():
    """On CPU the passes run over ROW_BLOCK / AUTOGRAD_ROW_BLOCK rows; on an accelerator, where a block is a
    kernel launch rather than a cache-sized piece, over the whole chunk."""
    assert fused_mod.row_block(torch.device("cpu"), 256, fused_mod.ROW_BLOCK) == fused_mod.ROW_BLOCK < 256
    assert fused_mod.row_block(torch.device("cuda", 0), 256, fused_mod.ROW_BLOCK) == 256
    assert fused_mod.row_block(torch.device("cuda"), 256, fused_mod.AUTOGRAD_ROW_BLOCK) == 256
