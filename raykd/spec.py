"""`ObjectiveSpec`: what the loss config means for a run, derived once (no torch, no Ray).

Which terms are active and with what weight, which layer pairs each term reads, what the
teacher and the student must capture in their forwards, whether a step needs the teacher at
all, which teacher-cache columns a run reads and whether a cache can serve it. Config
validation, the plan, the teacher cache, the `Distiller` and the train loop's reports all read
this one object instead of re-deriving it from the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raykd.errors import ConfigError

TERMS = ("ce", "kd", "class_kd", "hidden", "attention", "relation", "blockwise")  # every loss term, in report order
CACHE_CANNOT_SERVE = ("attention", "relation", "blockwise")  # a cache holds the teacher's states (or log-probs), not attention


@dataclass(frozen=True)
class Needs:
    """What a model's forward must capture: layer outputs, q/k/v, and decoder-layer kwargs."""

    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()
    layer_inputs: tuple[int, ...] = ()
    want_v: bool = False


def pick_pairs(pairs, indices: list[int] | None, default: str, field: str) -> list[tuple[int, int]]:
    """A subset of the layer map by index (`default`: 'all' or 'middle' when `indices` is None)."""
    pairs = [tuple(p) for p in pairs]
    if indices is None:
        return list(pairs) if default == "all" else [pairs[len(pairs) // 2]]
    bad = [i for i in indices if not -len(pairs) <= i < len(pairs)]
    if bad:
        raise ConfigError(f"{field}: index {bad[0]} out of range for a layer map of {len(pairs)} pairs; use 0..{len(pairs) - 1}")
    return [pairs[i] for i in indices]


def weights_of(loss) -> dict[str, float]:
    """The active terms of a `LossConfig` (weight > 0) in report order."""
    w = loss.weights
    return {t: float(getattr(w, t)) for t in TERMS if getattr(w, t) > 0}


def cache_refusal(loss, sparse_unsupported) -> str | None:
    """Why a teacher cache cannot serve this loss config (one line naming the field), or None. `sparse_unsupported`:
    the logit losses top-k targets cannot give; None for a dense cache (teacher.cache_topk=0), which serves every one."""
    w = weights_of(loss)
    terms = [t for t in CACHE_CANNOT_SERVE if t in w]  # every one named at once: one fix, not one per try
    if terms:
        fields = ", ".join(f"loss.weights.{t}" for t in terms)
        return (f"{fields}: the teacher cache (teacher.cache) cannot serve {'these terms' if len(terms) > 1 else 'this term'}; "
                f"set {' '.join(f'loss.weights.{t}=0' for t in terms)} or drop teacher.cache to run the teacher online")
    if sparse_unsupported is None:  # the final hidden state: the teacher's logits at every step
        return None
    if "class_kd" in w:  # a softmax over the batch's tokens per vocabulary entry: top-k log-probs cannot give it
        return ("loss.weights.class_kd: class_kl needs every token's dense teacher logits, which the teacher cache "
                "(top-k log-probs) does not hold; set loss.weights.class_kd=0, teacher.cache_topk=0 (a dense cache) or drop teacher.cache")
    if "kd" in w and loss.kd in sparse_unsupported:
        return (f"loss.kd: {loss.kd} needs the dense teacher distribution, which a top-k teacher cache does not hold; "
                f"use forward_kl, reverse_kl, jsd, skew_*, tvd, set teacher.cache_topk=0 (a dense cache) or drop teacher.cache")
    return None


def on_policy_refusal(cfg) -> str | None:
    """Why `loss.on_policy` cannot run with this `Config` (one line naming the field), or None (also when it is off)."""
    op = cfg.loss.on_policy
    if not op.active:
        return None
    if cfg.teacher.cache:
        return ("loss.on_policy: the teacher must score the student's own samples, which a teacher cache (teacher.cache) "
                "cannot hold; drop teacher.cache or set loss.on_policy.fraction=0")
    if op.max_new_tokens >= cfg.data.block_size:
        return (f"loss.on_policy.max_new_tokens: must be below data.block_size={cfg.data.block_size} (the prompt is the "
                f"block's first block_size - max_new_tokens tokens), got {op.max_new_tokens}")
    if set(weights_of(cfg.loss)) <= {"ce"}:
        return ("loss.on_policy: only cross-entropy is weighted and CE never trains on the student's own samples; "
                "give a teacher term a weight (e.g. loss.weights.kd=1) or set loss.on_policy.fraction=0")
    return None


@dataclass(frozen=True)
class ObjectiveSpec:
    """The multi-task objective of one run: active terms, their pairs and what they need."""

    weights: dict[str, float]  # active term -> weight (TERMS order)
    kd: str  # per-token logit loss name (raykd.losses TOKEN_LOSSES); the class_kd term is always class_kl
    temperature: float
    kd_params: dict = field(default_factory=dict)
    hidden_loss: str = "cosine"  # HIDDEN_LOSSES name
    chunk_size: int = 256  # tokens per fused-head chunk
    relation_heads: int | None = None
    pairs: tuple[tuple[int, int], ...] = ()  # (teacher layer, student layer)
    attn_pairs: tuple[tuple[int, int], ...] = ()  # the pairs attention/relation terms read
    block_pairs: tuple[tuple[int, int], ...] = ()  # the pairs block-wise KD reads
    teacher_depth: int = 0
    on_policy: bool = False  # loss.on_policy is on: steps also report gen_s, the seconds spent sampling (raykd.onpolicy)

    @classmethod
    def build(cls, loss, pairs, teacher_depth: int) -> ObjectiveSpec:
        """From a validated `LossConfig` and the layer map; bad pair indices raise ConfigError."""
        w = weights_of(loss)
        pairs = tuple(tuple(p) for p in pairs)
        attn = pick_pairs(pairs, loss.attention_pairs, "all", "loss.attention_pairs") if {"attention", "relation"} & set(w) else []
        block = pick_pairs(pairs, loss.blockwise_pairs, "middle", "loss.blockwise_pairs") if "blockwise" in w else []
        return cls(w, loss.kd, float(loss.temperature), dict(loss.kd_params or {}), loss.hidden, int(loss.chunk_size),
                   loss.relation_heads, pairs, tuple(attn), tuple(block), int(teacher_depth), loss.on_policy.active)

    @property
    def uses_teacher(self) -> bool:
        """False when only data terms (CE) are weighted: a step then needs no teacher forward."""
        return bool(set(self.weights) - {"ce"})

    @property
    def report_terms(self) -> tuple[str, ...]:
        """The metric keys a step reports: the total, every active term, and gen_s with on-policy KD."""
        return ("loss", *self.weights, *(("gen_s",) if self.on_policy else ()))

    def window_metrics(self, sums: list[float], world: int) -> dict[str, float]:
        """A report window's metrics from its all-reduced sums (one per report term, then the micro-step
        count over all workers): loss terms are means per micro-step; gen_s is the window's sampling
        seconds per worker (a sum over its micro-steps, averaged over the workers)."""
        return {k: sums[i] / (world if k == "gen_s" else max(1.0, sums[-1])) for i, k in enumerate(self.report_terms)}

    @property
    def projected_pairs(self) -> tuple[tuple[int, int], ...]:
        """Pairs with a learned projection: only terms that compare hidden states own one."""
        return self.pairs if ({"hidden", "blockwise"} & set(self.weights)) else ()

    def teacher_needs(self) -> Needs:
        return Needs(
            hidden=self.cache_layers,
            qkv=tuple(sorted({t for t, _ in self.attn_pairs})),
            # kwargs of every layer a block-wise pass re-runs (per layer: sliding/full layers differ)
            layer_inputs=tuple(range(min(t for t, _ in self.block_pairs) + 1, self.teacher_depth)) if self.block_pairs else (),
            want_v="relation" in self.weights,
        )

    def student_needs(self) -> Needs:
        hidden = {s for _, s in self.pairs} if "hidden" in self.weights else set()
        hidden |= {s for _, s in self.block_pairs}
        return Needs(hidden=tuple(sorted(hidden)), qkv=tuple(sorted({s for _, s in self.attn_pairs})), want_v="relation" in self.weights)

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """Teacher layers whose hidden states the loss reads (from the teacher or its cache)."""
        return tuple(sorted({t for t, _ in self.pairs})) if "hidden" in self.weights else ()

    def cache_columns(self, dense: bool = False) -> list[str]:
        """The teacher-cache columns a run reads: ids, the teacher's targets when KD is on (the top-k ones, or its final
        hidden state from a `dense` cache, which class_kd reads too), its mapped layers."""
        cols = ["input_ids"]
        if dense and ("kd" in self.weights or "class_kd" in self.weights):
            cols.append("last")
        elif "kd" in self.weights:
            cols += ["topk_idx", "topk_logp", "tail"]
        return cols + [f"hidden_{t}" for t in self.cache_layers]
