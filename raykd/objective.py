"""The one multi-task distillation objective (feature-alignment KD: "Feature Alignment-Based Knowledge
Distillation for Efficient Compression"; hidden/attention terms after FitNets, TinyBERT and MiniLM):

    loss = w_ce * CE(data) + w_kd * D(p_teacher || q_student)             output distributions
         + w_class_kd * mean_c KL(P_teacher[:, c] || Q_student[:, c])     class-wise: each vocabulary entry over the batch's tokens
         + w_hidden * mean_pairs H(P(h_student_s), h_teacher_t)           hidden states
         + w_attention * mean_pairs KL(A_teacher_t || A_student_s)        attention maps
         + w_relation * mean_pairs MiniLMv2(Q/K/V relations)              attention relations
         + w_blockwise * mean_pairs D(p_teacher || teacher_upper(P(h_s)))  block-wise logit KD

`Distiller` holds the student and the learned projections P, so that DDP / FSDP / DeepSpeed
wrap it whole and every trainable parameter is used inside its forward. The frozen teacher
runs outside it (`teacher_forward`, no grad) and captures only what the active terms need:
hidden states of mapped layers, q/k/v of attention-mapped layers. Terms with weight 0 cost
nothing. No Ray and no torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raykd.capture import QKV, Capture, run_layers
from raykd.config import LossConfig, _build
from raykd.layer_map import Projections
from raykd.losses.attention import attention_kl, default_relation_heads, relation_loss
from raykd.losses.divergences import HIDDEN_LOSSES
from raykd.losses.fused import HeadWorkspace, fused_head_losses
from raykd.losses.topk import TopK
from raykd.spec import Needs, ObjectiveSpec


@dataclass
class TeacherOutputs:
    last_hidden: torch.Tensor  # [B, T, Ht] after the final norm
    hidden: dict[int, torch.Tensor]  # teacher layer -> [B, T, Ht] output of that layer
    qkv: dict[int, QKV]  # teacher layer -> rotated q/k (and v)
    layer_inputs: dict[int, dict]  # decoder-layer kwargs (attention mask, rotary) for re-running layers
    model: nn.Module | None  # the teacher itself (its head for KD; block-wise KD runs its upper layers); None when cached
    topk: TopK | None = None  # cached sparse targets [B, T, k] (teacher cache): KD reads these instead of the head
    head: tuple | None = None  # (weight [V, H], bias [V] | None): the teacher's LM head when `model` is None (a dense cache)


def head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, H] and bias [V] (or None)."""
    out = model.get_output_embeddings()
    return out.weight, getattr(out, "bias", None)


def forward_with_capture(model, input_ids: torch.Tensor, needs: Needs):
    """Run the base model (no LM head): final normed hidden [B, T, H] and the capture."""
    with Capture(model, hidden=needs.hidden, qkv=needs.qkv, layer_inputs=needs.layer_inputs, want_v=needs.want_v) as cap:
        last = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return last, cap


@torch.no_grad()
def teacher_forward(teacher, input_ids: torch.Tensor, needs: Needs) -> TeacherOutputs:
    last, cap = forward_with_capture(teacher, input_ids, needs)
    return TeacherOutputs(last, dict(cap.hidden), dict(cap.qkv), dict(cap.layer_inputs), teacher)


class Distiller(nn.Module):
    """student + projections; forward(input_ids [B, T], TeacherOutputs, mask [B, T] | None) -> (loss, terms).

    Next-token targets come from `input_ids` (packed blocks, no padding): positions 0..T-2
    predict 1..T-1. `mask` (bool, optional) marks real tokens; a position counts when it and
    its target are both real. `eval_ce` (validation, no backward) always fills terms["ce"],
    even when the CE weight is 0 (the total is then not the training objective). `data_mask`
    (bool [B, T], optional; on-policy KD, `raykd.onpolicy`) marks the tokens that come from the
    data: CE counts only positions whose target is one, every other term counts all positions.
    """

    def __init__(self, student: nn.Module, spec: ObjectiveSpec, teacher_width: int):
        super().__init__()
        self.student = student
        self.spec = spec
        self.weights = spec.weights
        self.projections = Projections(list(spec.projected_pairs), student.config.hidden_size, teacher_width)
        self.head_workspace = HeadWorkspace()  # [chunk, V] buffers the fused head reuses step after step

    @classmethod
    def build(cls, student: nn.Module, loss: LossConfig | dict, pairs, teacher_width: int, teacher_depth: int) -> Distiller:
        """From a loss config (or its dict) and the layer map: the spec derived here, once."""
        loss = loss if isinstance(loss, LossConfig) else _build(LossConfig, loss, "loss")
        return cls(student, ObjectiveSpec.build(loss, pairs, teacher_depth), teacher_width)

    # the objective -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, teacher: TeacherOutputs | None, mask: torch.Tensor | None = None, eval_ce: bool = False,
                data_mask: torch.Tensor | None = None):
        """`teacher` None: the data terms only (CE; validation without a teacher forward)."""
        w, spec = self.weights, self.spec
        if teacher is None:
            w = {k: v for k, v in w.items() if k == "ce"}
        last, cap = forward_with_capture(self.student, input_ids, spec.student_needs())
        targets = input_ids[:, 1:].reshape(-1)
        tok_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        pos_mask = (tok_mask[:, :-1] & tok_mask[:, 1:]).reshape(-1)
        s_w, s_b = head(self.student)
        t_in = t_w = t_b = None
        if ("kd" in w or "class_kd" in w) and teacher.topk is not None:  # cached top-k targets (raykd.losses.topk; no class_kd)
            t_in = teacher.topk.shifted()
        elif "kd" in w or "class_kd" in w:
            t_in, (t_w, t_b) = _flat(teacher.last_hidden), teacher.head or head(teacher.model)
        total, terms = fused_head_losses(
            _flat(last), s_w, t_in, t_w, targets, pos_mask,
            kd=spec.kd, temperature=spec.temperature, kd_params=spec.kd_params, ce_weight=w.get("ce", 0.0) or float(eval_ce),
            kd_weight=w.get("kd", 0.0), chunk_size=spec.chunk_size, student_bias=s_b, teacher_bias=t_b,
            workspace=self.head_workspace, class_weight=w.get("class_kd", 0.0),
            ce_mask=None if data_mask is None else data_mask[:, 1:].reshape(-1),
        )
        terms = dict(terms)
        feature_terms = {"hidden": self._hidden, "attention": self._attention, "relation": self._relation, "blockwise": self._blockwise}
        for name, term in feature_terms.items():
            if name in w:
                terms[name] = term(cap, teacher, tok_mask, targets, pos_mask)
                total = total + w[name] * terms[name]
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = total.detach()
        return total, terms

    # feature terms: (student capture, TeacherOutputs, token mask [B, T], targets [N], position mask [N]) -> scalar
    def _hidden(self, cap, teacher: TeacherOutputs, tok_mask, _targets, _pos_mask) -> torch.Tensor:
        hidden_fn, all_mask, vals = HIDDEN_LOSSES[self.spec.hidden_loss], tok_mask.reshape(-1), []
        for i, (t, s) in enumerate(self.spec.pairs):
            hs = self.projections(i, cap.hidden[s])
            ht = teacher.hidden[t].to(hs.dtype)
            vals.append(hidden_fn(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), all_mask))
        return torch.stack(vals).mean()

    def _attention(self, cap, teacher: TeacherOutputs, tok_mask, _targets, _pos_mask) -> torch.Tensor:
        return torch.stack([attention_kl(cap.qkv[s], teacher.qkv[t], tok_mask) for t, s in self.spec.attn_pairs]).mean()

    def _relation(self, cap, teacher: TeacherOutputs, tok_mask, _targets, _pos_mask) -> torch.Tensor:
        vals = []
        for t, s in self.spec.attn_pairs:
            r = self.spec.relation_heads or default_relation_heads(cap.qkv[s], teacher.qkv[t])
            vals.append(relation_loss(cap.qkv[s], teacher.qkv[t], r, tok_mask))
        return torch.stack(vals).mean()

    def _blockwise(self, cap, teacher: TeacherOutputs, _tok_mask, targets, pos_mask) -> torch.Tensor:
        """The student's hidden state (projected) through the teacher's upper blocks and head vs the teacher."""
        spec, (t_w, t_b), vals = self.spec, head(teacher.model), []
        for t, s in spec.block_pairs:
            i = spec.pairs.index((t, s))
            h = run_layers(teacher.model, self.projections(i, cap.hidden[s]).to(t_w.dtype), t + 1, teacher.layer_inputs)
            kd_b, _ = fused_head_losses(
                _flat(h), t_w, _flat(teacher.last_hidden), t_w, targets, pos_mask, kd=spec.kd, temperature=spec.temperature,
                kd_params=spec.kd_params, ce_weight=0.0, kd_weight=1.0, chunk_size=spec.chunk_size,
                student_bias=t_b, teacher_bias=t_b, workspace=self.head_workspace,
            )
            vals.append(kd_b)
        return torch.stack(vals).mean()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B*(T-1), H]: the positions that predict a next token."""
    return x[:, :-1].reshape(-1, x.shape[-1])
