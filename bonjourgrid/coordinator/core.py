"""The scheduler, pure: events in, instructions out; no sockets, no clock, no randomness.

Theory of operation. Every task walks one path:

    WAITING --all inputs done--> READY --placed--> RUNNING --exit 0--> COLLECTING --> DONE
                                   ^                  |  \\--exit != 0, retries left--'(READY)
                                   '--peer lost-------'   \\--no retries left--> FAILED
    (descendants of a FAILED task are SKIPPED; the other branches go on, as in DAGMan)

A resumed job starts with the tasks its journal vouches for already DONE (`done=`); a task
is never DONE before every task it needs.

A failed attempt with retries left makes the task READY again, but not placeable before
`now + backoff` (BACKOFF_BASE_S doubling per failure, capped at BACKOFF_CAP_S): it waits in
a heap of its own, so other ready tasks go past it, and the job cannot end while it waits.
The core has no clock: `next_wakeup()` says when the shell must feed a `Tick`. A retry goes
to another peer than the ones it failed on when one has a free slot.

Ready tasks wait in one heap per requirement class (tasks with the same `require`), ordered
by their bottom level (the longest chain of tasks after them), so the critical path goes
first. Placement visits free slots and pops the best task the slot's peer can run: the cost
of a decision depends on the number of classes, never on the number of tasks, which keeps a
100,000-task DAG schedulable. A peer is released as soon as no unstarted task is left for it.

The shell (`coordinator/shell.py`) feeds events, passes `now`, and carries out instructions.
`story(task)` tells why a task ran where it ran, as many times as it did.
"""

from __future__ import annotations

import enum
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bonjourgrid.cache.store import FileRef


class TaskStatus(enum.Enum):
    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    COLLECTING = "collecting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


_FINAL = {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.SKIPPED}
# The only moves a task may make; validate_state() and _move() hold the core to them.
_TASK_TRANSITIONS = {
    (TaskStatus.WAITING, TaskStatus.READY),
    (TaskStatus.READY, TaskStatus.RUNNING),
    (TaskStatus.RUNNING, TaskStatus.COLLECTING),
    (TaskStatus.RUNNING, TaskStatus.READY),
    (TaskStatus.RUNNING, TaskStatus.FAILED),
    (TaskStatus.COLLECTING, TaskStatus.DONE),
    (TaskStatus.COLLECTING, TaskStatus.READY),
    (TaskStatus.COLLECTING, TaskStatus.FAILED),
    (TaskStatus.WAITING, TaskStatus.SKIPPED),
    (TaskStatus.READY, TaskStatus.SKIPPED),
}


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerJoined:
    peer: str
    cpus: int
    attrs: Mapping[str, str]  # its TXT record, for per-task requirements


@dataclass(frozen=True)
class PeerLost:
    peer: str
    reason: str


@dataclass(frozen=True)
class TaskReported:
    peer: str
    task: str
    attempt: int
    exit_code: int
    error: str
    outputs: tuple[tuple[str, FileRef], ...]
    stderr_tail: str = ""
    fetch_s: float = 0.0
    run_s: float = 0.0
    bytes_fetched: int = 0


@dataclass(frozen=True)
class OutputsCollected:
    task: str
    attempt: int


@dataclass(frozen=True)
class CollectFailed:
    task: str
    attempt: int
    error: str


@dataclass(frozen=True)
class CancelRequested:
    reason: str


@dataclass(frozen=True)
class Tick:
    """Time passed (the shell sends one at `next_wakeup()`): backoffs may be over."""


Event = (
    PeerJoined | PeerLost | TaskReported | OutputsCollected | CollectFailed | CancelRequested | Tick
)


# -- instructions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    task: str
    peer: str
    attempt: int


@dataclass(frozen=True)
class Collect:
    task: str
    peer: str
    attempt: int
    outputs: tuple[tuple[str, FileRef], ...]


@dataclass(frozen=True)
class Release:
    peer: str


@dataclass(frozen=True)
class Recruit:
    count: int
    reason: str


@dataclass(frozen=True)
class Finished:
    status: str  # "succeeded" | "failed"
    reason: str


@dataclass(frozen=True)
class TaskDone:
    """Record (journal) that a task's outputs are in the submit directory."""

    task: str
    peer: str | None
    attempts: int
    outputs: tuple[tuple[str, FileRef], ...]


@dataclass(frozen=True)
class TaskFailed:
    """Record (journal) that a task failed for good."""

    task: str
    error: str
    attempts: int


Instruction = Dispatch | Collect | Release | Recruit | Finished | TaskDone | TaskFailed

BACKOFF_BASE_S = 1.0  # wait before the first retry; doubled for each further failure
BACKOFF_CAP_S = 60.0  # the longest wait before a retry


# -- state ---------------------------------------------------------------------------------


@dataclass
class TaskState:
    name: str
    require: str  # requirement class: the task's `require` text, "" for none
    retries: int
    priority: int  # bottom level: tasks after it on its longest chain
    deps_left: int
    status: TaskStatus = TaskStatus.WAITING
    attempts: int = 0  # dispatches
    failures: int = 0  # attempts that ended in an error (peer losses do not count)
    peer: str | None = None
    start: float | None = None
    end: float | None = None
    exit_code: int | None = None
    error: str = ""
    stderr_tail: str = ""
    fetch_s: float = 0.0
    run_s: float = 0.0
    outputs: tuple[tuple[str, FileRef], ...] = ()
    not_before: float = 0.0  # a retry waits for its backoff until then
    failed_on: tuple[str, ...] = ()  # peers where an attempt failed (a retry avoids them)
    resumed: bool = False  # DONE from an earlier run's journal: never ran in this one


@dataclass
class PeerSlots:
    name: str
    cpus: int
    attrs: Mapping[str, str]
    running: set[str] = field(default_factory=set)
    collecting: set[str] = field(default_factory=set)


Matcher = Callable[[str, Mapping[str, str]], bool]


class SchedulerCore:
    """The job's scheduling state and rules."""

    def __init__(
        self,
        tasks: Iterable[tuple[str, Iterable[str], str, int]],
        matches: Matcher = lambda require, attrs: True,
        done: Mapping[str, tuple[tuple[str, FileRef], ...]] | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        """`tasks`: (name, predecessors, require text or "", retries) for every task;
        `done`: tasks finished in an earlier run (name -> outputs), closed under predecessors."""
        self._matches = matches
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        preds: dict[str, list[str]] = {}
        self.tasks: dict[str, TaskState] = {}
        for name, deps, require, retries in tasks:
            preds[name] = list(deps)
            self.tasks[name] = TaskState(name, require, retries, 0, len(preds[name]))
        self.successors: dict[str, list[str]] = defaultdict(list)
        for name, deps in preds.items():
            for dep in deps:
                self.successors[dep].append(name)
        self._assign_priorities(preds)
        self.peers: dict[str, PeerSlots] = {}
        self._free: dict[str, None] = {}  # peers with a free slot, in the order they joined
        self._ready: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        self._seq = 0
        self._match_cache: dict[tuple[str, str], bool] = {}
        self.counts: dict[TaskStatus, int] = defaultdict(int)
        self.counts[TaskStatus.WAITING] = len(self.tasks)
        self.finished: Finished | None = None
        self._stories: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, task): backoffs
        self.resumed = 0
        if done:
            self._resume(done, preds)
        for task in self.tasks.values():
            if task.deps_left == 0 and task.status is TaskStatus.WAITING:
                self._make_ready(task, 0.0, "no inputs from other tasks")

    def _assign_priorities(self, preds: Mapping[str, list[str]]) -> None:
        # Kahn's order from the sinks back: O(tasks + edges).
        pending = {name: len(self.successors.get(name, ())) for name in self.tasks}
        frontier = [name for name, n in pending.items() if n == 0]
        while frontier:
            name = frontier.pop()
            level = self.tasks[name].priority
            for dep in preds[name]:
                self.tasks[dep].priority = max(self.tasks[dep].priority, level + 1)
                pending[dep] -= 1
                if pending[dep] == 0:
                    frontier.append(dep)

    def _resume(
        self, done: Mapping[str, tuple[tuple[str, FileRef], ...]], preds: Mapping[str, list[str]]
    ) -> None:
        for name in done:
            if name not in self.tasks:
                raise ValueError(f"resumed task {name!r} is not in the workflow")
            missing = [dep for dep in preds[name] if dep not in done]
            if missing:
                raise ValueError(f"task {name!r} cannot be resumed: {missing[0]!r} runs again")
        for name, outputs in done.items():
            task = self.tasks[name]
            task.status, task.resumed, task.outputs = TaskStatus.DONE, True, tuple(outputs)
            self.counts[TaskStatus.WAITING] -= 1
            self.counts[TaskStatus.DONE] += 1
            self._stories[name].append((0.0, "waiting -> done: resumed, its outputs are intact"))
            for succ in self.successors.get(name, ()):
                self.tasks[succ].deps_left -= 1
        self.resumed = len(done)

    # -- the one entry point ------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Instruction]:
        out: list[Instruction] = []
        if self.finished is not None:
            return out
        match event:
            case PeerJoined():
                self.peers[event.peer] = PeerSlots(event.peer, max(1, event.cpus), event.attrs)
                self._free[event.peer] = None
            case PeerLost():
                self._lose_peer(event.peer, event.reason, now)
            case TaskReported():
                self._reported(event, now, out)
            case OutputsCollected():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    self._collected(task, now)
                    out.append(TaskDone(task.name, task.peer, task.attempts, task.outputs))
            case CollectFailed():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    self._detach(task)
                    self._failed_attempt(
                        task, f"its outputs could not be fetched: {event.error}", now, out
                    )
            case CancelRequested():
                self._finish(out, "failed", event.reason)
                return out
            case Tick():
                pass
        self._end_backoffs(now)
        self._schedule(now, out)
        self._scale_in(out)
        if self.counts[TaskStatus.WAITING] + self.counts[TaskStatus.READY] == 0 and not any(
            self.counts[s] for s in (TaskStatus.RUNNING, TaskStatus.COLLECTING)
        ):
            failed = [t.name for t in self.tasks.values() if t.status is TaskStatus.FAILED]
            if failed:
                skipped = self.counts[TaskStatus.SKIPPED]
                self._finish(
                    out,
                    "failed",
                    f"{len(failed)} task(s) failed ({', '.join(failed[:5])})"
                    + (f", {skipped} skipped because they needed their outputs" if skipped else ""),
                )
            else:
                self._finish(out, "succeeded", f"all {len(self.tasks)} tasks succeeded")
        return out

    # -- transitions --------------------------------------------------------------------

    def _move(self, task: TaskState, to: TaskStatus, now: float, why: str) -> None:
        assert (task.status, to) in _TASK_TRANSITIONS, f"{task.name}: {task.status} -> {to}"
        self.counts[task.status] -= 1
        self.counts[to] += 1
        self._stories[task.name].append((now, f"{task.status.value} -> {to.value}: {why}"))
        task.status = to

    def _make_ready(self, task: TaskState, now: float, why: str) -> None:
        self._move(task, TaskStatus.READY, now, why)
        self._seq += 1
        heapq.heappush(self._ready[task.require], (-task.priority, self._seq, task.name))

    def _reported(self, event: TaskReported, now: float, out: list[Instruction]) -> None:
        task = self.tasks.get(event.task)
        if (
            task is None
            or task.status is not TaskStatus.RUNNING
            or task.attempts != event.attempt
            or task.peer != event.peer
        ):
            return  # a report from an attempt we already gave up on
        task.exit_code, task.stderr_tail = event.exit_code, event.stderr_tail
        task.fetch_s, task.run_s = event.fetch_s, event.run_s
        if event.exit_code == 0 and not event.error:
            task.outputs = event.outputs
            self.peers[event.peer].running.discard(task.name)
            self.peers[event.peer].collecting.add(task.name)
            self._free[event.peer] = None  # the slot it ran in is free
            self._move(task, TaskStatus.COLLECTING, now, f"exited 0 on {event.peer}")
            out.append(Collect(task.name, event.peer, task.attempts, event.outputs))
        else:
            self._detach(task)
            why = event.error or f"exit code {event.exit_code}"
            self._failed_attempt(task, why, now, out)

    def backoff(self, failures: int) -> float:
        """Seconds a task waits before its retry after `failures` failed attempts."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** max(0, failures - 1))

    def _failed_attempt(
        self, task: TaskState, why: str, now: float, out: list[Instruction]
    ) -> None:
        task.failures += 1
        task.error = why
        if task.peer is not None and task.peer not in task.failed_on:
            task.failed_on += (task.peer,)
        if task.failures <= task.retries:
            wait = self.backoff(task.failures)
            self._move(
                task,
                TaskStatus.READY,
                now,
                f"{why}; retry {task.failures}/{task.retries} in {wait:g} s",
            )
            self._seq += 1
            if self.peers and all(name in task.failed_on for name in self.peers):
                # Only peers it already failed on are held (the others went back at
                # scale-in): ask for a fresh one while the retry waits out its backoff.
                out.append(Recruit(1, f"a fresh peer for the retry of {task.name}"))
            if wait > 0:
                task.not_before = now + wait
                heapq.heappush(self._delayed, (task.not_before, self._seq, task.name))
            else:
                heapq.heappush(self._ready[task.require], (-task.priority, self._seq, task.name))
            return
        task.end = now
        self._move(task, TaskStatus.FAILED, now, f"{why}; no retries left")
        out.append(TaskFailed(task.name, why, task.attempts))
        self._skip_descendants(task, now)

    def _end_backoffs(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, name = heapq.heappop(self._delayed)
            task = self.tasks[name]
            if task.status is TaskStatus.READY:
                self._stories[name].append((now, "backoff over: may be placed again"))
                heapq.heappush(self._ready[task.require], (-task.priority, seq, name))

    def _skip_descendants(self, failed: TaskState, now: float) -> None:
        stack = list(self.successors.get(failed.name, ()))
        while stack:
            task = self.tasks[stack.pop()]
            if task.status in (TaskStatus.WAITING, TaskStatus.READY):
                # A READY entry left in its heap is dropped when popped (status check).
                self._move(task, TaskStatus.SKIPPED, now, f"needs {failed.name}, which failed")
                stack.extend(self.successors.get(task.name, ()))

    def _collected(self, task: TaskState, now: float) -> None:
        self._detach(task)
        task.end = now
        task.error = ""
        self._move(task, TaskStatus.DONE, now, "outputs are in the submit directory")
        for name in self.successors.get(task.name, ()):
            succ = self.tasks[name]
            succ.deps_left -= 1
            if succ.deps_left == 0 and succ.status is TaskStatus.WAITING:
                self._make_ready(succ, now, "all its inputs exist")

    def _detach(self, task: TaskState) -> None:
        if task.peer in self.peers:
            self.peers[task.peer].running.discard(task.name)
            self.peers[task.peer].collecting.discard(task.name)
            peer = self.peers[task.peer]
            if len(peer.running) < peer.cpus:
                self._free[peer.name] = None

    def _lose_peer(self, name: str, reason: str, now: float) -> None:
        peer = self.peers.pop(name, None)
        self._free.pop(name, None)
        if peer is None:
            return
        for task_name in sorted(peer.running | peer.collecting):
            task = self.tasks[task_name]
            self._make_ready(task, now, f"peer {name} lost ({reason}): rescheduled")

    # -- decisions ----------------------------------------------------------------------

    def _can_run(self, peer: PeerSlots, require: str) -> bool:
        if not require:
            return True
        key = (peer.name, require)
        if key not in self._match_cache:
            self._match_cache[key] = self._matches(require, peer.attrs)
        return self._match_cache[key]

    def _schedule(self, now: float, out: list[Instruction]) -> None:
        # Only peers with a free slot are visited, and only while tasks wait: an event costs
        # O(classes), not O(peers), even with thousands of peers and tasks.
        filled: list[str] = []
        for name in self._free:  # not mutated in the loop: filled peers leave it after
            if not any(self._ready.values()):
                break
            peer = self.peers[name]
            while len(peer.running) < peer.cpus:
                task = self._pop_ready_for(peer)
                if task is None:
                    break
                target = peer
                if peer.name in task.failed_on:
                    target = self._fresh_peer_for(task) or peer
                task.attempts += 1
                task.peer = target.name
                task.start = now
                task.end = None
                target.running.add(task.name)
                if len(target.running) >= target.cpus:
                    filled.append(target.name)
                self._move(
                    task,
                    TaskStatus.RUNNING,
                    now,
                    f"placed on {target.name} (attempt {task.attempts})",
                )
                out.append(Dispatch(task.name, target.name, task.attempts))
        for name in filled:
            self._free.pop(name, None)

    def _fresh_peer_for(self, task: TaskState) -> PeerSlots | None:
        """A peer with a free slot that can run `task` and has not seen it fail."""
        for peer in self.peers.values():
            if (
                len(peer.running) < peer.cpus
                and peer.name not in task.failed_on
                and self._can_run(peer, task.require)
            ):
                return peer
        return None

    def _pop_ready_for(self, peer: PeerSlots) -> TaskState | None:
        best: tuple[int, int, str] | None = None
        best_class = ""
        for require, heap in self._ready.items():
            while heap and self.tasks[heap[0][2]].status is not TaskStatus.READY:
                heapq.heappop(heap)  # stale: skipped, or queued twice
            if heap and (best is None or heap[0] < best) and self._can_run(peer, require):
                best, best_class = heap[0], require
        if best is None:
            return None
        heapq.heappop(self._ready[best_class])
        return self.tasks[best[2]]

    def _scale_in(self, out: list[Instruction]) -> None:
        if self.counts[TaskStatus.WAITING] + self.counts[TaskStatus.READY]:
            return
        # A peer with nothing running has a free slot: looking at free peers is enough.
        for name in [n for n in self._free if not self.peers[n].running | self.peers[n].collecting]:
            del self.peers[name]
            self._free.pop(name, None)
            out.append(Release(name))

    def _finish(self, out: list[Instruction], status: str, reason: str) -> None:
        for name in list(self.peers):
            out.append(Release(name))
        self.peers.clear()
        self._free.clear()
        self.finished = Finished(status, reason)
        out.append(self.finished)

    # -- questions ------------------------------------------------------------------------

    def unplaceable(self) -> list[str]:
        """Ready tasks that no peer currently held can run (the shell recruits, or gives up)."""
        stuck: list[str] = []
        for require, heap in self._ready.items():
            if not any(self._can_run(p, require) for p in self.peers.values()):
                stuck.extend(
                    name for _, _, name in heap if self.tasks[name].status is TaskStatus.READY
                )
        return stuck

    def wanted_peers(self) -> int:
        """How many more single-slot peers the ready tasks could use right now."""
        free = sum(p.cpus - len(p.running) for p in self.peers.values())
        return max(0, self.counts[TaskStatus.READY] - len(self._delayed) - free)

    def next_wakeup(self) -> float | None:
        """When the next retry backoff ends (feed a `Tick` then); None if nothing waits."""
        if self.finished is not None or not self._delayed:
            return None
        return self._delayed[0][0]

    def pending(self) -> int:
        """Tasks not yet done, failed or skipped."""
        return len(self.tasks) - sum(self.counts[s] for s in _FINAL)

    def story(self, task: str) -> list[tuple[float, str]]:
        return list(self._stories.get(task, ()))

    def validate_state(self) -> None:
        """Invariants; tests call this after every scenario."""
        tally: dict[TaskStatus, int] = defaultdict(int)
        for task in self.tasks.values():
            tally[task.status] += 1
            if task.status in (TaskStatus.RUNNING, TaskStatus.COLLECTING) and self.finished is None:
                peer = self.peers.get(task.peer or "")
                assert peer is not None, f"{task.name} is {task.status.value} on a peer we lost"
                assert task.name in (peer.running | peer.collecting)
            if task.status is TaskStatus.DONE:
                assert task.deps_left <= 0
            if task.resumed:
                assert task.status is TaskStatus.DONE and task.attempts == 0
        for _, _, name in self._delayed:
            assert self.tasks[name].status is TaskStatus.READY or self.finished is not None
        assert len(self._delayed) <= self.counts[TaskStatus.READY] or self.finished is not None
        for status in TaskStatus:
            assert tally[status] == self.counts[status], f"count of {status.value} is off"
        for peer in self.peers.values():
            assert len(peer.running) <= peer.cpus, f"{peer.name} runs more than its cpus"
            assert not peer.running & peer.collecting
            assert (peer.name in self._free) == (len(peer.running) < peer.cpus), peer.name
        assert set(self._free) <= set(self.peers)
