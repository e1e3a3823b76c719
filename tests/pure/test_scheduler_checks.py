"""The scheduler does not take a peer's word for it: a refused run, a run never acknowledged
and a run its peer stops listing are each a failed attempt, retried per the task's retries,
with the reason in the task's error and story."""

from __future__ import annotations

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus

REF = FileRef("0" * 64, 1)


def sched(retries: int = 0, ack_timeout_s: float | None = 5.0) -> SchedulerCore:
    return SchedulerCore([("t", [], "", retries)], backoff_base_s=1.0, ack_timeout_s=ack_timeout_s)


def dispatched(out: list[core.Instruction]) -> list[tuple[str, str, int]]:
    return [(i.task, i.peer, i.attempt) for i in out if isinstance(i, core.Dispatch)]


def failed(out: list[core.Instruction]) -> list[core.TaskFailed]:
    return [i for i in out if isinstance(i, core.TaskFailed)]


def test_a_refused_run_is_a_failed_attempt_with_the_peers_reason_and_is_retried() -> None:
    s = sched(retries=1)
    assert dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0)) == [("t", "p1", 1)]
    why = "peer p1 refused the run: the command contains a NUL byte"
    s.handle(core.AttemptFailed("p1", "t", 1, why), 0.5)
    task = s.tasks["t"]
    assert task.status is TaskStatus.READY and task.error == why and task.failed_on == ("p1",)
    assert any(why in line for _, line in s.story("t"))
    out = s.handle(core.Tick(), 1.5)  # after the backoff, on the only peer there is
    assert dispatched(out) == [("t", "p1", 2)]
    s.validate_state()
    out = s.handle(core.AttemptFailed("p1", "t", 2, "peer p1 refused the run: no"), 2.0)
    assert failed(out) == [core.TaskFailed("t", "peer p1 refused the run: no", 2)]
    assert out[-1] == core.Finished("failed", "1 task(s) failed (t)")


def test_news_about_another_attempt_or_peer_changes_nothing() -> None:
    s = sched()
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    for stale in (
        core.AttemptFailed("p1", "t", 2, "old"),
        core.AttemptFailed("p9", "t", 1, "stranger"),
        core.AttemptFailed("p1", "nosuch", 1, "unknown task"),
        core.RunStarted("p9", "t", 1),
    ):
        assert s.handle(stale, 0.1) == []
    assert s.tasks["t"].status is TaskStatus.RUNNING and not s.tasks["t"].acked
    s.validate_state()


def test_a_run_never_acknowledged_fails_at_its_deadline() -> None:
    s = sched(ack_timeout_s=5.0)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert s.next_wakeup() == 5.0  # the shell ticks the core then
    assert s.handle(core.Tick(), 4.9) == []
    out = s.handle(core.Tick(), 5.0)
    assert failed(out) == [core.TaskFailed("t", "peer p1 never acknowledged the run of t", 1)]
    s.validate_state()


def test_an_acknowledged_run_has_no_deadline() -> None:
    s = sched(ack_timeout_s=5.0)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.RunStarted("p1", "t", 1), 0.1)
    assert s.handle(core.Tick(), 60.0) == []
    assert s.tasks["t"].status is TaskStatus.RUNNING
    out = s.handle(core.TaskReported("p1", "t", 1, 0, "", (("f", REF),)), 61.0)
    assert [i for i in out if isinstance(i, core.Collect)]
    s.validate_state()


def test_a_run_missing_from_two_heartbeats_in_a_row_is_a_failed_attempt() -> None:
    s = sched(retries=1)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    nothing: frozenset[tuple[str, int]] = frozenset()
    # Before the peer acknowledged the run, a heartbeat without it proves nothing.
    assert s.handle(core.PeerRunning("p1", nothing), 0.5) == []
    s.handle(core.RunStarted("p1", "t", 1), 0.6)
    assert s.handle(core.PeerRunning("p1", nothing), 1.0) == []  # once: maybe a race
    assert s.handle(core.PeerRunning("p1", frozenset({("t", 1)})), 2.0) == []  # it is there
    assert s.handle(core.PeerRunning("p1", frozenset({("t", 7)})), 3.0) == []  # once more
    s.handle(core.PeerRunning("p1", nothing), 4.0)  # twice in a row: it is not running
    task = s.tasks["t"]
    assert task.status is TaskStatus.READY and task.error == "peer p1 is not running it"
    s.validate_state()
    out = s.handle(core.Tick(), 5.0)
    assert dispatched(out) == [("t", "p1", 2)]  # retried; the checks start over
    assert s.handle(core.PeerRunning("p1", nothing), 6.0) == []
    s.validate_state()


def test_without_an_ack_timeout_nothing_waits() -> None:
    s = sched(ack_timeout_s=None)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert s.next_wakeup() is None
