"""The scheduler core: placement, retries, lost peers, failure isolation, scale-in, scale."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert dispatched(finish(s, "bad", 1.0, exit_code=3)) == []  # backing off
    out = s.handle(core.Tick(), 2.0)
    assert ("bad", "p1") in dispatched(out)  # the retry, 1 s later
    finish(s, "good", 2.5)
    out = finish(s, "bad", 3.0, exit_code=3)
    assert s.tasks["bad"].status is TaskStatus.FAILED
    assert s.tasks["bad"].attempts == 2
    assert core.TaskFailed("bad", "exit code 3", 2) in out  # journaled
    assert s.tasks["after_bad"].status is TaskStatus.SKIPPED
    assert s.tasks["good"].status is TaskStatus.DONE
    assert isinstance(out[-1], core.Finished) and out[-1].status == "failed"
    assert "bad" in out[-1].reason and "1 skipped" in out[-1].reason


def test_a_lost_peer_s_tasks_are_rescheduled_without_using_a_retry() -> None:
    s = sched([("a", []), ("b", []), ("c", [])])
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)  # takes a and b
    s.handle(core.PeerJoined("p2", 1, {}), 0.0)  # takes c
    out = s.handle(core.PeerLost("p1", "silent"), 1.0)
    assert out == [core.Notice("peer p1 lost (silent): a, b go back to the queue")]  # p2 full
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
    print(f"\n{n} tasks placed on 100 peers in {elapsed:.2f} s")  # figures: benchmarks/


# -- retries with exponential backoff -------------------------------------------------------


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    s = sched([("t", [])], retries=9, backoff_base_s=1.0, backoff_cap_s=5.0)
    assert [s.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    now, starts = 0.0, [0.0]
    for _ in range(4):
        now += 0.5  # the attempt runs half a second, then fails
        assert dispatched(finish(s, "t", now, exit_code=1)) == []
        wake = s.next_wakeup()
        assert wake is not None
        # Not a moment early: a Tick just before the backoff ends places nothing.
        assert dispatched(s.handle(core.Tick(), wake - 0.01)) == []
        assert dispatched(s.handle(core.Tick(), wake)) == [("t", "p1")]
        assert s.next_wakeup() is None
        now = wake
        starts.append(now)
        s.validate_state()
    gaps = [b - a - 0.5 for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0, 5.0]
    assert "retry 2/9 in 2 s" in " ".join(line for _, line in s.story("t"))


def test_a_task_backing_off_lets_other_ready_tasks_go_and_holds_the_job_open() -> None:
    s = sched([("flaky", []), ("a", []), ("b", [])], retries=1)
    # Equal priorities: the workflow's order decides, so flaky goes first.
    assert dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0)) == [("flaky", "p1")]
    out = finish(s, "flaky", 1.0, exit_code=1)
    # flaky waits until 2.0; the slot goes to another ready task at once.
    assert dispatched(out) == [("a", "p1")]
    assert s.wanted_peers() == 1  # b wants a peer; the backing-off flaky asks for none
    assert dispatched(finish(s, "a", 1.1)) == [("b", "p1")]
    out = finish(s, "b", 1.2)
    assert not any(isinstance(i, core.Finished) for i in out)  # flaky still has its retry
    assert s.finished is None and s.next_wakeup() == 2.0
    assert "p1" in s.peers  # not released: flaky will need it
    assert dispatched(s.handle(core.Tick(), 2.0)) == [("flaky", "p1")]
    out = finish(s, "flaky", 2.5)
    assert out[-1] == core.Finished("succeeded", "all 3 tasks succeeded")


def test_a_retry_goes_to_another_peer_when_one_is_free() -> None:
    # u (first: it is on the longer chain) holds p1; t runs on p2; p3 is free (v waits on u).
    s = sched([("t", []), ("u", []), ("v", ["u"])], retries=2, backoff_base_s=0.0)
    for peer in ("p1", "p2", "p3"):
        s.handle(core.PeerJoined(peer, 1, {}), 0.0)
    assert (s.tasks["u"].peer, s.tasks["t"].peer) == ("p1", "p2")
    out = finish(s, "t", 1.0, exit_code=1)  # no backoff: placed again at once, elsewhere
    assert dispatched(out) == [("t", "p3")]
    out = finish(s, "t", 2.0, exit_code=1)  # failed on both free peers: either will do
    assert len(dispatched(out)) == 1
    assert s.tasks["t"].failed_on == ("p2", "p3")


def test_tasks_collected_and_failed_for_good_are_recorded_for_the_journal() -> None:
    s = sched([("a", []), ("b", ["a"])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = finish(s, "a", 1.0)
    done = [i for i in out if isinstance(i, core.TaskDone)]
    assert done == [core.TaskDone("a", "p1", 1, (("f", REF),))]
    # Recorded before the successor goes out, so a crash never runs b without a journaled.
    assert out.index(done[0]) < out.index(core.Dispatch("b", "p1", 1))


# -- resume: tasks done in an earlier run ---------------------------------------------------


def test_a_resumed_job_starts_after_the_tasks_kept_from_the_journal() -> None:
    s = sched([("a", []), ("b", ["a"]), ("c", ["b"]), ("side", [])], done={"a": (("f", REF),)})
    s.validate_state()
    assert s.tasks["a"].status is TaskStatus.DONE and s.tasks["a"].resumed
    assert s.tasks["a"].outputs == (("f", REF),)  # what b's inputs are staged from
    assert s.counts[TaskStatus.DONE] == 1 and s.pending() == 3
    out = s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    assert sorted(dispatched(out)) == [("b", "p1"), ("side", "p1")]
    finish(s, "side", 1.0)
    finish(s, "b", 1.0)
    out = finish(s, "c", 2.0)
    assert out[-1] == core.Finished("succeeded", "all 4 tasks succeeded")
    assert s.tasks["a"].attempts == 0 and "resumed" in s.story("a")[0][1]


def test_a_job_kept_whole_from_the_journal_finishes_on_the_first_tick() -> None:
    s = sched([("a", []), ("b", ["a"])], done={"a": (), "b": ()})
    assert s.pending() == 0
    assert s.handle(core.Tick(), 0.0) == [core.Finished("succeeded", "all 2 tasks succeeded")]
    s.validate_state()


def test_a_task_cannot_be_kept_when_one_it_needs_runs_again() -> None:
    with pytest.raises(ValueError, match="'a' runs again"):
        sched([("a", []), ("b", ["a"])], done={"b": ()})
    with pytest.raises(ValueError, match="not in the workflow"):
        sched([("a", [])], done={"zz": ()})


# -- random runs: the invariants hold whatever happens, and every job ends -----------------


Scenario = tuple[
    list[tuple[str, list[str], str, int]], set[str], list[int], dict[str, core.TaskData]
]
PRE_SKIP = 9  # the exit code of a random pre that skips its task


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 7))
    tasks = []
    data: dict[str, core.TaskData] = {}
    for i in range(n):
        before = sorted(draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else []
        tasks.append((f"t{i}", [f"t{d}" for d in before], "", draw(st.integers(0, 2))))
        pre, post = draw(st.booleans()), draw(st.booleans())  # pre and post scripts
        skip = PRE_SKIP if pre and draw(st.booleans()) else None
        data[f"t{i}"] = core.TaskData(pre=pre, post=post, pre_skip=skip)
    done: set[str] = set()
    for name, deps, _, _ in tasks:  # a kept task's predecessors are all kept
        if all(d in done for d in deps) and draw(st.booleans()):
            done.add(name)
    return tasks, done, draw(st.lists(st.integers(0, 7), max_size=60)), data


@given(scenarios())
@settings(max_examples=150, deadline=None)
def test_random_runs_keep_the_invariants_and_always_end(scenario: Scenario) -> None:
    tasks, done, moves, data = scenario
    s = SchedulerCore(tasks, done={name: () for name in done}, backoff_base_s=0.5, data=data)
    now, peers = 0.0, 0

    def step(move: int) -> None:
        nonlocal now, peers
        now += 0.25
        running = [t for t in s.tasks.values() if t.status is TaskStatus.RUNNING]
        collecting = [t for t in s.tasks.values() if t.status is TaskStatus.COLLECTING]
        scripted = [t for t in s.tasks.values() if t.script]
        out: list[core.Instruction] = []
        if move == 0 or not s.peers:
            peers += 1
            out = s.handle(core.PeerJoined(f"p{peers}", 1 + peers % 2, {}), now)
        elif move == 1:
            out = s.handle(core.PeerLost(sorted(s.peers)[0], "silent"), now)
        elif move in (2, 3) and running:
            t = running[0]
            assert t.peer is not None
            code = 0 if move == 2 else 1
            out = s.handle(core.TaskReported(t.peer, t.name, t.attempts, code, "", ()), now)
        elif move == 4 and collecting:
            out = s.handle(core.OutputsCollected(collecting[0].name, collecting[0].attempts), now)
        elif move in (5, 6, 7) and scripted:  # a pre or post script ends: 0, 1 or pre_skip
            t = scripted[0]
            attempt = t.attempts + (1 if t.script == "pre" else 0)
            code = [0, 1, PRE_SKIP][move - 5]
            out = s.handle(core.ScriptEnded(t.name, t.script, attempt, code), now)
        else:
            wake = s.next_wakeup()
            now = max(now, wake or now)
            out = s.handle(core.Tick(), now)
        s.validate_state()
        ends = [i for i in out if isinstance(i, core.Finished)]
        if ends:
            assert s.pending() == 0  # never while a task runs, is ready, or backs off
            assert (ends[0].status == "succeeded") == all(
                t.status is TaskStatus.DONE for t in s.tasks.values()
            )

    for move in moves:
        if s.finished is None:
            step(move)
    for i in range(500):  # then everything succeeds: the job must end
        if s.finished is None:
            step([2, 4, 5][i % 3])
    assert s.finished is not None
    assert all(s.tasks[name].attempts == 0 for name in done)


def test_a_retry_asks_for_a_fresh_peer_when_only_its_failed_peer_is_held() -> None:
    s = sched([("t", [])], retries=1)
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = finish(s, "t", 1.0, exit_code=1)
    assert core.Recruit(1, "a fresh peer for the retry of t") in out
    s.handle(core.PeerJoined("p2", 1, {}), 1.5)
    out = s.handle(core.Tick(), 1.0 + s.backoff(1))
    assert dispatched(out) == [("t", "p2")]
    s.validate_state()
