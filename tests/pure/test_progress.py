"""The progress displays (coordinator/progress.py): notes read off the core's events and
instructions, plain lines, the live panel's text."""

from __future__ import annotations

import io

from rich.console import Console

from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.progress import (
    LINE_INTERVAL_S,
    LINE_PER_TASK_MAX,
    LineDisplay,
    Note,
    PeerNow,
    Snapshot,
    notes_of,
    render,
)


def snap(total: int = 4, done: int = 1, elapsed: float = 2.0, **changes: object) -> Snapshot:
    fields: dict[str, object] = dict(
        job="wf-abc123",
        phase="running tasks",
        elapsed_s=elapsed,
        total=total,
        done=done,
        running=1,
        failed=0,
        skipped=0,
        kept=0,
        peers=(PeerNow("desk-1", 2, ("t2",)), PeerNow("desk-2", 1, ())),
        bytes_moved=3 * 1024 * 1024,
    )
    fields.update(changes)
    return Snapshot(**fields)  # type: ignore[arg-type]


def run_core(retries: int = 0) -> tuple[core.SchedulerCore, list[Note]]:
    """A one-task job on one peer, its first attempt failing: the notes on the way."""
    sched = core.SchedulerCore([("t1", [], "", retries)], matches=lambda text, attrs: True)
    notes: list[Note] = []
    now = 0.0

    def feed(event: core.Event) -> list[core.Instruction]:
        nonlocal now
        now += 1.0
        out = sched.handle(event, now)
        notes.extend(notes_of(event, out, sched.tasks))
        return out

    feed(core.PeerJoined("desk-1", 1, {}))
    feed(core.PeersSettled())
    feed(core.RunStarted("desk-1", "t1", 1))
    feed(core.TaskReported("desk-1", "t1", 1, 3, "", ()))
    return sched, notes


def test_notes_say_who_joined_what_started_and_failed_for_good() -> None:
    _, notes = run_core(retries=0)
    whats = [(n.what, n.subject) for n in notes]
    assert whats[:2] == [("joined", "desk-1"), ("started", "t1")]
    assert ("failed", "t1") in whats
    assert ("released", "desk-1") in whats
    assert "retry" not in [w for w, _ in whats]


def test_a_failed_attempt_with_retries_left_is_a_retry_note() -> None:
    _, notes = run_core(retries=1)
    retry = [n for n in notes if n.what == "retry"]
    assert len(retry) == 1 and retry[0].peer == "desk-1" and "exit code 3" in retry[0].detail
    assert "failed" not in [n.what for n in notes]


def test_line_display_writes_one_line_per_change_of_a_small_run() -> None:
    out = io.StringIO()
    lines = LineDisplay(out)
    lines.note(Note("done", "t1", "desk-1"), snap(done=2))
    lines.note(Note("lost", "desk-2", detail="silent for 5 s"), snap())
    lines.update(snap(elapsed=100.0))  # a small run has no summary lines
    assert out.getvalue().splitlines() == [
        "[    2.0s] task t1 done on desk-1 (2/4 done)",
        "[    2.0s] peer desk-2 lost: silent for 5 s",
    ]


def test_line_display_of_a_big_run_writes_a_summary_per_interval_and_the_failures() -> None:
    out = io.StringIO()
    lines = LineDisplay(out)
    big = LINE_PER_TASK_MAX + 1
    lines.note(Note("started", "t1", "desk-1"), snap(total=big))
    lines.note(Note("done", "t1", "desk-1"), snap(total=big))
    lines.update(snap(total=big, done=50, elapsed=LINE_INTERVAL_S))
    lines.update(snap(total=big, done=51, elapsed=LINE_INTERVAL_S + 1))  # within the interval
    lines.note(Note("failed", "t9", detail="exit 1"), snap(total=big))
    text = out.getvalue().splitlines()
    assert len(text) == 2
    assert f"50/{big} done, 1 running, 0 failed; 2 peer(s); 3.0 MiB moved; ETA" in text[0]
    assert "task t9 failed: exit 1" in text[1]


def test_eta_follows_this_runs_pace_and_ignores_kept_tasks() -> None:
    assert snap(total=10, done=2, elapsed=4.0).eta_s == 16.0
    assert snap(total=10, done=5, kept=5, elapsed=4.0).eta_s is None  # nothing ran yet
    assert snap(total=10, done=7, kept=5, elapsed=4.0).eta_s == 6.0


def test_the_live_panel_shows_counts_peers_and_what_they_run() -> None:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render(snap(total=200, done=120)))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "wf-abc123" in text and "120/200 done" in text and "3.0 MiB moved" in text
    assert "desk-1" in text and "t2" in text and "ETA" in text
