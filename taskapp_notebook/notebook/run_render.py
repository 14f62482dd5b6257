"""Render a :class:`~taskapp_notebook.progress.ProgressSnapshot`: HTML sections and text.

One presenter: every figure (scores, budget, rates, elapsed time, extras) is formatted once
in :func:`facts` and the sections below, and the live widget, the static HTML card and the
plain text all render from them. ``live=True`` keeps JupyterLab's theme variables; the
static card gets plain colours (see ``run_style``). Every producer-provided string is
HTML-escaped; ``extra`` keys that look like credentials are never shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..progress import CandidateSummary, ProgressSnapshot
from .presenter import format_uptime
from .prompt_diff import prompt_diff
from .run_plot import score_plot
from .run_style import (
    ACCENT,
    BORDER,
    ERROR,
    HIGHLIGHT,
    LABEL,
    SEED,
    TRACK,
    badge,
    esc,
    plain_colours,
)

#: Rows the candidates table shows (best first); the seed is always added.
TOP_CANDIDATES = 10
_SECRET_KEY = re.compile(r"token|key|secret|password|passwd|auth|credential|cookie", re.I)
_MAX_EXTRA = 200


@dataclass(frozen=True)
class RunFacts:
    """The run's figures as display strings (the single place they are formatted)."""

    title: str
    state: str
    iteration: str
    best: str
    seed: str
    gain: str
    budget: str
    budget_left: str
    budget_fraction: float | None
    rollouts: str
    rate: str
    errors: str
    elapsed: str
    candidates: str
    extras: tuple[tuple[str, str], ...]


def score(value: float | None) -> str:
    """``0.812``; ``—`` when unknown."""
    return "—" if value is None else f"{value:.3f}"


def shown_extras(snapshot: ProgressSnapshot) -> tuple[tuple[str, str], ...]:
    """``extra`` items fit to show: no key that looks like a credential, values cut short."""
    items = []
    for key, value in snapshot.extra.items():
        if _SECRET_KEY.search(str(key)):
            continue
        text = str(value)
        if len(text) > _MAX_EXTRA:
            text = text[:_MAX_EXTRA] + "…"
        items.append((str(key), text))
    return tuple(items)


def facts(snapshot: ProgressSnapshot, state: str | None = None) -> RunFacts:
    """Format every figure of ``snapshot`` (``state`` overrides the shown state)."""
    snap = snapshot
    gain = "—"
    if snap.best_score is not None and snap.seed_score is not None:
        gain = f"{snap.best_score - snap.seed_score:+.3f}"
    fraction = None
    if snap.budget_total:
        fraction = min(1.0, snap.budget_used / snap.budget_total)
        budget = f"{snap.budget_used} / {snap.budget_total}"
        left = f"{max(0, snap.budget_total - snap.budget_used)} left"
    else:
        budget, left = f"{snap.budget_used}", "no limit"
    rate = "—" if snap.rollouts_per_second is None else f"{snap.rollouts_per_second:.1f}/s"
    on_front = sum(1 for c in snap.candidates if c.on_front)
    errors = f"{snap.rollout_errors} error" + ("" if snap.rollout_errors == 1 else "s")
    return RunFacts(
        title=f"{snap.kind} · {snap.name}",
        state=state or snap.state,
        iteration=str(snap.iteration),
        best=score(snap.best_score),
        seed=score(snap.seed_score),
        gain=gain,
        budget=budget,
        budget_left=left,
        budget_fraction=fraction,
        rollouts=str(snap.rollouts),
        rate=rate,
        errors=errors,
        elapsed=format_uptime(snap.elapsed),
        candidates=f"{len(snap.candidates)} ({on_front} on the Pareto front)",
        extras=shown_extras(snap),
    )


# ---------------------------------------------------------------------------- sections


def header_html(snapshot: ProgressSnapshot, state: str | None = None) -> str:
    """Kind and name, the state badge, elapsed time."""
    f = facts(snapshot, state)
    return (
        '<div class="taskapp-run-header" style="display:flex;align-items:center;gap:8px;'
        'flex-wrap:wrap">'
        f'<b style="font-size:14px">{esc(snapshot.name)}</b>'
        f'<span style="color:{LABEL}">{esc(snapshot.kind)}</span>{badge(f.state)}'
        f'<span class="taskapp-run-elapsed" style="color:{LABEL}">{esc(f.elapsed)} elapsed</span>'
        "</div>"
    )


def _tile(label: str, value: str, sub: str, css_class: str, extra: str = "") -> str:
    return (
        f'<div class="taskapp-run-tile {css_class}" style="min-width:92px">'
        f'<div style="color:{LABEL};font-size:11px;text-transform:uppercase;'
        f'letter-spacing:0.04em">{esc(label)}</div>'
        f'<div class="taskapp-run-value" style="font-size:18px;font-weight:600;'
        f'line-height:1.3">{esc(value)}</div>{extra}'
        f'<div style="color:{LABEL};font-size:12px">{esc(sub)}</div></div>'
    )


def stats_html(snapshot: ProgressSnapshot, state: str | None = None) -> str:
    """The figures: best/seed score, iteration, budget with its bar, rollouts, errors."""
    f = facts(snapshot, state)
    bar = ""
    if f.budget_fraction is not None:
        bar = (
            f'<div class="taskapp-run-budget" style="height:5px;width:110px;background:{TRACK};'
            f'border-radius:3px;margin:2px 0">'
            f'<div style="height:5px;width:{f.budget_fraction * 100:.1f}%;background:{ACCENT};'
            'border-radius:3px"></div></div>'
        )
    best_sub = f"seed {f.seed} · {f.gain}" if f.gain != "—" else f"seed {f.seed}"
    tiles = [
        _tile("best score", f.best, best_sub, "taskapp-run-best-score"),
        _tile("iteration", f.iteration, f"{len(snapshot.candidates)} candidates",
              "taskapp-run-iteration"),
        _tile("budget", f.budget, f.budget_left, "taskapp-run-budget-tile", bar),
        _tile("rollouts", f.rollouts, f"{f.rate} · {f.errors}", "taskapp-run-rollouts"),
    ]
    extras = "".join(
        f'<span style="margin-right:14px"><span style="color:{LABEL}">{esc(k)}</span> '
        f"{esc(v)}</span>"
        for k, v in f.extras
    )
    extras_line = f'<div style="font-size:12px;margin-top:2px">{extras}</div>' if extras else ""
    return (
        '<div class="taskapp-run-stats" style="display:flex;flex-wrap:wrap;gap:6px 28px;'
        f'margin:6px 0 4px 0">{"".join(tiles)}</div>{extras_line}'
    )


def plot_html(snapshot: ProgressSnapshot, *, fallback: bool = True) -> str:
    """Section title, the score plot (``fallback``: see ``run_plot.score_plot``), legend."""
    dots = [(c.iteration, c.score) for c in snapshot.candidates if c.score is not None]
    legend = (
        f'<div style="color:{LABEL};font-size:11px;margin-top:2px">'
        f'<span style="color:{ACCENT}">━</span> best so far &nbsp; '
        f'<span style="color:{SEED}">╌</span> seed &nbsp; '
        f'<span style="color:{ACCENT}">•</span> candidates</div>'
    )
    return (
        _section_title("best score per iteration")
        + score_plot(snapshot.score_history, dots, snapshot.seed_score, fallback=fallback)
        + legend
    )


def _section_title(text: str) -> str:
    return (
        f'<div style="color:{LABEL};font-size:11px;text-transform:uppercase;'
        f'letter-spacing:0.04em;margin:4px 0">{esc(text)}</div>'
    )


def _short(text: str, width: int = 10) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def shown_candidates(snapshot: ProgressSnapshot, top: int = TOP_CANDIDATES) -> list[
        CandidateSummary]:
    """The table's rows: the ``top`` best by score (unscored last), plus the seed."""
    ranked = sorted(
        snapshot.candidates,
        key=lambda c: (c.score is None, -(c.score or 0.0), c.iteration),
    )
    rows = ranked[:top]
    seed = snapshot.seed
    if seed is not None and seed not in rows:
        rows.append(seed)
    return rows


def candidates_html(snapshot: ProgressSnapshot, top: int = TOP_CANDIDATES) -> str:
    """The candidates table: best first, the best highlighted, the seed always listed."""
    rows = shown_candidates(snapshot, top)
    title = _section_title(f"candidates ({len(snapshot.candidates)})")
    if not rows:
        return title + f'<div style="color:{LABEL};font-size:12px">none yet</div>'
    seed_id = snapshot.seed.id if snapshot.seed else None
    cell = "padding:2px 10px 2px 0;text-align:left;white-space:nowrap"
    head = "".join(
        f'<th style="{cell};color:{LABEL};font-weight:normal;border-bottom:1px solid {BORDER}">'
        f"{h}</th>"
        for h in ("candidate", "iter", "score", "parents", "Pareto")
    )
    scores = [c.score for c in rows if c.score is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
    body = []
    for c in rows:
        best = c.id == snapshot.best_candidate_id
        tags = []
        if best:
            tags.append("best")
        if c.id == seed_id:
            tags.append("seed")
        tag = f' <span style="color:{LABEL}">({", ".join(tags)})</span>' if tags else ""
        parents = ", ".join(_short(p, 8) for p in c.parents[:3])
        if len(c.parents) > 3:
            parents += f" +{len(c.parents) - 3}"
        style = f' style="background:{HIGHLIGHT};font-weight:600"' if best else ""
        body.append(
            f'<tr class="taskapp-run-candidate" data-id="{esc(c.id)}"'
            f' data-best="{str(best).lower()}"{style}>'
            f'<td style="{cell}" title="{esc(c.id)}">{esc(_short(c.id, 14))}{tag}</td>'
            f'<td style="{cell}">{c.iteration}</td>'
            f'<td style="{cell}">{esc(score(c.score))}{_score_bar(c.score, low, high)}</td>'
            f'<td style="{cell}" title="{esc(", ".join(c.parents))}">{esc(parents) or "—"}</td>'
            f'<td style="{cell}">{"●" if c.on_front else ""}</td></tr>'
        )
    more = len(snapshot.candidates) - len(rows)
    foot = (f'<div style="color:{LABEL};font-size:11px">top {len(rows)} shown, '
            f"{more} more</div>" if more > 0 else "")
    return (
        f'{title}<div style="max-height:15em;overflow:auto">'
        '<table class="taskapp-run-candidates" style="border-collapse:collapse;font-size:12px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{foot}"
    )


def _score_bar(value: float | None, low: float, high: float) -> str:
    """A small bar after a score: its place between the lowest and highest shown."""
    if value is None:
        return ""
    width = 4 + (40 * (value - low) / (high - low) if high > low else 40)
    return (
        f'<span style="display:inline-block;width:{width:.0f}px;height:6px;margin-left:6px;'
        f'background:{ACCENT};opacity:0.55;border-radius:2px;vertical-align:middle"></span>'
    )


def diff_html(snapshot: ProgressSnapshot) -> str:
    """The best prompt as a diff against the seed."""
    seed, best = snapshot.seed, snapshot.best
    if seed is None:
        return ""
    if best is None or best.id == seed.id:
        title = _section_title("best prompt: the seed so far")
        return title + prompt_diff(seed.components, seed.components)
    title = _section_title(f"best prompt ({_short(best.id, 14)}) vs seed")
    return title + prompt_diff(seed.components, best.components)


def message_html(snapshot: ProgressSnapshot, error: str = "") -> str:
    """The last message of the run and, in red, the view's own error (a failed stop)."""
    parts = []
    if snapshot.message:
        colour = ERROR if snapshot.state == "failed" else LABEL
        parts.append(
            f'<div class="taskapp-run-message" style="color:{colour};font-size:12px;'
            f'white-space:pre-wrap">{esc(snapshot.message)}</div>'
        )
    if error:
        parts.append(
            f'<div class="taskapp-run-error" style="color:{ERROR};font-size:12px">'
            f"{esc(error)}</div>"
        )
    return "".join(parts)


# ---------------------------------------------------------------------------- whole views


def render_run_html(snapshot: ProgressSnapshot, *, live: bool = False, state: str | None = None,
                    error: str = "") -> str:
    """The whole run as one HTML card (no buttons, no script, no ``<style>``).

    Plain colours unless ``live`` (then JupyterLab's theme variables stay in place).
    """
    card = (
        f'<div class="taskapp-run-view" style="border:1px solid {BORDER};padding:8px 12px;'
        'font-size:13px;line-height:1.4">'
        f"{header_html(snapshot, state)}{stats_html(snapshot, state)}"
        '<div style="display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start">'
        f"<div>{plot_html(snapshot)}</div><div>{candidates_html(snapshot)}</div></div>"
        f"{diff_html(snapshot)}{message_html(snapshot, error)}</div>"
    )
    return card if live else plain_colours(card)


def render_run_text(snapshot: ProgressSnapshot, *, state: str | None = None) -> str:
    """The run as a few plain-text lines (for frontends without HTML)."""
    f = facts(snapshot, state)
    lines = [
        f"{f.title}: {f.state} · iteration {f.iteration} · {f.elapsed}",
        f"  best score: {f.best} (seed {f.seed}, {f.gain})",
        f"  budget: {f.budget} rollouts ({f.budget_left})",
        f"  rollouts: {f.rollouts} · {f.rate} · {f.errors}",
        f"  candidates: {f.candidates}",
    ]
    if snapshot.score_history:
        tail = snapshot.score_history[-8:]
        lines.append("  best by iteration: " + ", ".join(f"{i}: {s:.3f}" for i, s in tail))
    best = snapshot.best
    if best is not None:
        for name, text in list(best.components.items())[:3]:
            one_line = " ".join(text.split())
            lines.append(f"  best {name}: {one_line[:160]}{'…' if len(one_line) > 160 else ''}")
    lines += [f"  {key}: {value}" for key, value in f.extras]
    if snapshot.message:
        lines.append(f"  {snapshot.message}")
    return "\n".join(lines)
