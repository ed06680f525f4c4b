"""Training-free choice of the teacher layers a student keeps (`student.init: importance`).

Two scores on a small calibration sample of training text:

* ``block_ppl``: every cut that drops one contiguous block of L - k layers (plus the uniform
  cut) is run as-is and scored by its perplexity; the lowest wins. Pruning contiguous blocks
  by their measured effect follows Minitron (Sreenivas et al. 2024, depth pruning) and the
  training-free architecture search surveyed in knowledge-distillation surveys.
* ``block_influence``: ShortGPT's Block Influence BI_i = 1 - E[cos(h_in_i, h_out_i)]
  (Men et al. 2024); the k most influential layers are kept. One forward pass, cheap,
  usually worse than block_ppl on small models.

A cut once scored is kept as a small JSON memo (`memo_path`: teacher files, k, metric and the
calibration tokens hashed), so the trials of a sweep and reruns of a job do not score it again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from raykd import calibration, replace
from raykd.capture import Capture, decoder_layers
from raykd.evaluate import perplexity
from raykd.layer_map import contiguous_drops, evenly_spaced


@contextlib.contextmanager
def only_layers(model, keep: list[int]):
    """Temporarily run `model` with just the decoder layers `keep` (restored on exit)."""
    layers = decoder_layers(model)
    owner_name = next(n for n, m in model.named_modules() if m is layers)
    parent_name, _, attr = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    configs = {id(c): c for c in (model.config, getattr(parent, "config", None)) if c is not None}.values()
    old_depths = [c.num_hidden_layers for c in configs]
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for c in configs:
        c.num_hidden_layers = len(keep)
    try:
        yield model
    finally:
        setattr(parent, attr, layers)
        for c, d in zip(configs, old_depths):
            c.num_hidden_layers = d


def candidates(depth: int, k: int) -> list[tuple[int, ...]]:
    """The cuts block_ppl scores: every contiguous drop of depth - k layers, and the uniform cut."""
    return sorted({tuple(c) for c in contiguous_drops(depth, k)} | {tuple(evenly_spaced(depth, k))})


def score_block_ppl(model, k: int, ids: torch.Tensor, maps: dict | None = None) -> dict[tuple[int, ...], float]:
    """Perplexity of each candidate cut keeping k layers (contiguous drops + uniform). `maps` (student.dropped:
    linear; `raykd.replace.fit` over every candidate's gaps): each cut is scored with its stand-ins folded in."""
    L = len(decoder_layers(model))
    scores = {}
    for keep in candidates(L, k):
        own = {g: maps[g] for g in replace.gaps(list(keep), L)} if maps is not None else {}
        with replace.folded(model, own), only_layers(model, list(keep)):  # folded first: it indexes the whole teacher
            scores[keep] = perplexity(model, ids, batch_size=1)
    return scores


@torch.no_grad()
def block_influence(model, ids: torch.Tensor) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(input of layer i, output of layer i), per layer."""
    L = len(decoder_layers(model))
    sums = torch.zeros(L)
    for row in ids:
        with Capture(model, hidden=list(range(L))) as cap:
            model(input_ids=row[None], use_cache=False)
        h_in = model.get_input_embeddings()(row[None]).float()
        for i in range(L):
            h_out = cap.hidden[i].float()
            sums[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).mean()
            h_in = h_out
    return (sums / len(ids)).tolist()


def importance_cut(model, k: int, ids: torch.Tensor, metric: str = "block_ppl", maps: dict | None = None) -> tuple[list[int], dict]:
    """The kept layers for a k-layer student and the scores that chose them (`maps`: see score_block_ppl)."""
    was_training = model.training
    model.eval()
    try:
        if metric == "block_ppl":
            scores = score_block_ppl(model, k, ids, maps)
            best = min(scores, key=scores.get)
            return list(best), {"metric": metric, "perplexity": {",".join(map(str, c)): s for c, s in scores.items()}}
        bi = block_influence(model, ids)
        keep = sorted(sorted(range(len(bi)), key=lambda i: -bi[i])[:k])
        return keep, {"metric": metric, "block_influence": bi}
    finally:
        model.train(was_training)


MEMO_VERSION = 1  # bump when the scoring changes: older memos are then never read


def memo_path(root: Path, teacher_dir: Path, k: int, ids: torch.Tensor, metric: str) -> Path:
    """Where the importance cut of `k` layers of the teacher in `teacher_dir`, scored by `metric` on the
    calibration blocks `ids` [N, T], is kept: a name hashing the teacher's weight files (path, size,
    mtime), k, the metric and the token ids, so a changed teacher or corpus never reads an old cut."""
    return root / "importance" / f"{calibration.memo_digest(f'v{MEMO_VERSION}', teacher_dir, ids, k, metric)}.json"


def memo_load(path: Path) -> tuple[list[int], dict] | None:
    """(kept, scores) from a memo written by `memo_save`, None if absent or unreadable (then scored anew)."""
    try:
        d = json.loads(path.read_text())
        return [int(i) for i in d["kept"]], d["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def memo_save(path: Path, kept: list[int], scores: dict) -> None:
    """Written whole or not at all (a temporary file renamed), so a reader never sees half a memo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"kept": kept, "scores": scores}))
    os.replace(tmp, path)
