"""Docstrings cite documents by their path in this repository, and those documents exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "taskapp_notebook").rglob("*.py"))


def test_cited_docs_exist_and_nothing_outside_the_repository_is_cited() -> None:
    cited: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        assert "/work/" not in text and "shared/design" not in text, path
        cited.update(re.findall(r"docs/[\w./-]+\.md", text))
    assert "docs/synthtunnel-protocol.md" in cited and "docs/kernel-facts.md" in cited
    bare = [str(p) for p in SOURCES if re.search(r"(?<!docs/)\bkernel-facts\.md", p.read_text())]
    assert not bare, f"cite kernel facts by their repository path: {bare}"
    missing = sorted(doc for doc in cited if not (ROOT / doc).is_file())
    assert not missing, f"cited but not in the repository: {missing}"
