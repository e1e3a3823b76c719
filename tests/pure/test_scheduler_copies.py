"""The scheduler core: speculative copies of stragglers (copies.py, core "Speculative copies")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from hypothesis import event, given, settings
from hypothesis import strategies as st

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.copies import SpeculationSettings
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus

REF = FileRef("1" * 64, 1)
SPECULATE = SpeculationSettings(factor=2.0, min_runtime_s=1.0, min_siblings=2)


def sched(
    tasks: Iterable[tuple[str, list[str]]],
    retries: int = 0,
    speculation: SpeculationSettings = SPECULATE,
) -> SchedulerCore:
    return SchedulerCore(((n, d, "", retries) for n, d in tasks), speculation=speculation)


def of(kind: type, out: list[core.Instruction]) -> list[core.Instruction]:
    return [i for i in out if isinstance(i, kind)]


def report(
    s: SchedulerCore, task: str, peer: str, attempt: int, now: float, code: int = 0
) -> list[core.Instruction]:
    out = s.handle(core.TaskReported(peer, task, attempt, code, "", (("out", REF),)), now)
    s.validate_state()
    return out


def straggling_job() -> SchedulerCore:
    """Three siblings on three peers: s1 and s2 end after 2 s, s3 runs on (p3)."""
    s = sched([("s1", []), ("s2", []), ("s3", [])])
    for peer in ("p1", "p2", "p3"):
        s.handle(core.PeerJoined(peer, 1, {}), 0.0)
    assert {s.tasks[n].peer for n in ("s1", "s2", "s3")} == {"p1", "p2", "p3"}
    for name in ("s1", "s2"):
        t = s.tasks[name]
        assert t.peer is not None
        report(s, name, t.peer, 1, 2.0)
        s.handle(core.OutputsCollected(name, 1), 2.0)
    s.validate_state()
    return s


def test_a_straggler_gets_a_copy_on_an_idle_peer_once_it_runs_twice_the_median() -> None:
    s = straggling_job()
    t = s.tasks["s3"]
    assert t.status is TaskStatus.RUNNING and not s.copies  # 2 s: the median, not yet
    wake = s.next_wakeup()  # a scan of the running tasks soon (at most one per RESCAN_S)
    assert wake is not None and wake < 4.0
    assert not of(core.Dispatch, s.handle(core.Tick(), wake))
    assert s.next_wakeup() == 4.0  # when it becomes a straggler (2 x 2 s)
    out = s.handle(core.Tick(), 4.0)
    s.validate_state()
    copies = of(core.Dispatch, out)
    assert len(copies) == 1
    copy = copies[0]
    assert isinstance(copy, core.Dispatch)
    assert copy.task == "s3" and copy.peer != t.peer and copy.attempt == 2
    assert "speculative copy" in s.story("s3")[-1][1]
    assert "over 2 x the median 2.0 s" in s.story("s3")[-1][1]


def test_idle_peers_are_kept_while_a_running_task_may_yet_need_a_copy() -> None:
    s = straggling_job()
    assert len(s.peers) >= 2  # p3 runs s3, one idle peer at least is kept for its copy
    off = sched([("s1", []), ("s2", []), ("s3", [])], speculation=SpeculationSettings())
    for peer in ("p1", "p2", "p3"):
        off.handle(core.PeerJoined(peer, 1, {}), 0.0)
    for name in ("s1", "s2"):
        peer = off.tasks[name].peer
        assert peer is not None
        report(off, name, peer, 1, 2.0)
        off.handle(core.OutputsCollected(name, 1), 2.0)
    assert list(off.peers) == [off.tasks["s3"].peer]  # without speculation: released
    assert off.handle(core.Tick(), 10.0) == []


def test_the_first_copy_to_finish_wins_and_the_other_is_stopped_and_never_collected() -> None:
    s = straggling_job()
    slow_peer = s.tasks["s3"].peer
    dispatch = of(core.Dispatch, s.handle(core.Tick(), 4.0))[0]
    assert isinstance(dispatch, core.Dispatch)
    out = report(s, "s3", dispatch.peer, dispatch.attempt, 5.0)
    reason = f"its run on {dispatch.peer} (attempt 2) finished first"
    assert of(core.StopRun, out) == [core.StopRun("s3", slow_peer or "", 1, reason)]
    assert of(core.Collect, out) == [core.Collect("s3", dispatch.peer, 2, (("out", REF),))]
    # The stopped run's late report changes nothing: only the winner is collected.
    assert of(core.Collect, report(s, "s3", slow_peer or "", 1, 5.5)) == []
    out = s.handle(core.OutputsCollected("s3", 2), 6.0)
    assert of(core.TaskDone, out) == [core.TaskDone("s3", dispatch.peer, 2, (("out", REF),))]
    assert out[-1] == core.Finished("succeeded", "all 3 tasks succeeded")
    assert any("ended first: it wins" in why for _, why in s.story("s3"))
    s.validate_state()


def test_when_the_original_run_finishes_first_the_copy_is_stopped() -> None:
    s = straggling_job()
    slow_peer = s.tasks["s3"].peer or ""
    dispatch = of(core.Dispatch, s.handle(core.Tick(), 4.0))[0]
    assert isinstance(dispatch, core.Dispatch)
    out = report(s, "s3", slow_peer, 1, 4.5)
    reason = f"its run on {slow_peer} (attempt 1) finished first"
    assert of(core.StopRun, out) == [core.StopRun("s3", dispatch.peer, 2, reason)]
    assert of(core.Collect, out) == [core.Collect("s3", slow_peer, 1, (("out", REF),))]


def test_a_run_that_fails_while_its_copy_lives_uses_no_retry() -> None:
    s = straggling_job()
    slow_peer = s.tasks["s3"].peer or ""
    dispatch = of(core.Dispatch, s.handle(core.Tick(), 4.0))[0]
    assert isinstance(dispatch, core.Dispatch)
    out = report(s, "s3", slow_peer, 1, 4.5, code=1)
    t = s.tasks["s3"]
    assert t.status is TaskStatus.RUNNING and t.peer == dispatch.peer and t.failures == 0
    assert not of(core.TaskFailed, out) and slow_peer in t.failed_on
    out = report(s, "s3", dispatch.peer, 2, 5.0)
    assert of(core.Collect, out) == [core.Collect("s3", dispatch.peer, 2, (("out", REF),))]


def test_a_copy_whose_peer_is_lost_leaves_the_original_run_going() -> None:
    s = straggling_job()
    slow_peer = s.tasks["s3"].peer or ""
    dispatch = of(core.Dispatch, s.handle(core.Tick(), 4.0))[0]
    assert isinstance(dispatch, core.Dispatch)
    s.handle(core.PeerLost(dispatch.peer, "silent"), 4.5)
    s.validate_state()
    t = s.tasks["s3"]
    assert t.status is TaskStatus.RUNNING and t.peer == slow_peer and not s.copies
    out = report(s, "s3", slow_peer, 1, 5.0, code=0)
    assert of(core.Collect, out) == [core.Collect("s3", slow_peer, 1, (("out", REF),))]


def test_the_original_runs_peer_lost_hands_the_task_to_its_copy() -> None:
    s = straggling_job()
    slow_peer = s.tasks["s3"].peer or ""
    dispatch = of(core.Dispatch, s.handle(core.Tick(), 4.0))[0]
    assert isinstance(dispatch, core.Dispatch)
    out = s.handle(core.PeerLost(slow_peer, "silent"), 4.5)
    s.validate_state()
    t = s.tasks["s3"]
    assert t.status is TaskStatus.RUNNING and t.peer == dispatch.peer and t.attempts == 2
    assert not of(core.Dispatch, out)  # nothing placed again: the copy goes on


def test_no_copy_while_work_is_ready_before_enough_siblings_finished_or_when_off() -> None:
    s = sched([("a", []), ("b", []), ("c", [])])
    s.handle(core.PeerJoined("p1", 1, {}), 0.0)
    s.handle(core.PeerJoined("p2", 1, {}), 0.0)
    assert not of(core.Dispatch, s.handle(core.Tick(), 100.0))  # no sibling finished yet
    off = sched([("a", []), ("b", []), ("c", [])], speculation=SpeculationSettings())
    off.handle(core.PeerJoined("p1", 3, {}), 0.0)
    for name in ("a", "b"):
        report(off, name, "p1", 1, 1.0)
    assert not of(core.Dispatch, off.handle(core.Tick(), 100.0))
    assert not off.copies


# -- random runs: copies mixed in, the invariants hold, every job ends ---------------------


CopyScenario = tuple[list[tuple[str, list[str], str, int]], dict[str, int], list[int]]


@st.composite
def copy_scenarios(draw: st.DrawFn) -> CopyScenario:
    n = draw(st.integers(2, 7))
    tasks = []
    quorum = {}
    for i in range(n):
        before = sorted(draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else []
        tasks.append((f"t{i}", [f"t{d}" for d in before], "", draw(st.integers(0, 1))))
        quorum[f"t{i}"] = draw(st.sampled_from([1, 1, 2, 3]))
    return tasks, quorum, draw(st.lists(st.integers(0, 10), max_size=80))


@given(copy_scenarios())
@settings(max_examples=200, deadline=None)
def test_random_runs_with_copies_and_quorums_keep_the_invariants_and_always_end(
    scenario: CopyScenario,
) -> None:
    tasks, quorum, moves = scenario
    speculation = SpeculationSettings(factor=1.5, min_runtime_s=0.5, min_siblings=1)
    s = SchedulerCore(
        tasks, backoff_base_s=0.5, ack_timeout_s=3.0, speculation=speculation, quorum=quorum
    )
    now, peers = 0.0, 0
    done: list[str] = []  # TaskDone: the submit directory has the task's outputs

    def live_runs() -> list[tuple[str, str, int]]:
        runs = []
        for t in s.tasks.values():
            if t.status is TaskStatus.RUNNING:
                runs += [(t.name, peer, attempt) for peer, attempt in live_runs_of(s, t.name)]
        return runs

    def step(move: int) -> None:
        nonlocal now, peers
        now += 0.25
        runs = live_runs()
        collecting = [t for t in s.tasks.values() if t.status is TaskStatus.COLLECTING]
        out: list[core.Instruction] = []
        if move == 0 or not s.peers:
            peers += 1
            out = s.handle(core.PeerJoined(f"p{peers}", 1 + peers % 2, {}), now)
        elif move == 1:
            out = s.handle(core.PeerLost(sorted(s.peers)[0], "silent"), now)
        elif move == 10 and runs:  # the last run placed exits 0 with outputs of its own
            task, peer, attempt = runs[-1]
            lie = (("o", ref(f"made on {peer}")),)
            out = s.handle(core.TaskReported(peer, task, attempt, 0, "", lie), now)
        elif move in (2, 3, 4) and runs:  # the last run placed ends: 0, 1, or refused
            task, peer, attempt = runs[-1]
            if move == 4:
                out = s.handle(core.AttemptFailed(peer, task, attempt, "refused"), now)
            else:
                report = core.TaskReported(peer, task, attempt, move - 2, "", (("o", REF),))
                out = s.handle(report, now)
        elif move == 5 and runs:  # the first run placed ends well
            task, peer, attempt = runs[0]
            out = s.handle(core.TaskReported(peer, task, attempt, 0, "", ()), now)
        elif move == 6 and runs:
            for task, peer, attempt in runs:
                out += s.handle(core.RunStarted(peer, task, attempt), now)
        elif move == 7 and collecting:
            out = s.handle(core.OutputsCollected(collecting[0].name, collecting[0].attempts), now)
        else:
            wake = s.next_wakeup()
            now = max(now, wake or now + 1.0)
            out = s.handle(core.Tick(), now)
        s.validate_state()
        stopped = {(i.task, i.peer, i.attempt) for i in out if isinstance(i, core.StopRun)}
        for instruction in out:
            if isinstance(instruction, core.Collect):  # from the winner; the others stopped
                assert instruction.task not in s.copies
                winner = (instruction.task, instruction.peer, instruction.attempt)
                if quorum[instruction.task] > 1:  # the winner voted with the majority
                    event(f"a quorum of {quorum[instruction.task]} agreed")
                    votes = s.quorum_votes[instruction.task]["votes"]
                    assert any(v["peer"] == instruction.peer for v in votes)  # type: ignore[attr-defined]
                    continue
                assert winner in runs
                others = {r for r in runs if r[0] == instruction.task and r != winner}
                assert others <= stopped, f"{others - stopped} still run"
                event("a task with a copy was collected" if others else "collected")
            if isinstance(instruction, core.TaskFailed) and "no majority" in instruction.error:
                event("no majority formed")
            if isinstance(instruction, core.TaskDone):
                done.append(instruction.task)
            if isinstance(instruction, core.Finished):
                assert s.pending() == 0

    for move in moves:
        if s.finished is None:
            step(move)
    for i in range(600):  # then every run acknowledges and agrees: the job must end
        if s.finished is None:
            step([6, 5, 7, 9, 6, 5, 7, 0][i % 8])  # (a peer joins now and then)
    assert s.finished is not None
    # Never two writes of the submit directory: each task is done once, from one run.
    assert sorted(done) == sorted(n for n, t in s.tasks.items() if t.status is TaskStatus.DONE)


# -- quorum ---------------------------------------------------------------------------------


def ref(text: str) -> FileRef:
    return FileRef(hashlib.sha256(text.encode()).hexdigest(), len(text))


def quorum_job(n: int, peers: int) -> tuple[SchedulerCore, list[core.Instruction]]:
    s = SchedulerCore([("q", [], "", 0)], quorum={"q": n})
    out: list[core.Instruction] = []
    for i in range(1, peers + 1):
        out += s.handle(core.PeerJoined(f"p{i}", 1, {}), 0.0)
        s.validate_state()
    return s, out


def vote(
    s: SchedulerCore, peer: str, attempt: int, text: str, now: float
) -> list[core.Instruction]:
    out = s.handle(core.TaskReported(peer, "q", attempt, 0, "", (("out", ref(text)),)), now)
    s.validate_state()
    return out


def test_a_quorum_of_3_runs_on_3_distinct_peers_and_accepts_the_agreeing_result() -> None:
    s, out = quorum_job(3, 3)
    runs = [(d.peer, d.attempt) for d in of(core.Dispatch, out) if isinstance(d, core.Dispatch)]
    assert sorted(runs) == [("p1", 1), ("p2", 2), ("p3", 3)]
    assert not of(core.Collect, vote(s, "p1", 1, "42", 1.0))
    out = vote(s, "p3", 3, "42", 1.5)  # 2 of 3 agree: accepted, the third run stopped
    assert of(core.Collect, out) == [core.Collect("q", "p3", 3, (("out", ref("42")),))]
    assert [(i.peer, i.attempt) for i in of(core.StopRun, out) if isinstance(i, core.StopRun)] == [
        ("p2", 2)
    ]
    out = s.handle(core.OutputsCollected("q", 3), 2.0)
    assert out[-1] == core.Finished("succeeded", "all 1 tasks succeeded")
    votes = s.quorum_votes["q"]
    assert votes["quorum"] == 3 and len(votes["votes"]) == 2  # type: ignore[arg-type]
    assert votes["accepted"] == f"out={ref('42').digest[:12]}"


def test_disagreeing_runs_get_a_further_run_then_fail_naming_each_peer_and_digest() -> None:
    s, out = quorum_job(2, 3)
    assert len(of(core.Dispatch, out)) == 2  # quorum 2: two runs; p3 stays free
    vote(s, "p1", 1, "host-a", 1.0)
    out = vote(s, "p2", 2, "host-b", 1.5)  # they disagree: one more run, on p3
    assert [
        (d.peer, d.attempt) for d in of(core.Dispatch, out) if isinstance(d, core.Dispatch)
    ] == [("p3", 3)]
    out = vote(s, "p3", 3, "host-c", 2.0)  # 3 runs (the bound, 2 x 2 - 1), no majority
    failed = of(core.TaskFailed, out)
    assert len(failed) == 1 and isinstance(failed[0], core.TaskFailed)
    for peer, text in (("p1", "host-a"), ("p2", "host-b"), ("p3", "host-c")):
        assert f"{peer}: out={ref(text).digest[:12]}" in failed[0].error
    assert s.tasks["q"].status is TaskStatus.FAILED and not of(core.Collect, out)
    assert isinstance(out[-1], core.Finished) and out[-1].status == "failed"


def test_a_further_run_that_agrees_forms_the_majority() -> None:
    s, _ = quorum_job(2, 3)
    vote(s, "p1", 1, "good", 1.0)
    vote(s, "p2", 2, "bad", 1.5)
    out = vote(s, "p3", 3, "good", 2.0)
    assert of(core.Collect, out) == [core.Collect("q", "p3", 3, (("out", ref("good")),))]
    assert s.outvoted == {"p2": 1}


def test_with_no_other_peer_to_vote_the_task_fails_rather_than_waits_forever() -> None:
    s, _ = quorum_job(2, 2)
    vote(s, "p1", 1, "host-a", 1.0)
    out = vote(s, "p2", 2, "host-b", 1.5)
    failed = of(core.TaskFailed, out)
    assert len(failed) == 1 and isinstance(failed[0], core.TaskFailed)
    assert "no other peer to run it" in failed[0].error


def live_runs_of(s: SchedulerCore, name: str) -> list[tuple[str, int]]:
    """(peer, attempt) of each run of `name` going on now."""
    task, runs = s.tasks[name], []
    for peer in s.peers.values():
        if name in peer.running:
            copy = next((c for c in s.copies.get(name, ()) if c.peer == peer.name), None)
            runs.append((peer.name, copy.attempt if copy else task.attempts))
    return sorted(runs)


def settle(s: SchedulerCore, name: str, liar: str, now: float) -> None:
    """Every run of `name` exits 0; `liar`'s outputs differ from the others'."""
    while s.tasks[name].status is TaskStatus.RUNNING:
        for peer, attempt in live_runs_of(s, name):
            text = "lie" if peer == liar else "truth"
            s.handle(core.TaskReported(peer, name, attempt, 0, "", (("o", ref(text)),)), now)
            s.validate_state()
    if s.tasks[name].status is TaskStatus.COLLECTING:
        s.handle(core.OutputsCollected(name, s.tasks[name].attempts), now)
        s.validate_state()


def test_a_peer_outvoted_twice_runs_no_more_copies() -> None:
    tasks = [("q", [], "", 0), ("r", ["q"], "", 0), ("t", ["r"], "", 0)]
    s = SchedulerCore(tasks, quorum={"q": 2, "r": 2, "t": 2})
    for i in range(1, 4):
        s.handle(core.PeerJoined(f"p{i}", 1, {}), 0.0)
    assert live_runs_of(s, "q") == [("p1", 1), ("p2", 2)]
    settle(s, "q", "p2", 1.0)  # p2 outvoted once (p3 broke the tie)
    assert s.outvoted == {"p2": 1} and not s.distrusted
    assert "p2" in {peer for peer, _ in live_runs_of(s, "r")}
    settle(s, "r", "p2", 2.0)  # twice: distrusted
    assert s.outvoted["p2"] == 2 and list(s.distrusted) == ["p2"]
    assert "p2" not in {peer for peer, _ in live_runs_of(s, "t")}  # no more runs there
    assert "p2" not in s.peers  # released once idle...
    assert s.handle(core.PeerJoined("p2", 1, {}), 2.5) == [core.Release("p2")]  # ...for good
    settle(s, "t", "p2", 3.0)
    assert s.finished is not None and s.finished.status == "succeeded"
