"""Run view benchmark: what watching a run costs the producer, and what a redraw costs.

* producer: time per ``RunProgress.update()`` from a producer thread, with nobody watching
  (the baseline, same run) and with a ``RunView`` subscribed — the view only keeps the
  snapshot there and redraws on its own timer thread.
* redraw: ``render_run_html`` (the whole card) and one live redraw (every section) for runs
  of growing size, with the bytes a live redraw sends.

    python bench/run_view.py [--runs 5] [--updates 3000]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from taskapp_notebook.notebook.run_render import (
    candidates_html,
    diff_html,
    header_html,
    message_html,
    plot_html,
    render_run_html,
    stats_html,
)
from taskapp_notebook.notebook.run_view import RunView
from taskapp_notebook.progress import CandidateSummary, ProgressSnapshot, RunProgress

PROMPT = "You are a careful math tutor.\nSolve the problem.\nKeep it short.\n" * 20


def fill(progress: RunProgress, candidates: int) -> None:
    """A run with ``candidates`` scored candidates, one per iteration."""
    progress.update(state="running", seed_score=0.4)
    progress.upsert_candidate(CandidateSummary("seed", score=0.4, components={"p": PROMPT}))
    for i in range(1, candidates + 1):
        score = 0.4 + 0.5 * i / candidates
        progress.upsert_candidate(CandidateSummary(
            f"c{i}", score=score, parents=("seed",), iteration=i,
            components={"p": PROMPT.replace("short", f"short ({i})", i % 7)}))
        progress.add_score_point(i, score)
    progress.update(iteration=candidates, best_score=0.9, best_candidate_id=f"c{candidates}")


def per_update(updates: int, watched: bool) -> float:
    """Seconds per ``update()`` on a producer thread."""
    progress = RunProgress("local gepa", "bench", budget_total=updates)
    fill(progress, 20)
    view = RunView(progress) if watched else None
    took: list[float] = []

    def produce() -> None:
        start = time.perf_counter()
        for i in range(updates):
            progress.update(budget_used=i, rollouts=i)
        took.append(time.perf_counter() - start)

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join()
    if view is not None:
        view.close()
    return took[0] / updates


def live_redraw(snap: ProgressSnapshot) -> int:
    """One live redraw's sections; returns the bytes they hold."""
    sections = (header_html(snap), stats_html(snap), plot_html(snap, fallback=False),
                candidates_html(snap), diff_html(snap), message_html(snap))
    return sum(len(s.encode()) for s in sections)


def timed(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--updates", type=int, default=3000)
    args = parser.parse_args()

    bare = statistics.median(per_update(args.updates, False) for _ in range(args.runs))
    watched = statistics.median(per_update(args.updates, True) for _ in range(args.runs))
    print(f"Medians of {args.runs} runs of {args.updates} updates on a producer thread.\n")
    print("| producer | µs per update | ratio |")
    print("|---|---:|---:|")
    print(f"| nobody watching (baseline) | {bare * 1e6:.1f} | 1.00× |")
    print(f"| a RunView subscribed | {watched * 1e6:.1f} | {watched / bare:.2f}× |")
    print("\n| run size | static card | live redraw | live redraw sends |")
    print("|---|---:|---:|---:|")
    for size in (10, 100, 1000):
        progress = RunProgress("local gepa", "bench", budget_total=size * 10)
        fill(progress, size)
        snap = progress.snapshot()
        card = timed(lambda snap=snap: render_run_html(snap), args.runs)
        redraw = timed(lambda snap=snap: live_redraw(snap), args.runs)
        print(f"| {size} candidates | {card * 1e3:.1f} ms | {redraw * 1e3:.1f} ms | "
              f"{live_redraw(snap) / 1024:.0f} KiB |")


if __name__ == "__main__":
    main()
