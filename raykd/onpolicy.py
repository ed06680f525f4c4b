"""On-policy distillation: a share of micro-batches on the student's own samples (GKD: Agarwal et al.,
ICLR 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"; MiniLLM:
Gu et al., ICLR 2024). Pure torch, no Ray; the train loop calls `OnPolicy.apply` once per micro-batch.

For a chosen micro-batch of blocks ids [B, T] and N = `loss.on_policy.max_new_tokens`, the first
P = T - N tokens of each block (the corpus) are the prompt and the student samples the other N
(`raykd.sampling.sample`: KV cache, no gradient, the student in eval mode, at
`loss.on_policy.temperature`, never stopping early at EOS). The result has the block's shape [B, T],
so the teacher forward, the fused LM head, hidden / attention terms and DDP / FSDP see an ordinary
block; a data mask [B, T] (True on the P prompt tokens) keeps cross-entropy off the sampled tokens,
while the teacher terms count every position: the logit loss on positions P-1 .. T-2 is the on-policy
term (the teacher scoring the student's own tokens), on the prompt it is the usual KD on the data.

Which micro-batches: `chosen(seed, step, micro, fraction)` hashes (seed, step, micro) into [0, 1), so
every rank makes the same decision (all sample or none: the same number of forwards and collectives),
a rerun or a resume from a checkpoint makes it again, and the global RNG is not touched. The samples
are drawn with a generator seeded from (seed, step, micro, rank): reproducible, different per rank.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from raykd.config import OnPolicyConfig
from raykd.sampling import sample

_M64 = (1 << 64) - 1
_DECIDE, _SAMPLE = 1, 2  # salts: the decision and the sampling seed are separate streams


def _splitmix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer (the same in every process)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of a tuple of integers (negative ones too); Python's hash() of str is salted, this is not."""
    h = 0
    for v in values:
        h = _splitmix(h ^ (int(v) & _M64))
    return h


def chosen(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch `micro` of optimizer step `step` is on-policy: a function of its arguments only."""
    if fraction <= 0:
        return False
    return fraction >= 1 or mix(seed, step, micro, _DECIDE) / 2.0**64 < fraction


def continue_blocks(student, ids: torch.Tensor, max_new_tokens: int, temperature: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """ids [B, T] long -> [B, T]: each block's first T - N tokens, then N tokens the student samples
    after them (N = max_new_tokens, 1 <= N < T; greedy at temperature 0). No gradient; the student
    samples in eval mode (no dropout) and gets its training mode back."""
    t = ids.shape[1]
    if not 1 <= max_new_tokens < t:
        raise ValueError(f"max_new_tokens: must be in [1, {t - 1}] for blocks of {t} tokens, got {max_new_tokens}")
    prompts = ids[:, : t - max_new_tokens]
    was_training = student.training
    student.eval()
    try:
        out = sample(student, prompts, max_new_tokens, temperature=temperature, generator=generator)  # eos_id None: no early stop
    finally:
        student.train(was_training)
    return out.ids(prompts)


@dataclass
class OnPolicy:
    """`loss.on_policy` on one worker: `apply` turns a chosen micro-batch into one on the student's samples."""

    cfg: OnPolicyConfig
    seed: int  # the run's seed
    rank: int  # this worker's rank (its samples differ from the other ranks')

    def generator(self, device: torch.device, step: int, micro: int) -> torch.Generator | None:
        """The sampling generator of micro-batch (step, micro) on this rank; None when sampling is greedy."""
        if self.cfg.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(mix(self.seed, step, micro, self.rank, _SAMPLE) >> 1)

    def apply(self, student, ids: torch.Tensor, step: int, micro: int, context=contextlib.nullcontext):
        """(ids [B, T], data_mask [B, T] bool or None, extra terms): unchanged blocks, None, {} when this
        micro-batch is not chosen; else the student-continued blocks, True on their prompt tokens, and
        {"gen_s": seconds spent sampling, a float64 scalar on ids' device}. `context()` wraps the
        sampling (the engine's: autocast, and whatever the strategy needs to run the student alone)."""
        if not chosen(self.seed, step, micro, self.cfg.fraction):
            return ids, None, {}
        n = self.cfg.max_new_tokens
        start = time.perf_counter()
        with context():
            new = continue_blocks(student, ids, n, self.cfg.temperature, self.generator(ids.device, step, micro))
        seconds = time.perf_counter() - start  # sample() reads every step's result on the host: the work is done
        data_mask = torch.ones_like(ids, dtype=torch.bool)
        data_mask[:, ids.shape[1] - n:] = False
        return new, data_mask, {"gen_s": torch.full((), seconds, dtype=torch.float64, device=ids.device)}
