"""Scoring primitives for task evaluation: log-likelihood of continuations, ROC AUC, CER.

Pure torch; no Ray, no tokenizer. A request is `(context ids, continuation ids)`: two lists of
token ids; its score is the summed log-probability of the continuation given the context and
whether every continuation token is the model's argmax (greedy) — the two numbers
lm-evaluation-harness's `loglikelihood` requests return (Gao et al., 2021, "A framework for
few-shot language model evaluation").

Speed (2-core CPUs): requests are sorted by length and batched with right padding; when every
continuation of a context is one token the context is run once and all its choices are read off
the last position; the contexts of a batch share a few-shot prompt, whose keys/values are
computed once per batch and reused (`shared_prefix`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raykd.evaluate import _device, _inference
from raykd.sampling import cache_key


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `seqs`, leaving every sequence at least one token."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)


def _forward(model, seqs: list[list[int]], pad_id: int, min_prefix: int = 8) -> tuple[torch.Tensor, int]:
    """Log-softmax rows for right-padded `seqs` -> (float32 [B, L, V], offset); row t predicts token offset+t+1.

    A common prefix of at least `min_prefix` tokens is run once (batch 1) and its KV cache is
    repeated over the batch; the rows then start at the prefix's last position (offset p - 1).
    """
    device = _device(model)
    p = shared_prefix(seqs)
    use_prefix = p >= min_prefix and len(seqs) > 1
    start = p - 1 if use_prefix else 0
    width = max(len(s) for s in seqs) - (p if use_prefix else 0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tail = s[p:] if use_prefix else s
        ids[i, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        mask[i, : len(tail)] = 1
    ids, mask = ids.to(device), mask.to(device)
    if not use_prefix:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1), start
    head = torch.tensor([seqs[0][:p]], dtype=torch.long, device=device)
    out = model(input_ids=head, use_cache=True)
    key = cache_key(model)
    cache = out[key]
    cache.batch_repeat_interleave(len(seqs))
    full_mask = torch.cat([torch.ones((len(seqs), p), dtype=torch.long, device=device), mask], dim=1)
    logits = model(input_ids=ids, attention_mask=full_mask, use_cache=True, **{key: cache}).logits
    last = out.logits[:, -1:].expand(len(seqs), 1, -1)  # the prefix's last position predicts the first tail token
    return torch.cat([last, logits], dim=1).float().log_softmax(-1), start


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, batch_size: int = 16,
                   max_len: int | None = None) -> list[tuple[float, bool]]:
    """(summed log P(continuation | context), continuation is greedy) for each request, in order.

    Contexts longer than `max_len` - len(continuation) are cut from the left. Requests that share
    a context and have one-token continuations are scored from one forward of the context.
    """
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        key = tuple(ctx) if len(cont) == 1 else (*ctx, -1 - i)  # a unique key: scored on its own
        groups.setdefault(key, []).append(i)
    rows = []  # (sequence, [(request index, first continuation position, continuation)])
    for key, members in groups.items():
        single = key[-1] >= 0
        ctx = list(requests[members[0]][0])
        cont0 = list(requests[members[0]][1])
        seq = ctx if single else ctx + cont0
        if max_len and len(seq) > max_len:
            seq = seq[len(seq) - max_len:]
        first = len(seq) - (0 if single else len(cont0))
        rows.append((seq, [(i, first, list(requests[i][1])) for i in members]))
    rows.sort(key=lambda r: -len(r[0]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    with _inference(model):
        for b in range(0, len(rows), batch_size):
            _score_batch(model, rows[b:b + batch_size], pad_id, results)
    return results  # type: ignore[return-value]


def _score_batch(model, batch, pad_id: int, results: list) -> None:
    logp, start = _forward(model, [seq for seq, _ in batch], pad_id)
    for r, (_, members) in enumerate(batch):
        for i, first, cont in members:
            pos = torch.arange(first - 1, first - 1 + len(cont), device=logp.device) - start
            rows = logp[r, pos]  # [len(cont), V]
            target = torch.tensor(cont, device=logp.device)
            lp = rows.gather(1, target[:, None]).sum().item()
            results[i] = (lp, bool((rows.argmax(-1) == target).all()))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive): the probability that a
    random positive scores above a random negative, ties counting half (Mann-Whitney U). None when
    one class is missing."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions; each costs 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate: total edit distance / total reference characters (0 = identical;
    can exceed 1 when hypotheses are longer). An empty reference set with empty hypotheses is 0."""
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    chars = sum(len(r) for r in references)
    return edits / chars if chars else float(edits > 0)


def retained(student: float | None, teacher: float | None, chance: float) -> float | None:
    """The share of the teacher's lead over chance the student keeps: (student - chance) / (teacher - chance).
    None when either score is missing or the teacher is not above chance."""
    if student is None or teacher is None or teacher <= chance:
        return None
    return (student - chance) / (teacher - chance)
