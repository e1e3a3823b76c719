"""The scheduler core when the middleware holds the DAG's edges and places the runs (DAGMan):
the core places nothing, follows the middleware's news, leaves retries to it, and keeps the
journal and the report right; a random middleware model checks the invariants and the end."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus

REF = FileRef("1" * 64, 3)
DIAMOND = [("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"])]


def sched(tasks: Iterable[tuple[str, list[str]]], retries: int = 0, **kw: object) -> SchedulerCore:
    return SchedulerCore(
        ((n, d, "", retries) for n, d in tasks),
        placement="middleware",
        **kw,  # type: ignore[arg-type]
    )


def step(s: SchedulerCore, event: core.Event, now: float = 1.0) -> list[core.Instruction]:
    out = s.handle(event, now)
    s.validate_state()
    return out


def ok(peer: str, task: str, attempt: int = 1) -> core.TaskReported:
    return core.TaskReported(peer, task, attempt, 0, "", ((f"{task}.out", REF),))


def failed(peer: str, task: str, attempt: int = 1, code: int = 1) -> core.TaskReported:
    return core.TaskReported(peer, task, attempt, code, f"exited {code}", ())


def of(kind: type, out: list[core.Instruction]) -> list[core.Instruction]:
    return [i for i in out if isinstance(i, kind)]


def test_the_core_places_nothing_and_follows_the_middleware_through_a_diamond() -> None:
    s = sched(DIAMOND)
    out = step(s, core.PeerJoined("p1", 1, {}))
    assert not of(core.Dispatch, out) and s.tasks["a"].status is TaskStatus.READY
    step(s, core.RunPlaced("p1", "a", 1))
    assert (s.tasks["a"].status, s.tasks["a"].peer) == (TaskStatus.RUNNING, "p1")
    out = step(s, ok("p1", "a"))
    # Its outputs are in the submit directory already: done at once, nothing to collect.
    assert of(core.TaskDone, out) == [core.TaskDone("a", "p1", 1, (("a.out", REF),))]
    assert not of(core.Collect, out) and not of(core.Dispatch, out)
    assert s.tasks["b"].status is TaskStatus.READY and s.tasks["c"].status is TaskStatus.READY
    # The middleware may run more runs on a peer than the cpus the core knows of.
    step(s, core.RunPlaced("p1", "b", 1))
    step(s, core.RunPlaced("p1", "c", 1))
    assert s.peers["p1"].running == {"b", "c"}
    step(s, ok("p1", "b"))
    step(s, ok("p1", "c"))
    step(s, core.RunPlaced("p1", "d", 1))
    out = step(s, ok("p1", "d"))
    assert out[-1] == core.Finished("succeeded", "all 4 tasks succeeded")
    assert "started on p1 by the middleware (attempt 1)" in " ".join(x for _, x in s.story("d"))


def test_a_failed_attempt_waits_for_the_middlewares_retry_without_backoff() -> None:
    s = sched([("t", [])], retries=1)
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.RunPlaced("p1", "t", 1))
    out = step(s, failed("p1", "t", 1), 2.0)
    task = s.tasks["t"]
    assert task.status is TaskStatus.READY and not of(core.Dispatch, out)
    assert s.next_wakeup() is None  # no backoff of ours: the middleware's own
    assert "the middleware retries it (1/1)" in s.story("t")[-1][1]
    step(s, core.RunPlaced("p1", "t", 2), 3.0)
    out = step(s, ok("p1", "t", 2), 4.0)
    assert of(core.TaskDone, out) == [core.TaskDone("t", "p1", 2, (("t.out", REF),))]
    assert out[-1] == core.Finished("succeeded", "all 1 tasks succeeded")


def test_out_of_retries_a_task_fails_its_descendants_are_skipped_a_branch_goes_on() -> None:
    s = sched([("bad", []), ("after", ["bad"]), ("good", [])])
    step(s, core.PeerJoined("p1", 2, {}))
    step(s, core.RunPlaced("p1", "bad", 1))
    step(s, core.RunPlaced("p1", "good", 1))
    out = step(s, failed("p1", "bad", 1, code=3))
    assert of(core.TaskFailed, out) == [core.TaskFailed("bad", "exited 3", 1)]
    assert s.tasks["after"].status is TaskStatus.SKIPPED
    assert not of(core.Finished, out)  # good still runs
    out = step(s, ok("p1", "good"))
    assert out[-1] == core.Finished(
        "failed", "1 task(s) failed (bad), 1 skipped because they needed their outputs"
    )


def test_a_run_that_never_ran_is_a_failed_attempt_even_unheard_of() -> None:
    # HTCondor may hold a job before it executes: its failure is the first news of it.
    s = sched([("t", [])], retries=1)
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.AttemptFailed("", "t", 1, "held by HTCondor: no input"))
    assert s.tasks["t"].status is TaskStatus.READY and s.tasks["t"].attempts == 1
    assert s.tasks["t"].error == "held by HTCondor: no input"


def test_a_missing_output_fails_for_good_and_a_run_of_its_child_is_stopped() -> None:
    # The middleware saw exit 0: it will neither retry the task nor hold back its child.
    s = sched([("a", []), ("b", ["a"])], retries=2)
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.RunPlaced("p1", "a", 1))
    missing = "declared output a.out is not in the submit directory"
    out = step(s, core.TaskReported("p1", "a", 1, 0, missing, ()))
    assert of(core.TaskFailed, out) == [core.TaskFailed("a", missing, 1)]
    assert s.tasks["b"].status is TaskStatus.SKIPPED
    assert out[-1] == core.Finished(
        "failed", "1 task(s) failed (a), 1 skipped because they needed their outputs"
    )
    s2 = sched([("a", []), ("b", ["a"]), ("x", [])])
    step(s2, core.PeerJoined("p1", 1, {}))
    step(s2, core.RunPlaced("p1", "x", 1))
    step(s2, core.RunPlaced("p1", "a", 1))
    step(s2, core.TaskReported("p1", "a", 1, 0, missing, ()))
    out = step(s2, core.RunPlaced("p1", "b", 1))
    assert of(core.StopRun, out) == [core.StopRun("b", "p1", 1, "b needs a task that failed")]
    assert s2.tasks["b"].status is TaskStatus.SKIPPED


def test_news_of_a_task_whose_parents_are_not_heard_yet_waits_for_them() -> None:
    s = sched([("a", []), ("b", ["a"])])
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.RunPlaced("p1", "a", 1))
    # A middleware that reorders its news: b started and ended before a's end is heard.
    step(s, core.RunPlaced("p1", "b", 1))
    out = step(s, ok("p1", "b"))
    assert s.tasks["b"].status is TaskStatus.WAITING and not of(core.TaskDone, out)
    out = step(s, ok("p1", "a"))
    done = of(core.TaskDone, out)
    assert [d.task for d in done] == ["a", "b"]  # journaled in order: never a child first
    assert out[-1] == core.Finished("succeeded", "all 2 tasks succeeded")


def test_stale_news_changes_nothing() -> None:
    s = sched([("t", [])], retries=2)
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.RunPlaced("p1", "t", 1))
    step(s, failed("p1", "t", 1))
    step(s, core.RunPlaced("p1", "t", 2))
    for stale in (
        failed("p1", "t", 1),
        core.AttemptFailed("p1", "t", 1, "old"),
        core.RunPlaced("p1", "t", 1),
        ok("p1", "nosuch"),
        core.RunStarted("p1", "t", 2),  # a bgrid worker's acknowledgement: not for this mode
        core.PeerRunning("p1", frozenset()),
    ):
        assert step(s, stale) == []
    assert s.tasks["t"].status is TaskStatus.RUNNING and s.tasks["t"].attempts == 2


def test_a_lost_peer_s_runs_stay_with_the_middleware_which_says_where_they_end() -> None:
    s = sched([("t", [])])
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.PeerJoined("p2", 1, {}))
    step(s, core.RunPlaced("p1", "t", 1))
    out = step(s, core.PeerLost("p1", "silent"))
    assert out == [core.Notice("peer p1 lost (silent): the middleware says what becomes of t")]
    assert s.tasks["t"].status is TaskStatus.RUNNING and s.tasks["t"].failures == 0
    out = step(s, ok("p2", "t"))  # HTCondor requeued the same attempt on p2
    assert s.tasks["t"].peer == "p2" and out[-1].status == "succeeded"  # type: ignore[union-attr]


def test_cancel_stops_every_run_the_middleware_has_going() -> None:
    s = sched([("a", []), ("b", []), ("c", ["a"])])
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.RunPlaced("p1", "a", 1))
    step(s, core.RunPlaced("elsewhere", "b", 1))  # a machine of an existing pool
    out = step(s, core.CancelRequested("cancelled by the user"))
    assert of(core.StopRun, out) == [
        core.StopRun("a", "p1", 1, "cancelled by the user"),
        core.StopRun("b", "elsewhere", 1, "cancelled by the user"),
    ]
    assert out[-2:] == [core.Release("p1"), core.Finished("failed", "cancelled by the user")]


def test_a_resumed_job_leaves_the_kept_tasks_alone() -> None:
    s = sched(DIAMOND, done={"a": (("a.out", REF),)})
    assert s.tasks["b"].status is TaskStatus.READY and s.tasks["c"].status is TaskStatus.READY
    step(s, core.PeerJoined("p1", 1, {}))
    for name in ("b", "c", "d"):
        step(s, core.RunPlaced("p1", name, 1))
        out = step(s, ok("p1", name))
    assert out[-1] == core.Finished("succeeded", "all 4 tasks succeeded")
    assert s.tasks["a"].attempts == 0


# -- random runs: a model middleware (DAGMan's rules) and the core agree ------------------


@dataclass
class ModelMiddleware:
    """DAGMan's rules: a node runs once all its parents succeeded; a failed run is retried
    up to `retries` times; a stopped run counts as failed. News goes into `outbox`."""

    preds: dict[str, list[str]]
    retries: dict[str, int]
    done: set[str]
    state: dict[str, str] = field(default_factory=dict)  # node -> idle|running|ok|failed
    attempt: dict[str, int] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)  # ended 0 without its outputs
    outbox: list[core.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in self.preds:
            self.state[name] = "ok" if name in self.done else "idle"
            self.attempt[name] = 0

    def startable(self) -> list[str]:
        return [
            n
            for n, st_ in self.state.items()
            if st_ == "idle" and all(self.state[p] == "ok" for p in self.preds[n])
        ]

    def running(self) -> list[str]:
        return [n for n, st_ in self.state.items() if st_ == "running"]

    def start(self, name: str, peer: str) -> None:
        self.attempt[name] += 1
        self.state[name] = "running"
        self.outbox.append(core.RunPlaced(peer, name, self.attempt[name]))

    def end(self, name: str, peer: str, how: int) -> None:
        """how: 0 success, 1 exit 1, 2 success without outputs, 3 lost before it ran."""
        n = self.attempt[name]
        if how == 0:
            self.state[name] = "ok"
            self.outbox.append(core.TaskReported(peer, name, n, 0, "", ((name, REF),)))
        elif how == 2:
            self.state[name] = "ok"
            self.missing.add(name)
            self.outbox.append(core.TaskReported(peer, name, n, 0, "output missing", ()))
        else:
            self._failed(name)
            if how == 1:
                self.outbox.append(core.TaskReported(peer, name, n, 1, "exited 1", ()))
            else:
                self.outbox.append(core.AttemptFailed(peer, name, n, "never ran"))

    def stop(self, name: str, attempt: int) -> None:
        if self.state[name] == "running" and self.attempt[name] == attempt:
            self._failed(name)  # no news is owed for a stopped run

    def _failed(self, name: str) -> None:
        self.state[name] = "idle" if self.attempt[name] <= self.retries[name] else "failed"


@st.composite
def middleware_scenarios(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, list[str], str, int]], set[str], list[int], bool]:
    n = draw(st.integers(1, 7))
    tasks = []
    for i in range(n):
        before = sorted(draw(st.sets(st.integers(0, i - 1), max_size=2))) if i else []
        tasks.append((f"t{i}", [f"t{d}" for d in before], "", draw(st.integers(0, 2))))
    done: set[str] = set()
    for name, deps, _, _ in tasks:
        if all(d in done for d in deps) and draw(st.booleans()):
            done.add(name)
    return (
        tasks,
        done,
        draw(st.lists(st.integers(0, 40), min_size=10, max_size=80)),
        draw(st.booleans()),
    )


@given(middleware_scenarios())
@settings(max_examples=300, deadline=None)
def test_random_middleware_runs_keep_the_invariants_and_end_as_the_middleware_says(
    scenario: tuple[list[tuple[str, list[str], str, int]], set[str], list[int], bool],
) -> None:
    tasks, done, moves, reorder = scenario
    s = SchedulerCore(tasks, done={name: () for name in done}, placement="middleware")
    mw = ModelMiddleware({n: d for n, d, _, _ in tasks}, {n: r for n, _, _, r in tasks}, done)
    now, peers = 0.0, 2
    names = ["p1", "p2", "elsewhere"]  # "elsewhere": a machine of the pool the job does not hold

    def deliver(pick: int) -> None:
        nonlocal now
        # In order, or (a reordering middleware) the oldest news of any one task.
        if reorder:
            first = mw.outbox[pick % len(mw.outbox)]
            index = next(i for i, e in enumerate(mw.outbox) if e.task == first.task)  # type: ignore[union-attr]
        else:
            index = 0
        event = mw.outbox.pop(index)
        now += 0.25
        apply(event)

    def apply(event: core.Event) -> None:
        out = s.handle(event, now)
        s.validate_state()
        for stop in of(core.StopRun, out):
            assert isinstance(stop, core.StopRun)
            mw.stop(stop.task, stop.attempt)
        ends = of(core.Finished, out)
        if ends:
            assert s.pending() == 0 or ends[0].reason.startswith("cancel")  # type: ignore[union-attr]

    def act(move: int) -> None:
        nonlocal peers, now
        peer = names[move % len(names)]
        startable, running = mw.startable(), mw.running()
        if move == 40:
            peers += 1
            names.append(f"p{peers}")
            apply(core.PeerJoined(f"p{peers}", 1, {}))
        elif move == 39 and s.peers:
            apply(core.PeerLost(sorted(s.peers)[0], "silent"))
        elif move == 38:
            apply(core.CancelRequested("cancelled"))
        elif move < 10 and mw.outbox:
            deliver(move)
        elif move < 20 and startable:
            mw.start(startable[move % len(startable)], peer)
        elif running:
            how = [0, 0, 0, 1, 1, 2, 3][move % 7]
            mw.end(running[move % len(running)], peer, how)
        elif startable:
            mw.start(startable[0], peer)
        elif mw.outbox:
            deliver(move)
        else:
            now += 0.25
            apply(core.Tick())

    apply(core.PeerJoined("p1", 1, {}))
    apply(core.PeerJoined("p2", 2, {}))
    for move in moves:
        if s.finished is None:
            act(move)
    # Then the middleware runs everything left to success and every news arrives.
    for _ in range(1000):
        if s.finished is not None:
            break
        if mw.outbox:
            deliver(0)
        elif mw.running():
            mw.end(mw.running()[0], "p1", 0)
        elif mw.startable():
            mw.start(mw.startable()[0], "p1")
        else:
            apply(core.Tick())  # what the shell sends at the start
            break
    assert s.finished is not None, {n: t.status for n, t in s.tasks.items()}
    if s.finished.reason.startswith("cancel"):
        return
    for name, task in s.tasks.items():
        parents = [s.tasks[p] for p in mw.preds[name]]
        if task.status is TaskStatus.DONE:
            assert all(p.status is TaskStatus.DONE for p in parents)
            assert name in done or (mw.state[name] == "ok" and name not in mw.missing)
        elif task.status is TaskStatus.FAILED:
            assert mw.state[name] == "failed" or name in mw.missing
        else:
            assert task.status is TaskStatus.SKIPPED
            assert any(p.status is not TaskStatus.DONE for p in parents)
    assert (s.finished.status == "succeeded") == all(
        t.status is TaskStatus.DONE for t in s.tasks.values()
    )
