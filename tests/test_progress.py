"""RunProgress: the shared run model that local GEPA, hosted jobs and the run view use."""

from __future__ import annotations

import threading

from taskapp_notebook.progress import CandidateSummary, ProgressSnapshot, RunProgress


def test_update_sets_times_and_notifies_subscribers() -> None:
    progress = RunProgress("local gepa", "demo", budget_total=10)
    seen: list[ProgressSnapshot] = []
    unsubscribe = progress.subscribe(seen.append)
    progress.update(state="running")
    assert seen[-1].state == "running" and seen[-1].started_at is not None
    progress.update(state="succeeded", best_score=0.9)
    assert seen[-1].is_final and seen[-1].finished_at is not None
    unsubscribe()
    progress.update(message="after")
    assert len(seen) == 2
    assert progress.snapshot().message == "after"


def test_candidates_keep_order_and_are_replaced_by_id() -> None:
    progress = RunProgress("local gepa", "demo")
    progress.upsert_candidate(CandidateSummary("0", score=0.2, components={"p": "seed"}))
    progress.upsert_candidate(CandidateSummary("1", score=None, parents=("0",)))
    progress.upsert_candidate(CandidateSummary("1", score=0.7, parents=("0",), on_front=True))
    progress.update(best_candidate_id="1")
    snap = progress.snapshot()
    assert [c.id for c in snap.candidates] == ["0", "1"]
    assert snap.seed is not None and snap.seed.components == {"p": "seed"}
    assert snap.best is not None and snap.best.score == 0.7 and snap.best.on_front


def test_score_history_one_point_per_iteration_sorted() -> None:
    progress = RunProgress("hosted gepa", "job")
    progress.add_score_point(2, 0.5)
    progress.add_score_point(0, 0.1)
    progress.add_score_point(2, 0.6)
    assert progress.snapshot().score_history == ((0, 0.1), (2, 0.6))


def test_a_failing_subscriber_does_not_reach_the_producer() -> None:
    progress = RunProgress("local gepa", "demo")

    def broken(_: ProgressSnapshot) -> None:
        raise RuntimeError("view bug")

    progress.subscribe(broken)
    assert progress.update(iteration=3).iteration == 3


def test_updates_from_many_threads_lose_nothing() -> None:
    progress = RunProgress("local gepa", "demo")

    def add(start: int) -> None:
        for i in range(start, start + 200):
            progress.upsert_candidate(CandidateSummary(str(i)))

    threads = [threading.Thread(target=add, args=(n * 200,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(progress.snapshot().candidates) == 800
