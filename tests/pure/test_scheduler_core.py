"""The scheduler core: placement, retries, lost peers, failure isolation, scale-in, scale."""

from __future__ import annotations

import time
from collections.abc import Iterable

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus

REF = FileRef("0" * 64, 1)


def sched(tasks: Iterable[tuple[str, list[str]]], retries: int = 0, **kw: object) -> SchedulerCore:
    return SchedulerCore(((n, d, "", retries) for n, d in tasks), **kw)  # type: ignore[arg-type]


def dispatched(out: list[core.Instruction]) -> list[tuple[str, str]]:
    return [(i.task, i.peer) for i in out if isinstance(i, core.Dispatch)]


def finish(s: SchedulerCore, task: str, now: float, exit_code: int = 0) -> list[core.Instruction]:
    """Report a task's attempt and, if it succeeded, its outputs collected."""
    t = s.tasks[task]
    assert t.peer is not None
    out = s.handle(core.TaskReported(t.peer, task, t.attempts, exit_code, "", (("f", REF),)), now)
    if exit_code == 0:
        out += s.handle(core.OutputsCollected(task, t.attempts), now)
    s.validate_state()
    return out


def test_a_chain_runs_in_order_and_the_job_succeeds() -> None:
    s = sched([("a", []), ("b", ["a"]), ("c", ["b"])])
    assert dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0)) == [("a", "p1")]
    assert dispatched(finish(s, "a", 1.0)) == [("b", "p1")]
    assert dispatched(finish(s, "b", 2.0)) == [("c", "p1")]
    out = finish(s, "c", 3.0)
    assert core.Release("p1") in out
    assert out[-1] == core.Finished("succeeded", "all 3 tasks succeeded")


def test_a_peer_never_runs_more_tasks_than_its_cpus() -> None:
    s = sched([(f"t{i}", []) for i in range(5)])
    out = s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    assert len(dispatched(out)) == 2
    out = s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    assert len(dispatched(out)) == 1
    s.validate_state()


def test_the_critical_path_goes_first() -> None:
    # long: l1 -> l2 -> l3; short: s1 alone. One slot: l1 must start before s1.
    s = sched([("s1", []), ("l1", []), ("l2", ["l1"]), ("l3", ["l2"])])
    assert dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0)) == [("l1", "p1")]


def test_a_failing_task_is_retried_then_fails_the_job_and_other_branches_finish() -> None:
    s = sched([("bad", []), ("after_bad", ["bad"]), ("good", [])], retries=1)
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    out = finish(s, "bad", 1.0, exit_code=3)
    assert ("bad", "p1") in dispatched(out)  # the retry
    finish(s, "good", 1.5)
    out = finish(s, "bad", 2.0, exit_code=3)
    assert s.tasks["bad"].status is TaskStatus.FAILED
    assert s.tasks["bad"].attempts == 2
    assert s.tasks["after_bad"].status is TaskStatus.SKIPPED
    assert s.tasks["good"].status is TaskStatus.DONE
    assert isinstance(out[-1], core.Finished) and out[-1].status == "failed"
    assert "bad" in out[-1].reason and "1 skipped" in out[-1].reason


def test_a_lost_peer_s_tasks_are_rescheduled_without_using_a_retry() -> None:
    s = sched([("a", []), ("b", []), ("c", [])])
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)  # takes a and b
    s.handle(core.PeerJoined("p2", 1, {}), 0.0)  # takes c
    assert s.handle(core.PeerLost("p1", "silent"), 1.0) == []  # p2 is full
    s.validate_state()
    assert s.wanted_peers() == 2
    assert all(t.failures == 0 for t in s.tasks.values())
    assert "peer p1 lost (silent)" in s.story("a")[-1][1]
    assert dispatched(finish(s, "c", 2.0)) == [("a", "p2")]


def test_a_late_report_from_a_lost_peer_is_ignored() -> None:
    s = sched([("a", [])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.PeerLost("p1", "silent"), 1.0)
    s.handle(core.PeerJoined("p2", 1, {}), 1.0)
    assert s.handle(core.TaskReported("p1", "a", 1, 0, "", ()), 2.0) == []
    assert s.tasks["a"].status is TaskStatus.RUNNING and s.tasks["a"].peer == "p2"
    s.validate_state()


def test_peers_are_released_as_soon_as_no_unstarted_task_is_left() -> None:
    s = sched([("a", []), ("b", [])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    # Nothing is left for a third peer: it goes straight back.
    assert s.handle(core.PeerJoined("p3", 1, {}), 0.0) == [core.Release("p3")]
    out = finish(s, "a", 1.0)
    assert [i for i in out if isinstance(i, core.Release)] == [core.Release("p1")]
    assert "p2" in s.peers


def test_per_task_requirements_restrict_placement() -> None:
    s = SchedulerCore(
        [("big", [], "ram>=4096", 0), ("small", [], "", 0)],
        matches=lambda req, attrs: int(attrs["ram"]) >= 4096,
    )
    out = s.handle(core.PeerJoined("tiny", 2, {"ram": "1024"}), 0.0)
    assert dispatched(out) == [("small", "tiny")]
    assert s.unplaceable() == ["big"]
    assert dispatched(s.handle(core.PeerJoined("huge", 1, {"ram": "8192"}), 0.0)) == [
        ("big", "huge")
    ]


def test_cancel_releases_every_peer() -> None:
    s = sched([("a", []), ("b", ["a"])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = s.handle(core.CancelRequested("cancelled by the user"), 1.0)
    assert out == [core.Release("p1"), core.Finished("failed", "cancelled by the user")]
    assert s.handle(core.PeerJoined("p2", 1, {}), 2.0) == []


def test_a_100000_task_dag_loads_and_schedules() -> None:
    n = 100_000
    # A wide layer of n-1 tasks feeding one sink: worst case for a naive ready-list scan.
    tasks = [(f"t{i}", []) for i in range(n - 1)] + [("sink", [f"t{i}" for i in range(n - 1)])]
    start = time.perf_counter()
    s = sched(tasks)
    for p in range(100):
        s.handle(core.PeerJoined(f"p{p}", 8, {}), 0.0)
    assert s.counts[TaskStatus.RUNNING] == 800
    elapsed = time.perf_counter() - start
    assert s.tasks["t0"].priority == 1 and s.tasks["sink"].priority == 0
    assert elapsed < 30  # a guard against quadratic blow-up, not a benchmark
