"""The docs cannot go stale: docs/configuration.md is exactly what docs/gen_config_doc.py writes
from the config dataclasses, and every relative link in the README and the docs pages points at
a file (and heading) that exists. Fast: no Ray, no models, no raykd import."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "jobs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def test_configuration_doc_is_generated(tmp_path):
    out = tmp_path / "configuration.md"
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_config_doc.py"), "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    fresh = out.read_text(encoding="utf-8")
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                             "docs/configuration.md (committed)", "generated", n=1))[:60])
    assert fresh == committed, f"docs/configuration.md is stale; run `python docs/gen_config_doc.py`:\n{diff}"


def test_configuration_doc_covers_every_section():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key in ("teacher.model", "student.init", "layer_map.strategy", "loss.kd", "loss.weights.hidden",
                "data.train", "train.lr", "scale.strategy", "sweep.params", "output_dir", "seed"):
        assert f"| `{key}` |" in text, key


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links(page: Path) -> list[str]:
    prose = _prose(page.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(prose) + REF_LINK.findall(prose)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_link_checker_sees_links():
    """The checker itself: it finds links, skips code, and knows GitHub's anchors."""
    sample = "See [a](docs/x.md#y-z) and `[no](code.md)`.\n```\n[no](fenced.md)\n```\n[r]: ../ref.md\n"
    prose = _prose(sample)
    assert INLINE_LINK.findall(prose) + REF_LINK.findall(prose) == ["docs/x.md#y-z", "../ref.md"]
    readme_links = _links(ROOT / "README.md")
    assert any(t.startswith("docs/") for t in readme_links), "README.md should link to the docs pages"
