"""Node semantics in the scheduler core: priority, category caps, retry_unless_exit,
abort_on, final and noop (DAGMan's PRIORITY, CATEGORY/MAXJOBS, RETRY UNLESS-EXIT,
ABORT-DAG-ON, FINAL, NOOP), each rule on its own, then all of them in random runs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import NodeRules, SchedulerCore, TaskStatus
from bonjourgrid.coordinator.model import TaskData
from bonjourgrid.coordinator.prefetch import PrefetchSettings

Spec = tuple[str, list[str]]  # (name, the tasks it needs)


def sched(
    tasks: list[Spec],
    rules: Mapping[str, NodeRules] | None = None,
    caps: Mapping[str, int] | None = None,
    retries: int = 0,
) -> SchedulerCore:
    return SchedulerCore(
        ((name, deps, "", retries) for name, deps in tasks),
        rules=rules,
        category_caps=caps,
        backoff_base_s=0.0,
    )


def dispatched(out: list[core.Instruction]) -> list[str]:
    return [i.task for i in out if isinstance(i, core.Dispatch)]


def report(s: SchedulerCore, task: str, now: float, code: int = 0) -> list[core.Instruction]:
    """The attempt of `task` ends with `code`; a success's outputs are collected."""
    t = s.tasks[task]
    assert t.peer is not None and t.status is TaskStatus.RUNNING
    out = s.handle(core.TaskReported(t.peer, task, t.attempts, code, "", ()), now)
    if code == 0 and t.status is TaskStatus.COLLECTING:
        out += s.handle(core.OutputsCollected(task, t.attempts), now)
    s.validate_state()
    return out


def running(s: SchedulerCore) -> list[str]:
    return sorted(n for n, t in s.tasks.items() if t.status is TaskStatus.RUNNING)


# -- priority ---------------------------------------------------------------------------------


def test_priority_goes_before_the_critical_path_and_ties_keep_it() -> None:
    # a and y head chains (bottom level 1), x and z stand alone (level 0)
    tasks = [("a", []), ("b", ["a"]), ("x", []), ("y", []), ("w", ["y"]), ("z", [])]
    s = sched(tasks, {"z": NodeRules(priority=5), "y": NodeRules(priority=-1)})
    order = dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0))
    while s.finished is None:
        order += dispatched(report(s, running(s)[0], 1.0))
    # z first for its priority; among priority 0 the longer chain first (a before x); y's
    # -1 puts it after every task of priority 0, b too, though its chain is longer than x's
    assert order == ["z", "a", "x", "b", "y", "w"]


# -- categories -------------------------------------------------------------------------------


def test_a_category_never_runs_more_than_its_cap_and_its_tasks_wait_ready() -> None:
    tasks = [(f"d{i}", []) for i in range(4)] + [("x", [])]
    s = sched(tasks, {f"d{i}": NodeRules(category="dl") for i in range(4)}, {"dl": 2})
    out = s.handle(core.PeerJoined("p1", 8, {}), 0.0)
    assert sorted(dispatched(out)) == ["d0", "d1", "x"]  # 8 slots, but dl holds at 2
    assert s.tasks["d2"].status is TaskStatus.READY
    assert not s.ready.has_ready()  # a full category is no work: the free slots rest
    assert s.handle(core.Tick(), 0.5) == []
    out = report(s, "d0", 1.0)
    assert dispatched(out) == ["d2"]
    out = report(s, "x", 1.5)
    assert dispatched(out) == []  # a free slot does not start a third dl
    s.validate_state()


def test_tasks_a_cap_holds_back_ask_for_no_peers() -> None:
    tasks = [(f"d{i}", []) for i in range(5)] + [("x", [])]
    s = sched(tasks, {f"d{i}": NodeRules(category="dl") for i in range(5)}, {"dl": 2})
    assert s.wanted_peers() == 3  # two of dl and x; three dl would only wait
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert s.wanted_peers() == 2  # one dl runs: one more dl and x


def test_a_category_without_a_cap_is_unlimited() -> None:
    tasks = [(f"t{i}", []) for i in range(3)]
    s = sched(tasks, {f"t{i}": NodeRules(category="free") for i in range(3)})
    assert len(dispatched(s.handle(core.PeerJoined("p1", 3, {}), 0.0))) == 3


def test_a_capped_task_is_not_planned_ahead_on_a_busy_peer() -> None:
    data = {f"t{i}": TaskData((f"in{i}",), (f"out{i}",)) for i in range(4)}
    refs = {f"in{i}": FileRef(f"{i}" * 64, 10) for i in range(4)}
    s = SchedulerCore(
        ((f"t{i}", [], "", 0) for i in range(4)),
        data=data,
        sources=refs,
        prefetch=PrefetchSettings("lookahead", 2, 10**9, 0),
        rules={f"t{i}": NodeRules(category="c") for i in range(2)},
        category_caps={"c": 1},
    )
    out = s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    assert dispatched(out) == ["t0"]
    planned = [s.tasks[f"t{i}"].planned_on for i in range(4)]
    assert planned[1] is None  # capped: waits for its category, not for a peer
    assert planned[2:] == ["p1", "p1"]
    s.validate_state()


# -- retry_unless_exit --------------------------------------------------------------------------


def test_retry_unless_exit_fails_the_task_for_good_on_that_code_only() -> None:
    s = sched([("t", []), ("u", [])], {"t": NodeRules(unless_exit=4)}, retries=3)
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    out = report(s, "t", 1.0, code=1)  # another code: retried as usual (no backoff here)
    assert "t" in dispatched(out)
    out = report(s, "t", 2.0, code=4)
    assert s.tasks["t"].status is TaskStatus.FAILED
    assert [i.task for i in out if isinstance(i, core.TaskFailed)] == ["t"]
    assert "retry_unless_exit 4: no retry" in s.story("t")[-1][1]
    assert s.tasks["t"].attempts == 2  # one retry of the three was used


# -- abort_on ---------------------------------------------------------------------------------


def test_abort_on_stops_the_running_tasks_skips_the_rest_and_says_why() -> None:
    tasks = [("a", []), ("b", []), ("c", ["a"]), ("d", [])]
    s = sched(tasks, {"a": NodeRules(abort_exit=3, abort_status=7)}, retries=2)
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    assert running(s) == ["a", "b"]
    out = report(s, "a", 1.0, code=3)
    assert [(i.task, i.peer) for i in out if isinstance(i, core.StopRun)] == [("b", "p1")]
    assert dispatched(out) == []  # nothing new starts, not even d on the freed slots
    assert {n: t.status for n, t in s.tasks.items()} == {
        "a": TaskStatus.FAILED,  # no retry, however many are left
        "b": TaskStatus.FAILED,
        "c": TaskStatus.SKIPPED,
        "d": TaskStatus.SKIPPED,
    }
    assert s.finished is not None
    assert s.finished.status == "aborted" and s.finished.exit_status == 7
    assert s.finished.aborted_by == "a" and s.finished.exit_code() == 7
    assert "task a exited 3, which aborts the job" in s.finished.reason
    assert s.handle(core.TaskReported("p1", "b", 1, 0, "", ()), 2.0) == []  # too late
    s.validate_state()


def test_other_exit_codes_of_an_abort_on_task_are_plain_failures() -> None:
    s = sched([("a", [])], {"a": NodeRules(abort_exit=3, abort_status=3)})
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    report(s, "a", 1.0, code=1)
    assert s.finished == core.Finished("failed", "1 task(s) failed (a)")
    assert s.finished.exit_code() == 1


# -- final ------------------------------------------------------------------------------------


def test_the_final_task_runs_after_every_other_ended_and_its_outcome_is_the_job_s() -> None:
    tasks = [("a", []), ("b", ["a"]), ("c", []), ("fin", [])]
    s = sched(tasks, {"fin": NodeRules(final=True)})
    out = s.handle(core.PeerJoined("p1", 4, {}), 0.0)
    assert sorted(dispatched(out)) == ["a", "c"]  # fin waits though it needs nothing
    out = report(s, "a", 1.0, code=1)  # a fails: b is skipped
    assert s.tasks["fin"].status is TaskStatus.WAITING  # c still runs
    out = report(s, "c", 2.0)
    assert dispatched(out) == ["fin"]
    out = report(s, "fin", 3.0)
    assert s.finished is not None and s.finished.status == "succeeded"
    assert s.finished.reason == (
        "final task fin succeeded after: 1 task(s) failed (a), "
        "1 skipped because they needed their outputs"
    )
    assert s.finished.exit_code() == 0


def test_a_failing_final_task_fails_a_job_whose_other_tasks_succeeded() -> None:
    s = sched([("a", []), ("fin", [])], {"fin": NodeRules(final=True)})
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    report(s, "a", 1.0)
    report(s, "fin", 2.0, code=2)
    assert s.finished == core.Finished("failed", "final task fin failed")


def test_the_final_task_runs_after_an_abort_and_decides_the_exit_status() -> None:
    rules = {"a": NodeRules(abort_exit=9, abort_status=4), "fin": NodeRules(final=True)}
    s = sched([("a", []), ("b", []), ("fin", [])], rules)
    s.handle(core.PeerJoined("p1", 2, {}), 0.0)
    out = report(s, "a", 1.0, code=9)
    assert dispatched(out) == ["fin"]  # b was stopped: nothing else is left
    assert s.abort == ("a", 9, 4)
    report(s, "fin", 2.0, code=1)
    assert s.finished is not None
    assert s.finished.status == "failed" and s.finished.exit_code() == 1
    assert s.finished.aborted_by == "a"
    assert s.finished.reason.startswith("final task fin failed after: task a exited 9")


def test_a_job_with_only_a_final_task_runs_it() -> None:
    s = sched([("fin", [])], {"fin": NodeRules(final=True)})
    assert dispatched(s.handle(core.PeerJoined("p1", 1, {}), 0.0)) == ["fin"]


def test_a_final_task_kept_from_the_journal_is_not_run_again_by_the_core() -> None:
    # the shell never keeps it (it reruns on every submit); the core still copes
    s = SchedulerCore(
        [("a", [], "", 0), ("fin", [], "", 0)],
        done={"fin": ()},
        rules={"fin": NodeRules(final=True)},
    )
    s.validate_state()
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    report(s, "a", 1.0)
    assert s.finished == core.Finished("succeeded", "all 2 tasks succeeded")


# -- noop -------------------------------------------------------------------------------------


def test_a_noop_task_is_done_once_ready_and_never_placed() -> None:
    s = sched([("a", []), ("gate", ["a"]), ("b", ["gate"])], {"gate": NodeRules(noop=True)})
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    out = report(s, "a", 1.0)
    assert core.TaskDone("gate", None, 0, ()) in out  # journaled like any done task
    assert dispatched(out) == ["b"]
    assert s.tasks["gate"].status is TaskStatus.DONE and s.tasks["gate"].attempts == 0


def test_a_job_of_noops_ends_on_its_first_event_without_a_peer() -> None:
    rules = {"a": NodeRules(noop=True), "b": NodeRules(noop=True)}
    rules["fin"] = NodeRules(noop=True, final=True)
    s = sched([("a", []), ("b", ["a"]), ("fin", [])], rules)
    s.validate_state()
    out = s.handle(core.Tick(), 0.0)
    assert [i.task for i in out if isinstance(i, core.TaskDone)] == ["a", "b", "fin"]
    assert s.finished == core.Finished("succeeded", "all 3 tasks succeeded")


def test_node_rules_are_refused_when_a_middleware_places_the_runs() -> None:
    with pytest.raises(ValueError, match="no node rules"):
        SchedulerCore([("a", [], "", 0)], placement="middleware", rules={"a": NodeRules(noop=True)})


# -- random runs: every rule mixed in, the invariants hold after every step, every job ends ----

CAPS = {"one": 1, "two": 2}


@st.composite
def node_scenarios(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, list[str], str, int]], dict[str, NodeRules], set[str], list[int]]:
    n = draw(st.integers(1, 8))
    tasks: list[tuple[str, list[str], str, int]] = []
    rules: dict[str, NodeRules] = {}
    for i in range(n):
        before = sorted(draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else []
        tasks.append((f"t{i}", [f"t{d}" for d in before], "", draw(st.integers(0, 2))))
        rule = NodeRules(
            priority=draw(st.integers(-1, 2)),
            category=draw(st.sampled_from(["", "", "one", "two", "free"])),
            unless_exit=draw(st.sampled_from([None, None, 1])),
            abort_exit=draw(st.sampled_from([None, None, None, 2])),
            abort_status=5,
            noop=draw(st.integers(0, 5)) == 0,
        )
        if rule != NodeRules():
            rules[f"t{i}"] = rule
    if draw(st.booleans()):  # a final task, apart from the others
        tasks.append(("fin", [], "", draw(st.integers(0, 1))))
        rules["fin"] = NodeRules(final=True, noop=draw(st.integers(0, 4)) == 0)
    done: set[str] = set()
    for name, deps, _, _ in tasks:  # a kept task's predecessors are all kept
        if name != "fin" and all(d in done for d in deps) and draw(st.integers(0, 3)) == 0:
            done.add(name)
    return tasks, rules, done, draw(st.lists(st.integers(0, 6), min_size=10, max_size=60))


@given(node_scenarios())
@settings(max_examples=300, deadline=None)
def test_random_runs_with_node_rules_keep_the_invariants_and_always_end(
    scenario: tuple[
        list[tuple[str, list[str], str, int]], dict[str, NodeRules], set[str], list[int]
    ],
) -> None:
    tasks, rules, done, moves = scenario
    s = SchedulerCore(
        tasks,
        done={name: () for name in done},
        backoff_base_s=0.5,
        rules=rules,
        category_caps=CAPS,
    )
    s.validate_state()
    now, peers = 0.0, 0
    final = s.tasks.get("fin")
    full_seen: set[str] = set()

    def step(move: int) -> None:
        nonlocal now, peers
        now += 0.25
        on = [t for t in s.tasks.values() if t.status is TaskStatus.RUNNING]
        collecting = [t for t in s.tasks.values() if t.status is TaskStatus.COLLECTING]
        out: list[core.Instruction] = []
        if move == 0 or not s.peers:
            peers += 1
            out = s.handle(core.PeerJoined(f"p{peers}", 1 + peers % 3, {}), now)
        elif move == 1:
            out = s.handle(core.PeerLost(sorted(s.peers)[0], "silent"), now)
        elif move in (2, 3, 6) and on:
            t = on[-1] if move == 6 else on[0]
            assert t.peer is not None
            code = {2: 0, 3: 1, 6: 2}[move]
            out = s.handle(core.TaskReported(t.peer, t.name, t.attempts, code, "", ()), now)
        elif move == 4 and collecting:
            out = s.handle(core.OutputsCollected(collecting[0].name, collecting[0].attempts), now)
        else:
            now = max(now, s.next_wakeup() or now)
            out = s.handle(core.Tick(), now)
        s.validate_state()
        full_seen.update(s.ready.full)
        for name, cap in CAPS.items():  # never over a cap, whatever happened
            placed = (TaskStatus.RUNNING, TaskStatus.COLLECTING)
            runs = [t for t in s.tasks.values() if t.status in placed]
            assert sum(t.category == name for t in runs) <= cap
        for d in out:
            if isinstance(d, core.Dispatch):
                assert not rules.get(d.task, NodeRules()).noop, f"noop {d.task} placed"
                if final is not None and d.task == "fin":
                    others = [t for t in s.tasks.values() if t is not final]
                    assert all(t.status in core.FINAL for t in others), "fin ran too soon"
        ends = [i for i in out if isinstance(i, core.Finished)]
        if ends:
            assert s.pending() == 0
            if final is not None:
                assert (ends[0].status == "succeeded") == (final.status is TaskStatus.DONE)
            elif s.abort is not None:
                assert ends[0].status == "aborted" and ends[0].exit_code() == 5
            else:
                assert (ends[0].status == "succeeded") == all(
                    t.status is TaskStatus.DONE for t in s.tasks.values()
                )

    for move in moves:
        if s.finished is None:
            step(move)
    for i in range(600):  # then everything succeeds: the job must end
        if s.finished is None:
            step([2, 4, 5][i % 3])
    assert s.finished is not None
    event(f"ended {s.finished.status}" + (" after an abort" if s.abort else ""))
    event("a category was full" if full_seen else "no category was full")
    assert all(s.tasks[name].attempts == 0 for name in done)
    if final is not None:
        assert final.status in core.FINAL and (final.attempts > 0 or rules["fin"].noop)
