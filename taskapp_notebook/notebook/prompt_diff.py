"""The best prompt shown as a diff against the seed, per component.

``difflib`` on lines, then on the words of changed lines (whitespace kept, so the text
keeps its layout); every piece of prompt text is HTML-escaped — prompts can contain HTML.
Bounded: each component is cut at :data:`MAX_CHARS` before diffing and long unchanged runs
are shortened to their ends, so a huge prompt never produces a huge widget message.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from .run_style import DELETED, INSERTED, LABEL, esc

#: Characters of each component that are diffed and shown.
MAX_CHARS = 6000
#: Unchanged runs longer than this show only their first and last :data:`_KEEP` characters.
_LONG_EQUAL = 400
_KEEP = 150
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def _cut(text: str) -> tuple[str, int]:
    """``text`` cut at :data:`MAX_CHARS`, and how many characters were cut."""
    if len(text) <= MAX_CHARS:
        return text, 0
    return text[:MAX_CHARS], len(text) - MAX_CHARS


def _equal(text: str) -> str:
    if len(text) <= _LONG_EQUAL:
        return esc(text)
    hidden = len(text) - 2 * _KEEP
    return (
        f"{esc(text[:_KEEP])}<span style=\"color:{LABEL};font-style:italic\">"
        f" … {hidden} unchanged characters … </span>{esc(text[-_KEEP:])}"
    )


def _ins(text: str) -> str:
    return (f'<ins class="taskapp-diff-ins" style="background:{INSERTED};'
            f'text-decoration:none">{esc(text)}</ins>')


def _del(text: str) -> str:
    return (f'<del class="taskapp-diff-del" style="background:{DELETED};'
            f'text-decoration:line-through">{esc(text)}</del>')


def _words(text: str) -> int:
    return sum(1 for token in _TOKEN.findall(text) if not token.isspace())


def word_diff(seed: str, best: str) -> tuple[str, int, int]:
    """HTML of ``best`` against ``seed`` (``<ins>``/``<del>``), words added, words removed."""
    old, new = _TOKEN.findall(seed), _TOKEN.findall(best)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    out: list[str] = []
    added = removed = 0
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out.append(_equal("".join(old[i1:i2])))
            continue
        if i2 > i1:
            removed += _words("".join(old[i1:i2]))
            out.append(_del("".join(old[i1:i2])))
        if j2 > j1:
            added += _words("".join(new[j1:j2]))
            out.append(_ins("".join(new[j1:j2])))
    return "".join(out), added, removed


def text_diff(seed: str, best: str) -> tuple[str, int, int]:
    """Like :func:`word_diff`, by lines first when the texts have several: added and
    removed lines show whole, a run of changed lines shows its changed words."""
    if "\n" not in seed and "\n" not in best:
        return word_diff(seed, best)
    old, new = seed.splitlines(keepends=True), best.splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    out: list[str] = []
    added = removed = 0
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out.append(_equal("".join(old[i1:i2])))
            continue
        gone, fresh = "".join(old[i1:i2]), "".join(new[j1:j2])
        if gone and fresh:  # changed lines: their words
            body, more, fewer = word_diff(gone, fresh)
            out.append(body)
            added, removed = added + more, removed + fewer
        elif gone:
            removed += _words(gone)
            out.append(_del(gone))
        else:
            added += _words(fresh)
            out.append(_ins(fresh))
    return "".join(out), added, removed


def prompt_diff(seed: Mapping[str, str], best: Mapping[str, str]) -> str:
    """One block per component: its name, counts of words added/removed, and the diff."""
    names = list(seed) + [name for name in best if name not in seed]
    if not names:
        return f'<div style="color:{LABEL}">no prompt text reported</div>'
    blocks = []
    for name in names:
        old, old_cut = _cut(seed.get(name, ""))
        new, new_cut = _cut(best.get(name, ""))
        body, added, removed = text_diff(old, new)
        if old == new:
            summary = "unchanged"
        else:
            summary = f"+{added} / −{removed} words"
        if old_cut or new_cut:
            summary += f" · first {MAX_CHARS} characters shown"
        blocks.append(
            f'<div class="taskapp-diff" data-component="{esc(name)}" style="margin:4px 0">'
            f'<div style="color:{LABEL};font-size:12px"><b>{esc(name)}</b> · {esc(summary)}'
            "</div>"
            '<div class="taskapp-diff-text" style="white-space:pre-wrap;word-break:break-word;'
            "font-family:var(--jp-code-font-family, monospace);font-size:12px;"
            "line-height:1.45;max-height:16em;overflow:auto;padding:4px 6px;"
            f'border-left:3px solid {INSERTED}">{body}</div></div>'
        )
    return "".join(blocks)
