"""Every relative link in README.md, docs/ and bench/ leads somewhere: the file exists and,
where the link names a section, a heading of that file has that anchor (GitHub's rule:
lower case, punctuation other than '-' and '_' dropped, spaces to '-', a repeated
heading numbered '-1', '-2', ...). A renamed section otherwise leaves a dead link that
only a reader finds."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _docs() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "bench").rglob("*.md")),
    ]


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@cache
def _file_anchors(path: Path) -> frozenset[str]:
    return frozenset(_anchors(path.read_text(encoding="utf-8")))


def _dead_links() -> list[str]:
    dead = []
    for doc in _docs():
        text = FENCE.sub("", doc.read_text(encoding="utf-8"))
        for link in LINK.findall(text):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)} -> {link}"
            if not target.exists():
                dead.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _file_anchors(target):
                dead.append(f"{where} (no such section)")
    return dead


def test_anchors_follow_githubs_rule() -> None:
    text = (
        "# The loop (fmn/train/loop.py; default)\n## Held out\n## Held out\n"
        "```\n# not a heading\n```\n"
    )
    assert _anchors(text) == {"the-loop-fmntrainlooppy-default", "held-out", "held-out-1"}


def test_every_relative_link_in_the_docs_leads_somewhere() -> None:
    assert len(_docs()) > 5  # README, docs/ and bench's results tables are all read
    assert _dead_links() == []
