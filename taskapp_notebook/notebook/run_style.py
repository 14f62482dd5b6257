"""Colours and small helpers shared by the run view's renderers.

The live widget uses JupyterLab's theme variables (with fallbacks: what the light theme
resolves to) so it reads well in light and dark themes, like the task-app widget.
:func:`plain_colours` turns them into their fallbacks for the static card: HTML sanitizers
(JupyterLab's for untrusted output, nbviewer, GitHub) drop any style that uses ``var()``.
Fallbacks never contain parentheses, so the substitution stays a simple pattern.
"""

from __future__ import annotations

import html
import re

LABEL = "var(--jp-ui-font-color2, #616161)"
TEXT = "var(--jp-ui-font-color1, #1f1f1f)"
BORDER = "var(--jp-border-color2, #cccccc)"
ACCENT = "var(--jp-brand-color1, #1976d2)"
SEED = "var(--jp-ui-font-color3, #9e9e9e)"
TRACK = "var(--jp-layout-color3, #e0e0e0)"
ERROR = "var(--jp-error-color1, #c62828)"
#: Translucent tints: readable under the theme's own text colour in light and dark themes.
HIGHLIGHT = "rgba(25, 118, 210, 0.14)"
INSERTED = "rgba(46, 160, 67, 0.28)"
DELETED = "rgba(248, 81, 73, 0.28)"

#: Badge colours per run state; white text on each has a WCAG contrast of at least 4.5.
STATE_COLOURS = {
    "pending": "#616161",
    "running": "#1565c0",
    "stopping": "#a14a00",
    "paused": "#8a5300",
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#616161",
    "stopped": "#5d4037",
}

_THEME_VARIABLE = re.compile(r"var\(--[\w-]+, ([^)]+)\)")


def plain_colours(markup: str) -> str:
    """``markup`` with every ``var(--name, fallback)`` replaced by its fallback."""
    return _THEME_VARIABLE.sub(r"\1", markup)


def esc(text: object) -> str:
    """HTML-escape ``text`` (quotes too: values also land in attributes)."""
    return html.escape(str(text), quote=True)


def badge(state: str, text: str | None = None) -> str:
    """The state badge (``data-state`` carries the state for tests and styling)."""
    colour = STATE_COLOURS.get(state, "#616161")
    return (
        f'<span class="taskapp-badge taskapp-run-badge" data-state="{esc(state)}" '
        f'style="background:{colour};color:#ffffff;border-radius:8px;padding:1px 8px;'
        f'font-size:12px;white-space:nowrap">{esc(text or state)}</span>'
    )
