"""The distillation losses (pure torch, no Ray): the public registry and what the objective calls.

* `divergences`: logit divergences (`LOGIT_LOSSES`, the registry YAML and Tune name: per-token
  `TOKEN_LOSSES` for `loss.kd`, batch-level `BATCH_LOSSES` such as `class_kl`), cross-entropy,
  hidden-state losses (`HIDDEN_LOSSES`).
* `topk`: sparse top-k teacher distributions (the teacher cache) and the logit losses on them.
* `fused`: the chunked LM-head loss (CE + logit KD without full [N, V] logits).
* `attention`: attention-map KL and MiniLM-v2 Q/K/V relation losses from captured q/k/v.
"""

from raykd.losses.attention import attention_kl, attention_probs, default_relation_heads, relation_loss
from raykd.losses.divergences import *  # noqa: F403  (the registry and every loss function)
from raykd.losses.divergences import __all__ as _divergences
from raykd.losses.fused import CLOSED_FORM, HeadWorkspace, fused_head_losses
from raykd.losses.topk import TopK, sparse_logit_loss, teacher_topk

__all__ = [
    *_divergences, "fused_head_losses", "HeadWorkspace", "CLOSED_FORM", "TopK", "teacher_topk", "sparse_logit_loss",
    "attention_kl", "attention_probs", "default_relation_heads", "relation_loss",
]
