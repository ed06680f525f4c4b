"""The `cloze` task: predict the last word of a held-out passage (LAMBADA-style; Paperno et al., 2016).

Passages are cut from the validation documents (never the training split): runs of whole
sentences of at least `min_words` words whose last word is alphabetic; the target is that word
without its punctuation, the context everything before it. A model scores `acc` when every
token of " word" is its argmax given the context (greedy), and `logprob`, the mean
log-likelihood of the target word in nats (higher is better). Chance accuracy is ~0.
"""

from __future__ import annotations

import re

from raykd.tasks.scoring import loglikelihoods

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"^(?P<ctx>.*\S)\s+(?P<word>[A-Za-z][A-Za-z'-]*[A-Za-z])[.!?]?[\"')\]]*$", re.S)


def passages(text: str, min_words: int = 40, max_words: int = 160) -> list[tuple[str, str]]:
    """(context, target word) pairs from one document: consecutive sentences, each passage at least
    `min_words` words (a longer sentence run is cut at `max_words` and skipped if it does not end on a
    word), no two passages overlapping."""
    out, run, words = [], [], 0
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        if not sentence:
            continue
        run.append(sentence)
        words += len(sentence.split())
        if words < min_words:
            continue
        passage = " ".join(run)
        run, words = [], 0
        if len(passage.split()) > max_words:
            continue
        m = _WORD.match(passage)
        if m and len(m["word"]) >= 3:
            out.append((m["ctx"], m["word"]))
    return out


def items(documents, limit: int, min_words: int = 40, pool: int = 10) -> list[dict]:
    """Up to `limit` passages spread evenly over the passages of `documents` (an iterable of texts),
    reading documents only until `pool` x `limit` passages are found (a large validation split is not
    read whole): [{"context", "word"}]. Text too short for `min_words`-word passages is cut into
    passages of 10 words instead. Deterministic for the same documents."""
    every, short = [], []
    for doc in documents:
        every.extend(passages(doc, min_words=min_words))
        if len(every) < limit:
            short.extend(passages(doc, min_words=10))
        if len(every) >= pool * limit:
            break
    every = every or short
    if len(every) <= limit:
        chosen = every
    else:
        step = len(every) / limit
        chosen = [every[int(i * step)] for i in range(limit)]
    return [{"context": c, "word": w} for c, w in chosen]


def score(model, tokenizer, cloze_items: list[dict], batch_size: int = 16, max_context: int = 256) -> dict:
    """{"acc", "logprob", "n"}: greedy last-word accuracy and the mean log-likelihood of the word."""
    requests = []
    for item in cloze_items:
        ctx = tokenizer(item["context"], add_special_tokens=False)["input_ids"][-max_context:]
        requests.append((ctx, tokenizer(" " + item["word"], add_special_tokens=False)["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = loglikelihoods(model, requests, pad_id=pad or 0, batch_size=batch_size)
    n = max(1, len(scores))
    return {"acc": sum(g for _, g in scores) / n, "logprob": sum(lp for lp, _ in scores) / n, "n": len(scores)}
