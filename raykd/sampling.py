"""Batched sampling with a KV cache, and per-token log-likelihoods: the one generation routine of
`raykd generate` (teacher-written data, sequence-level KD) and of on-policy KD (the student's own
samples, GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models"). Pure torch, no Ray.

Prompts are a LongTensor [B, P] of equal length (no padding: raykd cuts them from documents or packed
blocks), so positions follow from the cache. Each step feeds only the B new tokens; a row that has
sampled an EOS keeps its place in the batch and is padded with `pad_id` (its mask is 0 after the EOS),
and the loop ends when every row has finished or after `max_new_tokens`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Sampled:
    tokens: torch.Tensor  # [B, N] long: the continuations (pad_id after a row's EOS)
    mask: torch.Tensor  # [B, N] bool: the tokens a row really sampled (its EOS included)
    logprobs: torch.Tensor  # [B, N] float32: log p(token | prefix) under the model at temperature 1 (0 where masked)

    def ids(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prompts and continuations joined: [B, P + N]."""
        return torch.cat([prompts, self.tokens.to(prompts.device)], dim=1)


def cache_key(model) -> str:
    """The KV-cache keyword of `model.forward`: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [B, V] with every token outside the smallest set whose probability reaches `top_p`
    (nucleus sampling, Holtzman et al. 2020) set to -inf; the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, eos_id: int | list[int] | None = None, pad_id: int = 0) -> Sampled:
    """Continue every prompt of `prompts` [B, P] by up to `max_new_tokens` tokens sampled from
    softmax(logits / temperature) (greedy when temperature is 0), nucleus-filtered at `top_p`,
    drawn with `generator` (seeded: the same seed gives the same samples on the same device)."""
    if prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts: expected a LongTensor [B, P] with P >= 1, got shape {tuple(prompts.shape)}")
    stops = torch.tensor([] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id)), device=prompts.device)
    b = prompts.shape[0]
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=prompts.device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=prompts.device)
    mask = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=prompts.device)
    alive = torch.ones(b, dtype=torch.bool, device=prompts.device)
    key = cache_key(model)
    # the prefill needs only the last position's logits: [B, 1, V], not [B, P, V] (HF's logits_to_keep, where the model takes it)
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=prompts, use_cache=True, **last)
    for i in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = _filter_top_p(logits / temperature, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        tokens[:, i], mask[:, i] = nxt, alive
        logprobs[:, i] = torch.where(alive, logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1), 0.0)
        alive = alive & ~torch.isin(nxt, stops)
        if not alive.any() or i == max_new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{key: out[key]})
    return Sampled(tokens, mask, logprobs)


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) under `model` for t >= 1: [B, T - 1] float32, `batch_size` rows
    per forward (how a teacher scores text another model wrote)."""
    rows = []
    for i in range(0, ids.shape[0], batch_size):
        chunk = ids[i:i + batch_size]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        rows.append(logits.log_softmax(-1).gather(2, chunk[:, 1:, None]).squeeze(2))
    return torch.cat(rows)
