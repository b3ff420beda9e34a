"""The documentation: the MkDocs site under docs/ builds with ``--strict`` (no broken link, anchor or nav entry),
and README.md stays a front door: at most 300 lines, every relative link pointing at a file of the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 300

# [text](target) and ![alt](target); a target ends at whitespace (an optional "title") or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _without_code(text: str) -> str:
    """``text`` minus fenced code blocks and inline code spans, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(text: str) -> list[str]:
    links = []
    for target in LINK.findall(_without_code(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue  # http(s):, mailto:, in-page anchors and site-absolute paths are not repository files
        links.append(target)
    return links


def test_mkdocs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="pip install '.[docs]' (mkdocs, mkdocs-material)")
    pytest.importorskip("material", reason="pip install '.[docs]' (mkdocs-material)")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file()
    assert (site / "benchmarks" / "index.html").is_file()


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"


def test_readme_relative_links_point_at_files():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no docs page"
    missing = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert missing == [], f"README.md links to missing files: {missing}"


def test_the_link_finder_sees_links_and_skips_code():
    text = "[a](docs/x.md) ![i](docs/p.png) [w](https://e.org) [h](#top) `[c](nope.md)`\n```\n[f](nope2.md)\n```\n"
    assert relative_links(text) == ["docs/x.md", "docs/p.png"]
