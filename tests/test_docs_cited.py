"""Docstrings cite documents by their path in this repository, and those documents exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "taskapp_notebook").rglob("*.py"))
#: Any ``something.md`` a source file mentions, with the path written before it.
CITED = re.compile(r"[\w./-]*[\w-]+\.md\b")


def test_every_cited_document_is_a_file_of_this_repository() -> None:
    cited: set[str] = set()
    for path in SOURCES:
        cited.update(CITED.findall(path.read_text()))
    assert {"docs/synthtunnel-protocol.md", "docs/kernel-facts.md"} <= cited
    outside = sorted(doc for doc in cited if doc.startswith(("/", "..")))
    assert not outside, f"cited outside the repository: {outside}"
    missing = sorted(doc for doc in cited if not (ROOT / doc).is_file())
    assert not missing, f"cite documents by their path in the repository: {missing}"
