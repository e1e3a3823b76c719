"""A held peer's owner comes back: its runs are suspended, then resumed or vacated.

The core keeps a suspended run RUNNING on its held peer (the worker keeps the lease), notes
the suspension in the task's story (the report counts it), and treats a vacate as the lost
peer it is: the run goes back to the queue with no retry used.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus
from bonjourgrid.coordinator.report import suspension_facts

REF = FileRef("0" * 64, 1)


def test_a_suspended_run_stays_running_on_its_peer_and_its_story_says_so() -> None:
    s = SchedulerCore([("a", [], "", 0)])
    s.handle(core.PeerJoined("desk", 1, {}), 0.0)
    s.handle(core.RunStarted("desk", "a", 1), 0.5)
    out = s.handle(core.PeerSuspended("desk", True, "its owner came back"), 1.0)
    assert out == [core.Notice("peer desk suspended a: its owner came back")]
    assert s.tasks["a"].status is TaskStatus.RUNNING and s.tasks["a"].peer == "desk"
    # Its heartbeats still list the run: nothing fails while the owner reads an email.
    assert s.handle(core.PeerRunning("desk", frozenset({("a", 1)})), 2.0) == []
    s.handle(core.PeerSuspended("desk", False, "its owner went away again"), 4.0)
    s.handle(core.TaskReported("desk", "a", 1, 0, "", (("f", REF),)), 6.0)
    s.handle(core.OutputsCollected("a", 1), 6.0)
    s.validate_state()
    assert s.tasks["a"].attempts == 1 and s.finished is not None
    assert suspension_facts(s.story("a")) == {"suspensions": 1, "suspended_s": 3.0}


def test_a_vacated_run_goes_elsewhere_with_no_retry_used() -> None:
    s = SchedulerCore([("a", [], "", 0)])  # no retries at all
    s.handle(core.PeerJoined("desk", 1, {}), 0.0)
    s.handle(core.PeerSuspended("desk", True, "its owner came back"), 1.0)
    s.handle(core.PeerLost("desk", "preempted: its owner stayed 5 s: vacated"), 6.0)
    out = s.handle(core.PeerJoined("spare", 1, {}), 6.0)
    assert [(i.task, i.peer) for i in out if isinstance(i, core.Dispatch)] == [("a", "spare")]
    assert s.tasks["a"].failures == 0
    s.validate_state()
    assert suspension_facts(s.story("a")) == {"suspensions": 1, "suspended_s": 5.0}


def test_news_of_a_peer_the_job_does_not_hold_is_ignored() -> None:
    s = SchedulerCore([("a", [], "", 0)])
    assert s.handle(core.PeerSuspended("stranger", True, "its owner came back"), 1.0) == []
    assert suspension_facts(s.story("a")) == {}


@given(st.lists(st.integers(0, 7), max_size=80), st.integers(1, 6))
@settings(max_examples=150, deadline=None)
def test_random_suspensions_resumes_and_vacates_keep_the_invariants(
    moves: list[int], count: int
) -> None:
    s = SchedulerCore([(f"t{i}", [f"t{i - 1}"] if i % 3 else [], "", 1) for i in range(count)])
    now, joined = 0.0, 0
    suspended: set[str] = set()
    for move in [*moves, *[3] * 200]:  # then every run finishes: the job must end
        if s.finished is not None:
            break
        now += 0.25
        running = [t for t in s.tasks.values() if t.status is TaskStatus.RUNNING]
        if move == 0 or not s.peers:
            joined += 1
            s.handle(core.PeerJoined(f"p{joined}", 1 + joined % 2, {}), now)
        elif move in (1, 2):  # an owner comes back, or leaves again
            peer = sorted(s.peers)[move % len(s.peers)]
            back = peer not in suspended
            s.handle(core.PeerSuspended(peer, back, "owner"), now)
            (suspended.add if back else suspended.discard)(peer)
        elif move == 4 and suspended:  # an owner stays: vacated
            peer = sorted(suspended)[0]
            suspended.discard(peer)
            s.handle(core.PeerLost(peer, "preempted: vacated"), now)
        elif move == 5 and running:  # a suspended run's peer goes on listing it
            t = running[0]
            assert t.peer is not None
            s.handle(core.PeerRunning(t.peer, frozenset({(t.name, t.attempts)})), now)
        elif running:
            t = running[0]
            assert t.peer is not None
            s.handle(core.TaskReported(t.peer, t.name, t.attempts, 0, "", (("f", REF),)), now)
            if s.tasks[t.name].status is TaskStatus.COLLECTING:
                s.handle(core.OutputsCollected(t.name, t.attempts), now)
        else:
            now = max(now, s.next_wakeup() or now)
            s.handle(core.Tick(), now)
        s.validate_state()
        assert all(t.failures == 0 for t in s.tasks.values())  # no suspension costs a retry
    assert s.finished is not None and s.finished.status == "succeeded"
