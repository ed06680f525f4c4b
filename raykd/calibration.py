"""The calibration text, token blocks and memo names of training-free steps: the importance search (`student.init:
importance`, its first documents) and the linear stand-ins' fit (`student.dropped: linear`, spread over the
corpus). Text comes from `raykd.data.reader` (no Ray)."""

from __future__ import annotations

import bisect
import hashlib
import itertools
from pathlib import Path

import torch

from raykd import models
from raykd.data.reader import calibration_text, documents


def calibration_ids(tokenizer, text: str, n_tokens: int, block: int) -> torch.Tensor:
    """[n_blocks, block] token ids from `text` (at least one block, at most ~n_tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    block = min(block, len(ids))
    n_blocks = max(1, min(n_tokens, len(ids)) // block)
    return ids[: n_blocks * block].view(n_blocks, block)


def spread_text(data_cfg, n_chars: int, skip_chars: int, pieces: int = 64, cap: int = 256) -> str:
    """About `n_chars` of training text in `pieces` pieces taken at evenly spaced characters of the training
    split after its first `skip_chars` (the importance search's text; at most cap * n_chars read), so each
    source counts by its share of the text: a fit on the corpus, not on its first documents (a corpus in date
    order would hand the maps its oldest text alone)."""
    docs, seen, skipped = [], 0, 0
    for doc in documents(data_cfg, "train"):
        if skipped < skip_chars:
            skipped += len(doc)
            continue
        docs.append(doc)
        seen += len(doc)
        if seen >= cap * n_chars:
            break
    if not docs:  # a corpus too small for both: the importance search's text
        return calibration_text(data_cfg, n_chars)
    starts = list(itertools.accumulate((len(d) for d in docs), initial=0))
    piece, out = n_chars // pieces + 1, []
    for i in range(pieces):  # evenly spaced over the text's characters: each source by its share of them
        at = int((i + 0.5) * seen / pieces)
        j = bisect.bisect_right(starts, at) - 1
        d, off = docs[j], at - starts[j]
        out.append(d[max(0, min(off - piece // 2, len(d) - piece)):][:piece])
    return "\n\n".join(out)


def calibration(cfg, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(score ids [n, T], fit ids [m, T]) of the run's training text: the importance search's
    `student.calibration_tokens` (its first documents, as without stand-ins), and `student.fit_tokens` for
    the maps from documents spread over the rest (`spread_text`)."""
    s, block = cfg.student, cfg.data.block_size
    text = calibration_text(cfg.data, n_chars=8 * s.calibration_tokens)
    score = calibration_ids(tok, text, s.calibration_tokens, block)
    fit = calibration_ids(tok, spread_text(cfg.data, 8 * s.fit_tokens, len(text)), s.fit_tokens, block)
    return score, fit


def memo_digest(version: str, teacher_dir: Path, ids: torch.Tensor, *parts) -> str:
    """The name of a memo computed from a teacher and token ids [N, T] (the importance cut, the stand-ins' maps):
    a hash of `version`, the teacher's path and weight files (`file_stats`), `parts`, and the ids, so a changed
    teacher or corpus never reads an old memo."""
    h = hashlib.sha256("|".join([version, str(Path(teacher_dir).resolve()), *map(str, parts), str(tuple(ids.shape))]).encode())
    h.update(repr(models.file_stats(teacher_dir)).encode())
    h.update(ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]
