"""The run view's renderers and its RunView widget, fed by real RunProgress producers on
real threads; the button driven with ``Button.click()`` (as a frontend click arrives)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pytest
from support import wait_for

from taskapp_notebook.notebook import prompt_diff, run_plot
from taskapp_notebook.notebook.run_render import TOP_CANDIDATES
from taskapp_notebook.notebook.run_view import RunView, render_run_html, render_run_text
from taskapp_notebook.progress import CandidateSummary, RunProgress

SECRET = "sk-run-view-secret-0123456789abcdef"
SEED = "You are a helpful assistant.\nAnswer <b>concisely</b>."


def simulate(progress: RunProgress, iterations: int, *, delay: float = 0.0,
             stop: threading.Event | None = None) -> None:
    """A stand-in GEPA producer: a seed, one candidate per iteration, rising best score."""
    progress.update(state="running", seed_score=0.4, extra={"job_id": "job_1",
                                                            "worker_token": SECRET})
    progress.upsert_candidate(CandidateSummary("seed", score=0.4, components={"system": SEED}))
    best, best_id = 0.4, "seed"
    for i in range(1, iterations + 1):
        if stop is not None and stop.is_set():
            progress.update(state="stopped", message=f"stopped after iteration {i - 1}")
            return
        score = 0.4 + 0.5 * i / iterations if i % 3 or i == iterations else 0.3
        text = SEED.replace("concisely", f"concisely, step {i}") + f"\n<script>x{i}</script>"
        progress.upsert_candidate(CandidateSummary(f"c{i}", score=score, parents=(best_id,),
                                                   on_front=score >= best, iteration=i,
                                                   components={"system": text}))
        if score > best:
            best, best_id = score, f"c{i}"
        progress.add_score_point(i, best)
        progress.update(iteration=i, budget_used=i * 4, rollouts=i * 4, best_score=best,
                        best_candidate_id=best_id, rollouts_per_second=12.5)
        if delay:
            time.sleep(delay)
    progress.update(state="succeeded", message="budget used up")


def all_widgets(root: Any) -> Iterator[Any]:
    yield root
    for name in ("layout", "style"):
        part = getattr(root, name, None)
        if isinstance(part, widgets.Widget):
            yield part
    for child in getattr(root, "children", ()):
        yield from all_widgets(child)


@pytest.fixture
def progress() -> RunProgress:
    return RunProgress("local gepa", "demo", budget_total=200)


# ------------------------------------------------------------------------ renderers


def test_static_card_shows_final_figures_and_survives_sanitizers(progress: RunProgress) -> None:
    simulate(progress, 12)
    card = render_run_html(progress.snapshot())
    assert 'data-state="succeeded"' in card
    assert "0.900" in card and "0.400" in card and "+0.500" in card  # best, seed, gain
    assert "48 / 200" in card and "152 left" in card
    points = re.search(r'class="taskapp-run-best" points="([^"]+)"', card)
    assert points is not None and len(points.group(1).split()) == 12
    dots = card[card.index('class="taskapp-run-dots"'):]
    assert dots[:dots.index("</g>")].count("<circle") == 13  # every scored candidate
    assert "taskapp-run-seed" in card
    # plain colours, nothing a sanitizer strips with its content, no text inside the SVG
    assert "var(" not in card and "<style" not in card and "onclick" not in card
    svg = card[card.index("<svg"):card.index("</svg>")]
    assert "<text" not in svg and "<title" not in svg
    # the live variant keeps the theme variables
    assert "var(--jp-" in render_run_html(progress.snapshot(), live=True)


def test_prompt_text_is_escaped_and_diffed(progress: RunProgress) -> None:
    simulate(progress, 6)
    card = render_run_html(progress.snapshot())
    assert "<script>" not in card and "<b>concisely" not in card
    assert "&lt;script&gt;x6&lt;/script&gt;" in card
    diff = card[card.index('class="taskapp-diff"'):]
    inserted = re.findall(r'<ins class="taskapp-diff-ins"[^>]*>(.*?)</ins>', diff, re.S)
    assert any("step" in piece for piece in inserted), inserted
    assert "&lt;b&gt;concisely" in diff  # the unchanged words stay, escaped


def test_word_diff_counts_and_bounds() -> None:
    body, added, removed = prompt_diff.word_diff("a quick brown fox", "a slow brown fox jumps")
    assert (added, removed) == (2, 1)
    assert '<del class="taskapp-diff-del"' in body and ">quick</del>" in body
    assert ">slow</ins>" in body
    body, added, removed = prompt_diff.text_diff("Be brief.\nSolve <it>.\nEnd.",
                                                 "Be brief.\nRead twice.\nSolve <it> now.\nEnd.")
    assert (added, removed) == (4, 0)
    assert ">Read twice.\n</ins>Solve &lt;it&gt;<ins" in body  # a whole new line, then a word
    assert ">Be brief.\n" not in body and body.startswith("Be brief.\n")
    huge_seed = "word " * 20_000
    huge = prompt_diff.prompt_diff({"p": huge_seed}, {"p": huge_seed + "extra"})
    assert len(huge) < 3 * prompt_diff.MAX_CHARS
    assert "unchanged characters" in huge and "first 6000 characters shown" in huge
    assert "unchanged" in prompt_diff.prompt_diff({"p": "same"}, {"p": "same"})


def test_candidates_table_is_bounded_best_first_with_the_seed(progress: RunProgress) -> None:
    simulate(progress, 40)
    card = render_run_html(progress.snapshot())
    rows = re.findall(r'<tr class="taskapp-run-candidate" data-id="([^"]+)" data-best="(\w+)"',
                      card)
    assert len(rows) == TOP_CANDIDATES + 1
    assert rows[0] == ("c40", "true") and rows[-1] == ("seed", "false")
    assert sum(best == "true" for _, best in rows) == 1
    assert f"top {TOP_CANDIDATES + 1} shown, 30 more" in card


def test_plot_is_bounded_and_handles_flat_and_empty_histories() -> None:
    history = [(i, i / 5000) for i in range(5000)]
    svg = run_plot.score_plot(history, [], 0.0)
    points = re.search(r'class="taskapp-run-best" points="([^"]+)"', svg)
    assert points is not None and len(points.group(1).split()) == run_plot.MAX_POINTS
    flat = run_plot.score_plot([(0, 0.5)], [], 0.5)
    assert "nan" not in flat.lower() and "taskapp-run-best" in flat
    assert "no scores yet" in run_plot.score_plot([], [], None)
    many_dots = run_plot.score_plot(history[:10], history, 0.0)
    assert many_dots.count("<circle") == run_plot.MAX_DOTS + 1  # the dots and the last point
    bars = many_dots[many_dots.index("taskapp-run-bars"):]
    assert bars.count("<div") == 10 + 1


def test_text_and_no_credentials_anywhere(progress: RunProgress) -> None:
    simulate(progress, 5)
    progress.update(extra={"job_id": "job_1", "worker_token": SECRET, "API_KEY": SECRET,
                           "upstream_secret": SECRET})
    text = render_run_text(progress.snapshot())
    assert text.startswith("local gepa · demo: succeeded · iteration 5")
    assert "best score: 0.900 (seed 0.400, +0.500)" in text
    assert "job_id: job_1" in text
    view = RunView(progress)
    try:
        states = [json.dumps(w.get_state(), default=str) for w in all_widgets(view.widget)]
        bundle = [str(value) for value in view._repr_mimebundle_().values()]
        for shown in [*states, text, render_run_html(progress.snapshot()), *bundle]:
            assert SECRET not in shown and SECRET[:12] not in shown
    finally:
        view.close()


# ------------------------------------------------------------------------ the widget


def test_redraws_are_throttled_and_the_final_state_is_drawn(progress: RunProgress) -> None:
    view = RunView(progress)
    try:
        started = time.monotonic()
        producer = threading.Thread(target=simulate, args=(progress, 300),
                                    kwargs={"delay": 0.002})
        producer.start()
        producer.join()
        elapsed = time.monotonic() - started
        assert wait_for(lambda: 'data-state="succeeded"' in view.header.value)
        assert ">300<" in view.stats.value
        # ~1200 updates, at most one redraw per min_interval (plus the first and the last)
        assert 2 <= view.renders <= elapsed / view.min_interval + 4, (view.renders, elapsed)
        assert view.stop_button.disabled
        # once the final state is drawn no redraw thread is left
        assert wait_for(lambda: not any(t.name == "taskapp-run-view-redraw"
                                        for t in threading.enumerate()))
    finally:
        view.close()


def test_a_render_error_never_reaches_the_producer(progress: RunProgress) -> None:
    view = RunView(progress)
    try:
        # a producer bug: a component that is not text makes the diff renderer fail
        progress.upsert_candidate(CandidateSummary("seed", components={"p": 42}))  # type: ignore[dict-item]
        snap = progress.update(state="failed", message="boom")
        assert snap.state == "failed"
        assert wait_for(lambda: view.error.startswith("view error: TypeError"))
    finally:
        view.close()


def test_stop_calls_on_stop_off_the_ui_path(progress: RunProgress) -> None:
    release = threading.Event()
    calls: list[str] = []

    def on_stop() -> None:
        calls.append(threading.current_thread().name)
        release.wait(10)  # a slow stop: the click must not wait for it
        progress.update(state="stopped", message="stopped by the user")

    progress.update(state="running")
    view = RunView(progress, on_stop=on_stop)
    try:
        assert not view.stop_button.disabled and view.stop_button.description == "Stop"
        view.stop_button.click()
        # back from the click while on_stop still waits
        assert not release.is_set()
        assert view.stop_button.disabled and view.stop_button.description == "stopping…"
        assert 'data-state="stopping"' in view.header.value
        view.stop_button.click()  # a second click does nothing
        release.set()
        assert wait_for(lambda: 'data-state="stopped"' in view.header.value)
        assert calls == ["taskapp-run-view-stop"]
        assert view.stop_button.disabled and view.stop_button.description == "Stop"
    finally:
        release.set()
        view.close()


def test_async_on_stop_and_a_failing_one(progress: RunProgress) -> None:
    cancelled: list[bool] = []

    async def cancel() -> None:
        await asyncio.sleep(0.01)
        cancelled.append(True)
        raise RuntimeError("backend said 503")

    progress.update(state="running")
    view = RunView(progress, on_stop=cancel, stop_label="Cancel")
    try:
        assert view.stop_button.description == "Cancel"
        view.stop_button.click()
        assert wait_for(lambda: "Cancel failed: RuntimeError: backend said 503" in
                        view.message.value)
        assert cancelled == [True]
        # the stop can be tried again
        assert not view.stop_button.disabled and view.stop_button.description == "Cancel"
    finally:
        view.close()


def test_button_disabled_without_on_stop_or_when_final(progress: RunProgress) -> None:
    progress.update(state="running")
    view = RunView(progress)
    assert view.stop_button.disabled
    view.stop_button.click()  # nothing to call: nothing happens
    assert not view.stop_requested
    view.close()
    calls: list[int] = []
    progress.update(state="succeeded")
    finished = RunView(progress, on_stop=lambda: calls.append(1))
    finished.stop_button.click()
    assert finished.stop_button.disabled and calls == []
    finished.close()


def test_close_unsubscribes_and_closes_widgets(progress: RunProgress) -> None:
    view = RunView(progress)
    children = list(all_widgets(view.widget))
    view.close()
    renders = view.renders
    progress.update(state="running", iteration=3)
    time.sleep(2 * view.min_interval)  # give a (wrong) redraw the chance to happen
    assert view.renders == renders
    assert all(child.comm is None for child in children)
    assert not any(t.name == "taskapp-run-view-redraw" for t in threading.enumerate())


def test_mimebundle_has_widget_html_and_text(progress: RunProgress) -> None:
    simulate(progress, 3)
    view = RunView(progress, on_stop=lambda: None)
    try:
        bundle = view._repr_mimebundle_()
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == \
            view.widget.model_id
        assert bundle["text/html"] == render_run_html(progress.snapshot())
        assert bundle["text/plain"] == render_run_text(progress.snapshot())
        assert isinstance(view.widget, widgets.VBox)
        assert "taskapp-run-svg" in view.plot.value and "var(--jp-" in view.stats.value
        # the live widget's HTML is never sanitized: no need for the bar-chart fallback
        assert "taskapp-run-bars" not in view.plot.value
        assert "taskapp-run-bars" in bundle["text/html"]
    finally:
        view.close()


def test_readme_run_view_block_runs_as_printed() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The run view"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", 10)]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    view = namespace["view"]
    try:
        assert isinstance(view, RunView) and view.stop_label == "Stop"
        assert not view.stop_button.disabled  # a pending run with an on_stop can be stopped
        assert view.progress.snapshot().name == "my-run"
    finally:
        view.close()


def test_elapsed_time_ticks_while_running_only(progress: RunProgress) -> None:
    def redraw_threads() -> int:
        return sum(t.name == "taskapp-run-view-redraw" for t in threading.enumerate())

    view = RunView(progress)
    try:
        time.sleep(0.3)
        assert redraw_threads() == 0  # pending: nothing to tick
        progress.update(state="running", started_at=time.time() - 5)
        assert wait_for(lambda: "5s elapsed" in view.header.value, 5)
        # no update from the producer, yet the elapsed time moves on
        assert wait_for(lambda: "6s elapsed" in view.header.value, 5)
        progress.update(state="succeeded", finished_at=time.time())
        assert wait_for(lambda: 'data-state="succeeded"' in view.header.value)
        assert wait_for(lambda: redraw_threads() == 0)
    finally:
        view.close()
