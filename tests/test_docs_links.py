"""Every relative link in the README and the guides (docs/, deploy/) points to a file of this
repository, and every ``#anchor`` to a heading of its target, so that links cannot rot when a
page, a heading or a result file is renamed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    """The page without fenced blocks and inline code (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped (``-`` and
    ``_`` kept), spaces to ``-``; a repeated heading gets ``-1``, ``-2``, …"""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for target in LINK.findall(_without_code(page.read_text())):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                out.append((str(page.relative_to(ROOT)), target))
    return out


def test_the_pages_link_to_each_other():
    targets = {t.split("#")[0] for _, t in relative_links()}
    assert {"docs/guarantees.md", "docs/benchmarks.md", "docs/decisions.md", "deploy/RUNBOOK.md"} <= targets


@pytest.mark.parametrize("page,target", relative_links(), ids=lambda v: v[:60])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (ROOT / page).parent / path if path else ROOT / page
    assert dest.exists(), f"{page}: link to {target}: no such file"
    assert dest.resolve().is_relative_to(ROOT), f"{page}: link to {target} leaves the repository"
    if anchor:
        assert dest.suffix == ".md", f"{page}: {target}: an anchor into a file that is not a page"
        assert anchor in anchors(dest), f"{page}: {target}: no heading #{anchor} in {path or page}"
