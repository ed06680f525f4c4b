"""The config sections that sample text: `generate:` (`GenerateConfig`, what `raykd generate` samples and
writes, raykd.generation) and `loss.on_policy` (`OnPolicyConfig`, the student's own samples in training,
raykd.onpolicy). Kept beside `raykd.config`, which holds them as `Config.generate` and
`LossConfig.on_policy`, with the same one-line comment per field and validation in `__post_init__`;
no Ray, no raykd imports but errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raykd.errors import ConfigError
from raykd.errors import check_choice as _choice
from raykd.errors import check_positive as _positive


@dataclass
class GenerateConfig:
    model: str | None = None  # the generator: any HF causal-LM directory or named model (e.g. a finished student runs/x/student; it must share the teacher's vocabulary); null = the teacher (teacher.model)
    prompts: str = "documents"  # where prompts come from: documents (the first prompt_tokens tokens of each training document) | bos (unconditional: num_prompts prompts of the start token alone, the generator's own text on whatever it writes about)
    prompt_tokens: int = 32  # prompt = the first N tokens (teacher's tokenizer) of each training document; shorter documents are skipped (prompts: documents)
    max_new_tokens: int = 128  # continuation length: tokens sampled per prompt (fewer where the generator samples EOS)
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]
    num_samples: int = 1  # continuations sampled per prompt
    num_prompts: int = 0  # prompts taken, in corpus order (0 = every training document long enough)
    batch_size: int = 16  # sequences sampled together (one KV cache)
    shard_size: int = 64  # prompts per output shard (the unit of resume; shard k is seeded with seed + k)
    format: str = "jsonl"  # output shards: jsonl | parquet
    filter_min_logprob: float | None = None  # keep a sample only if the teacher's mean log-prob per continuation token is >= this (null = keep all)
    concurrency: int = 1  # generator actors in the Ray Data pool (each takes scale.cpus_per_worker CPUs, or a GPU with scale.use_gpu)

    def __post_init__(self):
        if self.model is not None and not str(self.model).strip():
            raise ConfigError("generate.model: empty; give an HF causal-LM directory or a named model, or null for the teacher")
        for name in ("prompt_tokens", "max_new_tokens", "num_samples", "batch_size", "shard_size", "concurrency"):
            _positive(f"generate.{name}", getattr(self, name))
        _positive("generate.num_prompts", self.num_prompts, allow_zero=True)
        _positive("generate.temperature", self.temperature, allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p: must be in (0, 1], got {self.top_p}; 1 samples from the whole distribution")
        _choice("generate.format", self.format, ("jsonl", "parquet"))
        _choice("generate.prompts", self.prompts, ("documents", "bos"))
        if self.prompts == "bos" and not self.num_prompts:
            raise ConfigError("generate.num_prompts: prompts=bos samples num_prompts unconditional texts and needs a count; give one, e.g. generate.num_prompts=512")
        f = self.filter_min_logprob
        if f is not None and (not math.isfinite(f) or f > 0):
            raise ConfigError(f"generate.filter_min_logprob: a mean log-probability is a finite number <= 0, got {f}; e.g. -3.0, or null to keep every sample")


@dataclass
class OnPolicyConfig:
    fraction: float = 0.0  # share of micro-batches (GKD's lambda) whose blocks end in the student's own samples, scored by the teacher; 0 = off
    max_new_tokens: int = 32  # N: the student continues each block's first data.block_size - N tokens by N sampled ones (1 .. block_size - 1)
    temperature: float = 1.0  # the student's sampling temperature (0 = greedy); the losses keep loss.temperature

    def __post_init__(self):
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ConfigError(f"loss.on_policy.fraction: must be in [0, 1], got {f!r}; the share of micro-batches the student samples (0 = off)")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"loss.on_policy.max_new_tokens: must be an integer >= 1, got {n!r}; tokens the student samples per block")
        _positive("loss.on_policy.temperature", self.temperature, allow_zero=True)

    @property
    def active(self) -> bool:
        return self.fraction > 0
