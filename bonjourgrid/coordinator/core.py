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

Data. The core knows every task's input and output paths (`TaskData`) and, through a
`FileTable` (`coordinator/files.py`), which peers hold which contents. An output that no
task reads, or that the workflow keeps, is collected (COLLECTING) before the task is DONE;
an intermediate stays on the peer that made it, and the task is DONE at once: its readers
fetch it from any peer holding a replica, the coordinator only serves what it holds.
Placement prefers the peer that holds the most of a task's input bytes (each peer has an
"affine" heap besides the class heaps). Prefetching (`coordinator/prefetch.py`) plans
tasks on busy peers ahead of time and orders `Prefetch` of their inputs; a file many tasks
read is broadcast peer to peer in a doubling tree, and its readers wait for it on their
peer. When a lost peer took the only replica of an intermediate that an unfinished task
still needs, the task that made it runs again (DONE -> WAITING/READY), and so do its own
producers if their outputs went the same way.

The shell (`coordinator/shell.py`) feeds events, passes `now`, and carries out instructions.
`story(task)` tells why a task ran where it ran, as many times as it did.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator.files import COORDINATOR, FileTable
from bonjourgrid.coordinator.prefetch import PrefetchSettings


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
    (TaskStatus.RUNNING, TaskStatus.DONE),  # its outputs stay on its peer
    (TaskStatus.RUNNING, TaskStatus.READY),
    (TaskStatus.RUNNING, TaskStatus.FAILED),
    (TaskStatus.COLLECTING, TaskStatus.DONE),
    (TaskStatus.COLLECTING, TaskStatus.READY),
    (TaskStatus.COLLECTING, TaskStatus.FAILED),
    (TaskStatus.WAITING, TaskStatus.SKIPPED),
    (TaskStatus.READY, TaskStatus.SKIPPED),
    # an intermediate it needs was lost with a peer: wait until it is made again
    (TaskStatus.DONE, TaskStatus.WAITING),
    (TaskStatus.DONE, TaskStatus.READY),
    (TaskStatus.READY, TaskStatus.WAITING),
    (TaskStatus.RUNNING, TaskStatus.WAITING),
}


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerJoined:
    peer: str
    cpus: int
    attrs: Mapping[str, str]  # its TXT record, for per-task requirements
    cached: frozenset[str] = frozenset()  # digests of the job's files its cache holds


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
class FileArrived:
    """A prefetch brought `digest` into `peer`'s cache."""

    peer: str
    digest: str


@dataclass(frozen=True)
class PrefetchFailed:
    peer: str
    digest: str
    error: str


@dataclass(frozen=True)
class PeersSettled:
    """The first peers are in (with what their caches hold): a resumed job's intermediates
    that no peer holds any more are made again."""


@dataclass(frozen=True)
class CancelRequested:
    reason: str


@dataclass(frozen=True)
class Tick:
    """Time passed (the shell sends one at `next_wakeup()`): backoffs may be over."""


Event = (
    PeerJoined
    | PeerLost
    | TaskReported
    | OutputsCollected
    | CollectFailed
    | FileArrived
    | PrefetchFailed
    | PeersSettled
    | CancelRequested
    | Tick
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
class Prefetch:
    """Move these contents into `peer`'s cache now; each with its sources, best first
    (peer names, or files.COORDINATOR)."""

    peer: str
    files: tuple[tuple[FileRef, tuple[str, ...]], ...]
    why: str = ""


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
    """Record (journal) that a task succeeded (its collected outputs are in the submit dir)."""

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


Instruction = Dispatch | Collect | Prefetch | Release | Recruit | Finished | TaskDone | TaskFailed

BACKOFF_BASE_S = 1.0  # wait before the first retry; doubled for each further failure
BACKOFF_CAP_S = 60.0  # the longest wait before a retry
_NO_PREFETCH = PrefetchSettings(policy="none", broadcast_min_consumers=0)


# -- state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """A task's files: what it reads, what it writes, and whether its outputs come back."""

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    collect: bool = True  # False: its outputs stay on peers (intermediates)


@dataclass
class TaskState:
    name: str
    require: str  # requirement class: the task's `require` text, "" for none
    retries: int
    priority: int  # bottom level: tasks after it on its longest chain
    deps_left: int  # tasks it needs that are not DONE (kept current while WAITING)
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
    planned_on: str | None = None  # the peer it is planned on (prefetching), not yet placed
    gated: bool = False  # READY, but waits for a broadcast file on its peer


@dataclass
class PeerSlots:
    name: str
    cpus: int
    attrs: Mapping[str, str]
    running: set[str] = field(default_factory=set)
    collecting: set[str] = field(default_factory=set)
    planned: list[str] = field(default_factory=list)  # tasks to run here next, in order
    planned_bytes: int = 0  # what planned tasks still had to move here when planned
    affine: list[tuple[int, int, str]] = field(default_factory=list)  # tasks whose data is here
    serving: int = 0  # broadcast copies it is sending now


Matcher = Callable[[str, Mapping[str, str]], bool]
_Entry = tuple[int, int, str]  # heap entry: (-priority, sequence, task)


class SchedulerCore:
    """The job's scheduling state and rules."""

    def __init__(
        self,
        tasks: Iterable[tuple[str, Iterable[str], str, int]],
        matches: Matcher = lambda require, attrs: True,
        done: Mapping[str, tuple[tuple[str, FileRef], ...]] | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        data: Mapping[str, TaskData] | None = None,
        sources: Mapping[str, FileRef] | None = None,
        prefetch: PrefetchSettings = _NO_PREFETCH,
    ) -> None:
        """`tasks`: (name, predecessors, require text or "", retries) for every task;
        `done`: tasks finished in an earlier run (name -> outputs), closed under predecessors;
        `data`: each task's files (default: none, every output collected); `sources`: the
        contents of the inputs the coordinator serves; `prefetch`: the data policy."""
        self._matches = matches
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.prefetch = prefetch
        self.preds: dict[str, list[str]] = {}
        self.tasks: dict[str, TaskState] = {}
        for name, deps, require, retries in tasks:
            self.preds[name] = list(deps)
            self.tasks[name] = TaskState(name, require, retries, 0, len(self.preds[name]))
        self.successors: dict[str, list[str]] = defaultdict(list)
        for name, deps in self.preds.items():
            for dep in deps:
                self.successors[dep].append(name)
        self._assign_priorities(self.preds)
        self.data: dict[str, TaskData] = {name: TaskData() for name in self.tasks}
        self.data.update(data or {})
        self.files = FileTable(sources)
        self.producer = {p: name for name, d in self.data.items() for p in d.outputs}
        self.readers: dict[str, list[str]] = defaultdict(list)  # path -> tasks reading it
        for name, d in self.data.items():
            for path in d.inputs:
                self.readers[path].append(name)
        wide = prefetch.broadcast_min_consumers
        self.broadcast_paths = (
            {p for p, r in self.readers.items() if len(r) >= wide} if wide > 0 else set()
        )
        self._bc_active: set[str] = set()  # broadcast digests still spreading (readers gated)
        self._bc_started: set[str] = set()  # broadcast digests whose first copy went out
        self._bc_failed: dict[str, set[str]] = defaultdict(set)  # digest -> peers it failed on
        self._incoming: dict[str, dict[str, str]] = defaultdict(dict)  # peer -> digest -> via
        self._planned = 0  # tasks planned on peers, not yet placed
        self._own_work: dict[str, None] = {}  # peers with planned or affine tasks (maybe stale)
        self.peers: dict[str, PeerSlots] = {}
        self._free: dict[str, None] = {}  # peers with a free slot, in the order they joined
        self._ready: dict[str, list[_Entry]] = defaultdict(list)
        self._seq = 0
        self._match_cache: dict[tuple[str, str], bool] = {}
        self.counts: dict[TaskStatus, int] = defaultdict(int)
        self.counts[TaskStatus.WAITING] = len(self.tasks)
        self._waiting_levels: Counter[int] = Counter(t.priority for t in self.tasks.values())
        self._top_level = max(self._waiting_levels, default=0)
        self.finished: Finished | None = None
        self._stories: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, task): backoffs
        self.resumed = 0
        if done:
            self._resume(done, self.preds)
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
            self._waiting_levels[task.priority] -= 1
            self._stories[name].append((0.0, "waiting -> done: resumed, its outputs are intact"))
            for path, ref in outputs:  # where they are is for the shell to say (add_sources)
                self.files.learn(path, ref)
            for succ in self.successors.get(name, ()):
                self.tasks[succ].deps_left -= 1
        self.resumed = len(done)

    # -- the one entry point ------------------------------------------------------------

    def handle(self, event: Event, now: float, schedule: bool = True) -> list[Instruction]:
        """Apply `event`; the instructions that follow. `schedule=False` defers placement
        (the shell batches events that arrived together, e.g. peers joining at the start)."""
        out: list[Instruction] = []
        if self.finished is not None:
            return out
        match event:
            case PeerJoined():
                self._join(event)
            case PeerLost():
                self._lose_peer(event.peer, event.reason, now)
            case TaskReported():
                self._reported(event, now, out)
            case OutputsCollected():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    for _, ref in task.outputs:
                        self.files.at_coordinator.add(ref.digest)
                    self._done(task, now, "outputs are in the submit directory", out)
            case CollectFailed():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    self._detach(task)
                    self._failed_attempt(
                        task, f"its outputs could not be fetched: {event.error}", now, out
                    )
            case FileArrived():
                self._arrived(event.peer, event.digest)
            case PrefetchFailed():
                self._incoming[event.peer].pop(event.digest, None)
                self._bc_failed[event.digest].add(event.peer)
                self._release_server(event.peer, event.digest)
                self._check_broadcast(event.digest, now)
            case PeersSettled():
                self._remake("the earlier run (no peer holds it now)", now)
            case CancelRequested():
                self._finish(out, "failed", event.reason)
                return out
            case Tick():
                pass
        if not schedule:
            return out
        self._end_backoffs(now)
        self._broadcast(out)
        self._schedule(now, out)
        self._plan(now, out)
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
        if task.status is TaskStatus.WAITING:
            self._waiting_levels[task.priority] -= 1
        if to is TaskStatus.WAITING:
            self._waiting_levels[task.priority] += 1
            self._top_level = max(self._top_level, task.priority)
        self._stories[task.name].append((now, f"{task.status.value} -> {to.value}: {why}"))
        task.status = to

    def _make_ready(self, task: TaskState, now: float, why: str) -> None:
        self._move(task, TaskStatus.READY, now, why)
        self._enqueue(task)

    def _enqueue(self, task: TaskState) -> None:
        """Make a READY task placeable: in its class heap, and in the heap of the peer that
        holds most of its input bytes. A reader of a file still being broadcast is only
        placeable on peers that already hold it."""
        self._seq += 1
        entry = (-task.priority, self._seq, task.name)
        inputs = self.data[task.name].inputs
        spreading = [
            ref.digest
            for p in inputs
            if (ref := self.files.ref(p)) is not None and ref.digest in self._bc_active
        ]
        task.gated = bool(spreading)
        if task.gated:
            for peer in self.peers.values():
                if all(self.files.holds(peer.name, d) for d in spreading):
                    self._favour(peer, entry)
            return
        heapq.heappush(self._ready[task.require], entry)
        best = self._data_peer(task)
        if best is not None:
            self._favour(best, entry)

    def _favour(self, peer: PeerSlots, entry: _Entry) -> None:
        heapq.heappush(peer.affine, entry)
        self._own_work[peer.name] = None

    def _data_peer(self, task: TaskState) -> PeerSlots | None:
        """The peer holding the most of `task`'s input bytes (None: no peer holds any)."""
        candidates: dict[str, None] = {}
        for path in self.data[task.name].inputs:
            ref = self.files.ref(path)
            if ref is not None:
                candidates.update(self.files.holders.get(ref.digest, {}))
        best, best_bytes = None, 0
        for name in candidates:
            peer = self.peers.get(name)
            if peer is None or not self._can_run(peer, task.require):
                continue
            held = self.files.held_bytes(name, self.data[task.name].inputs)
            if held > best_bytes:
                best, best_bytes = peer, held
        return best

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
            for path in self.data[task.name].inputs:  # it read them there: now cached there
                ref = self.files.ref(path)
                if ref is not None:
                    self.files.hold(event.peer, ref.digest)
            for path, ref in event.outputs:
                self.files.learn(path, ref)
                self.files.hold(event.peer, ref.digest)
            if self.data[task.name].collect:
                self.peers[event.peer].running.discard(task.name)
                self.peers[event.peer].collecting.add(task.name)
                self._free[event.peer] = None  # the slot it ran in is free
                self._move(task, TaskStatus.COLLECTING, now, f"exited 0 on {event.peer}")
                out.append(Collect(task.name, event.peer, task.attempts, event.outputs))
            else:
                self._done(task, now, f"exited 0 on {event.peer}; its outputs stay there", out)
            self._prefetch_for_waiting(task, out)
            return
        self._detach(task)
        lost = {
            ref.digest
            for p in self.data[task.name].inputs
            if (ref := self.files.ref(p)) is not None and not self.files.available(ref.digest)
        }
        if lost:
            # It could not get an input that a lost peer took with it: not its fault. It
            # runs again once the producer has made the file again.
            self._remake("a lost peer", now, also=task)
            return
        why = event.error or f"exit code {event.exit_code}"
        self._failed_attempt(task, why, now, out)

    def _done(self, task: TaskState, now: float, why: str, out: list[Instruction]) -> None:
        self._detach(task)
        task.end = now
        task.error = ""
        self._move(task, TaskStatus.DONE, now, why)
        out.append(TaskDone(task.name, task.peer, task.attempts, task.outputs))
        for name in self.successors.get(task.name, ()):
            succ = self.tasks[name]
            if succ.status is not TaskStatus.WAITING:
                continue  # it ran already: this was a remake for another reader
            succ.deps_left -= 1
            if succ.deps_left == 0:
                self._make_ready(succ, now, "all its inputs exist")

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
                self._enqueue(task)
            return
        task.end = now
        self._move(task, TaskStatus.FAILED, now, f"{why}; no retries left")
        out.append(TaskFailed(task.name, why, task.attempts))
        self._skip_descendants(task, now)

    def _end_backoffs(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, name = heapq.heappop(self._delayed)
            task = self.tasks[name]
            if task.status is TaskStatus.READY:
                self._stories[name].append((now, "backoff over: may be placed again"))
                self._enqueue(task)

    def _skip_descendants(self, failed: TaskState, now: float) -> None:
        stack = list(self.successors.get(failed.name, ()))
        while stack:
            task = self.tasks[stack.pop()]
            if task.status in (TaskStatus.WAITING, TaskStatus.READY):
                # A READY entry left in its heap is dropped when popped (status check).
                self._unplan(task)
                self._move(task, TaskStatus.SKIPPED, now, f"needs {failed.name}, which failed")
                stack.extend(self.successors.get(task.name, ()))

    def _detach(self, task: TaskState) -> None:
        if task.peer in self.peers:
            self.peers[task.peer].running.discard(task.name)
            self.peers[task.peer].collecting.discard(task.name)
            peer = self.peers[task.peer]
            if len(peer.running) < peer.cpus:
                self._free[peer.name] = None

    def _join(self, event: PeerJoined) -> None:
        peer = self.peers[event.peer] = PeerSlots(event.peer, max(1, event.cpus), event.attrs)
        self._free[event.peer] = None
        if not event.cached:
            return
        for digest in event.cached:
            self.files.hold(event.peer, digest)
        # Ready tasks whose bytes it holds favour it (their readers, found by path).
        wanted = {ref.digest: path for path, ref in self.files.refs.items()}
        for digest in event.cached:
            path = wanted.get(digest)
            for name in self.readers.get(path, ()) if path else ():
                task = self.tasks[name]
                ready = task.status is TaskStatus.READY and task.planned_on is None
                if ready and self._data_peer(task) is peer:
                    self._seq += 1
                    self._favour(peer, (-task.priority, self._seq, name))

    def _lose_peer(self, name: str, reason: str, now: float) -> None:
        peer = self.peers.pop(name, None)
        self._free.pop(name, None)
        self._own_work.pop(name, None)
        if peer is None:
            return
        for task_name in list(peer.planned):
            self._unplan(self.tasks[task_name])
        for task_name in sorted(peer.running | peer.collecting):
            task = self.tasks[task_name]
            self._make_ready(task, now, f"peer {name} lost ({reason}): rescheduled")
        for digest, via in self._incoming.pop(name, {}).items():
            self._release_server(via, digest)
        for incoming in self._incoming.values():  # copies it was sending fall back
            for digest, via in list(incoming.items()):
                if via == name:
                    incoming[digest] = ""
        lost = {d for d in self.files.drop_peer(name) if not self.files.available(d)}
        if lost:
            self._remake(f"peer {name}", now)
        for digest in list(self._bc_active):
            self._check_broadcast(digest, now)

    def _remake(self, cause: str, now: float, also: TaskState | None = None) -> None:
        """Run again the producers of lost intermediates that unfinished tasks still need."""
        unfinished = (TaskStatus.WAITING, TaskStatus.READY)

        def gone(path: str) -> bool:
            ref = self.files.ref(path)
            return ref is not None and not self.files.available(ref.digest)

        stack = [
            t
            for t in self.tasks.values()
            if t.status in unfinished and any(gone(p) for p in self.data[t.name].inputs)
        ]
        if also is not None:
            stack.append(also)
        needy = {t.name for t in stack}
        remade: set[str] = set()
        while stack:
            task = stack.pop()
            for path in self.data[task.name].inputs:
                producer = self.producer.get(path)
                if producer is None or producer in remade or not gone(path):
                    continue
                if self.tasks[producer].status is TaskStatus.DONE:
                    remade.add(producer)
                    stack.append(self.tasks[producer])
        for name in remade:
            task = self.tasks[name]
            task.deps_left = 0
            self._move(task, TaskStatus.WAITING, now, f"its output was lost with {cause}")
        for name in remade | needy:
            task = self.tasks[name]
            task.deps_left = sum(
                1 for dep in self.preds[name] if self.tasks[dep].status is not TaskStatus.DONE
            )
            if task.status in (TaskStatus.READY, TaskStatus.RUNNING) and task.deps_left:
                self._unplan(task)
                self._move(task, TaskStatus.WAITING, now, "an input it needs is made again")
        for name in sorted(remade):
            task = self.tasks[name]
            if task.status is TaskStatus.WAITING and task.deps_left == 0:
                self._make_ready(task, now, f"runs again: {cause} took its output")
        if also is not None and also.status is TaskStatus.RUNNING:
            self._make_ready(also, now, f"an input went with {cause}: runs again")

    # -- data: arrivals, broadcast, prefetch --------------------------------------------

    def _arrived(self, peer: str, digest: str) -> None:
        via = self._incoming[peer].pop(digest, None)
        if via:
            self._release_server(via, digest)
        if peer not in self.peers:
            return
        self.files.hold(peer, digest)
        if digest in self._bc_active:
            # Readers waiting for the broadcast may now run here.
            for path in self._paths_of(digest):
                for name in self.readers.get(path, ()):
                    task = self.tasks[name]
                    if task.status is TaskStatus.READY and task.gated:
                        self._seq += 1
                        self._favour(self.peers[peer], (-task.priority, self._seq, name))
            self._check_broadcast(digest, 0.0)

    def _release_server(self, via: str, digest: str) -> None:
        if via in self.peers and via != COORDINATOR:
            self.peers[via].serving = max(0, self.peers[via].serving - 1)

    def _paths_of(self, digest: str) -> list[str]:
        return [p for p in self.broadcast_paths if (r := self.files.ref(p)) and r.digest == digest]

    def _check_broadcast(self, digest: str, now: float) -> None:
        """End a broadcast once every peer holds the file or failed to get it."""
        if digest not in self._bc_active:
            return
        if any(
            not self.files.holds(name, digest) and name not in self._bc_failed[digest]
            for name in self.peers
        ):
            return
        self._bc_active.discard(digest)
        for path in self._paths_of(digest):
            for name in self.readers.get(path, ()):
                task = self.tasks[name]
                if task.status is TaskStatus.READY and task.gated and task.planned_on is None:
                    self._enqueue(task)  # placeable anywhere now (or gated by another file)

    def _broadcast(self, out: list[Instruction]) -> None:
        """Spread each broadcast file: the coordinator sends the first copy, then every
        holder sends one copy at a time to a peer that lacks it (a doubling tree)."""
        if not self.broadcast_paths or not self.peers:
            return
        for path in sorted(self.broadcast_paths):
            ref = self.files.ref(path)
            if ref is None or not self.files.available(ref.digest):
                continue
            digest = ref.digest
            if digest not in self._bc_started:
                self._bc_started.add(digest)
                self._bc_active.add(digest)
                for name in self.readers[path]:  # gate its ready readers from now on
                    task = self.tasks[name]
                    if task.status is TaskStatus.READY and task.planned_on is None:
                        self._enqueue(task)
            lacking = [
                name
                for name in self.peers
                if not self.files.holds(name, digest)
                and digest not in self._incoming[name]
                and name not in self._bc_failed[digest]
            ]
            for target in lacking:
                servers = [
                    self.peers[h]
                    for h in self.files.holders.get(digest, {})
                    if h in self.peers and self.peers[h].serving == 0
                ]
                if servers:
                    via = servers[0].name
                    servers[0].serving += 1
                elif not self.files.holders.get(digest) and not any(
                    digest in incoming for incoming in self._incoming.values()
                ):
                    via = COORDINATOR  # the first copy
                else:
                    break  # every holder is busy sending: the next round goes on arrival
                self._incoming[target][digest] = via
                sources = self.files.sources(digest, target, first=via)
                out.append(Prefetch(target, ((ref, tuple(sources)),), f"broadcast of {path}"))
            self._check_broadcast(digest, 0.0)

    def _prefetch_to(
        self, peer: str, paths: Iterable[str], why: str, out: list[Instruction]
    ) -> int:
        """Order the contents of `paths` that `peer` lacks; the bytes ordered."""
        files = []
        total = 0
        for ref in self.files.missing(peer, paths):
            if ref.digest in self._incoming[peer] or not self.files.available(ref.digest):
                continue
            if ref.digest in self._bc_active:
                continue  # the broadcast brings it
            self._incoming[peer][ref.digest] = ""
            files.append((ref, tuple(self.files.sources(ref.digest, peer))))
            total += ref.size
        if files:
            out.append(Prefetch(peer, tuple(files), why))
        return total

    def _plan(self, now: float, out: list[Instruction]) -> None:
        """Plan ready tasks on busy peers ahead of time and order their inputs moved."""
        settings = self.prefetch
        if not settings.plans_ahead or not self.peers:
            return
        depth = len(self.tasks) if settings.policy == "eager" else settings.depth
        progress = True
        while progress and any(self._ready.values()):
            progress = False  # one task per peer per round: plans stay balanced
            for peer in self.peers.values():
                if len(peer.planned) >= depth or peer.planned_bytes >= settings.max_bytes:
                    continue
                task = self._pop_affine(peer) or self._pop_ready_for(peer)
                if task is None:
                    continue
                missing = sum(
                    r.size for r in self.files.missing(peer.name, self.data[task.name].inputs)
                )
                if peer.planned and peer.planned_bytes + missing > settings.max_bytes:
                    self._enqueue(task)  # does not fit in what may move here ahead
                    peer.planned_bytes = settings.max_bytes
                    continue
                self._plan_on(task, peer)
                peer.planned_bytes += missing
                self._stories[task.name].append((now, f"planned on {peer.name}"))
                self._prefetch_to(
                    peer.name, self.data[task.name].inputs, f"{task.name} planned", out
                )
                progress = True

    def _prefetch_for_waiting(self, producer: TaskState, out: list[Instruction]) -> None:
        """eager / critical-path: move a just-made file to where its waiting reader will run."""
        policy = self.prefetch.policy
        if policy not in ("eager", "critical-path"):
            return
        while self._top_level > 0 and self._waiting_levels[self._top_level] <= 0:
            self._top_level -= 1
        for name in self.successors.get(producer.name, ()):
            task = self.tasks[name]
            if task.status is not TaskStatus.WAITING:
                continue
            if policy == "critical-path" and task.priority < self._top_level:
                continue  # not on a longest remaining path
            peer = self.peers.get(task.planned_on or "")
            if peer is None:
                # critical-path: where the chain goes on (its longest unfinished producer);
                # eager: where most of its bytes already are.
                peer = self._chain_peer(task) if policy == "critical-path" else None
                peer = peer or self._data_peer(task)
                if peer is None:
                    continue
                self._plan_on(task, peer)
            self._prefetch_to(peer.name, self.data[name].inputs, f"{name} waits on it", out)

    def _plan_on(self, task: TaskState, peer: PeerSlots) -> None:
        task.planned_on = peer.name
        peer.planned.append(task.name)
        self._planned += 1
        self._own_work[peer.name] = None

    def _chain_peer(self, task: TaskState) -> PeerSlots | None:
        running = [
            self.tasks[d]
            for d in self.preds[task.name]
            if self.tasks[d].status is TaskStatus.RUNNING
        ]
        if not running:
            return None
        return self.peers.get(max(running, key=lambda t: t.priority).peer or "")

    def _unplan(self, task: TaskState, requeue: bool = True) -> None:
        peer = self.peers.get(task.planned_on or "")
        if task.planned_on is not None:
            self._planned -= 1
        task.planned_on = None
        if peer is not None and task.name in peer.planned:
            peer.planned.remove(task.name)
            if not peer.planned:
                peer.planned_bytes = 0
        if requeue and task.status is TaskStatus.READY:
            self._enqueue(task)

    # -- decisions ----------------------------------------------------------------------

    def _can_run(self, peer: PeerSlots, require: str) -> bool:
        if not require:
            return True
        key = (peer.name, require)
        if key not in self._match_cache:
            self._match_cache[key] = self._matches(require, peer.attrs)
        return self._match_cache[key]

    def _schedule(self, now: float, out: list[Instruction]) -> None:
        # Only peers with a free slot are visited, and only while there is work for them:
        # an event costs O(classes), not O(peers), with thousands of peers and tasks.
        # First what is planned for a peer or whose data it holds, then the best task any
        # peer can run, then (slots that would idle) planned work of other peers.
        for name in [n for n in self._own_work if n in self._free] if self._own_work else ():
            peer = self.peers[name]
            self._fill(peer, self._take_own, now, out)
            if not peer.planned and not peer.affine:
                del self._own_work[name]
        if any(self._ready.values()):
            for name in list(self._free):
                if not any(self._ready.values()):
                    break
                self._fill(self.peers[name], self._pop_ready_for, now, out)
        if self._planned and not any(self._ready.values()):
            for name in list(self._free):
                self._fill(self.peers[name], self._steal, now, out)

    def _fill(
        self,
        peer: PeerSlots,
        source: Callable[[PeerSlots], TaskState | None],
        now: float,
        out: list[Instruction],
    ) -> None:
        while len(peer.running) < peer.cpus:
            task = source(peer)
            if task is None:
                return
            self._place(task, peer, now, out)

    def _take_own(self, peer: PeerSlots) -> TaskState | None:
        for name in peer.planned:
            task = self.tasks[name]
            if task.status is TaskStatus.READY and not task.gated:
                self._unplan(task, requeue=False)
                return task
        return self._pop_affine(peer)

    def _steal(self, peer: PeerSlots) -> TaskState | None:
        """An idle slot takes the last task planned on the most loaded other peer."""
        if not self._planned:
            return None
        others = [p for p in self.peers.values() if p is not peer and p.planned]
        for victim in sorted(others, key=lambda p: -len(p.planned)):
            for name in reversed(victim.planned):
                task = self.tasks[name]
                if (
                    task.status is TaskStatus.READY
                    and not task.gated
                    and self._can_run(peer, task.require)
                ):
                    self._unplan(task)
                    self._stories[name].append((0.0, f"taken over by idle {peer.name}"))
                    return self._pop_ready_for(peer)
        return None

    def _place(self, task: TaskState, peer: PeerSlots, now: float, out: list[Instruction]) -> None:
        target = peer
        if peer.name in task.failed_on:
            target = self._fresh_peer_for(task) or peer
        task.attempts += 1
        task.peer = target.name
        task.start = now
        task.end = None
        target.running.add(task.name)
        if len(target.running) >= target.cpus:
            self._free.pop(target.name, None)
        self._move(
            task, TaskStatus.RUNNING, now, f"placed on {target.name} (attempt {task.attempts})"
        )
        out.append(Dispatch(task.name, target.name, task.attempts))

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

    def _placeable(self, name: str) -> bool:
        task = self.tasks[name]
        return task.status is TaskStatus.READY and task.planned_on is None

    def _pop_affine(self, peer: PeerSlots) -> TaskState | None:
        heap = peer.affine
        while heap:
            _, _, name = heapq.heappop(heap)
            task = self.tasks[name]
            if self._placeable(name) and self._can_run(peer, task.require):
                if task.gated and not self._holds_broadcast_inputs(peer, task):
                    continue
                return task
        return None

    def _holds_broadcast_inputs(self, peer: PeerSlots, task: TaskState) -> bool:
        return all(
            self.files.holds(peer.name, ref.digest)
            for p in self.data[task.name].inputs
            if (ref := self.files.ref(p)) is not None and ref.digest in self._bc_active
        )

    def _pop_ready_for(self, peer: PeerSlots) -> TaskState | None:
        best: _Entry | None = None
        best_class = ""
        for require, heap in self._ready.items():
            while heap and (not self._placeable(heap[0][2]) or self.tasks[heap[0][2]].gated):
                heapq.heappop(heap)  # stale: placed, planned, skipped, or queued twice
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
            if self._still_serving(name):
                continue
            del self.peers[name]
            self.files.drop_peer(name)
            self._free.pop(name, None)
            self._own_work.pop(name, None)
            out.append(Release(name))

    def _still_serving(self, peer: str) -> bool:
        """Whether a running task elsewhere may still be fetching from `peer` (it holds one
        of its inputs), or a prefetch is pulling from it: releasing it would revoke the job
        key on its data socket in the middle of that transfer."""
        held = self.files.by_peer.get(peer)
        if held:
            for other in self.peers.values():
                for name in other.running if other.name != peer else ():
                    for path in self.data[name].inputs:
                        ref = self.files.ref(path)
                        if ref is not None and ref.digest in held:
                            return True
        return any(peer in incoming.values() for incoming in self._incoming.values())

    def _finish(self, out: list[Instruction], status: str, reason: str) -> None:
        for name in list(self.peers):
            out.append(Release(name))
        self.peers.clear()
        self._free.clear()
        self._own_work.clear()
        self.finished = Finished(status, reason)
        out.append(self.finished)

    # -- questions ------------------------------------------------------------------------

    def add_sources(self, refs: Mapping[str, FileRef]) -> None:
        """Contents the coordinator serves (staged inputs), known once they are hashed."""
        for path, ref in refs.items():
            self.files.learn(path, ref)
            self.files.at_coordinator.add(ref.digest)

    def sources(self, digest: str, peer: str) -> list[str]:
        """Where `peer` should fetch `digest` from, best first (peer names, COORDINATOR)."""
        return self.files.sources(digest, peer)

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
            if task.status is TaskStatus.WAITING:
                assert task.deps_left > 0, f"{task.name} waits on nothing"
            if task.resumed:
                assert task.status is TaskStatus.DONE and task.attempts == 0
            if task.planned_on is not None and self.finished is None:
                assert task.status in (TaskStatus.READY, TaskStatus.WAITING), task.name
                assert task.name in self.peers[task.planned_on].planned, task.name
        for _, _, name in self._delayed:
            assert self.tasks[name].status is TaskStatus.READY or self.finished is not None
        assert len(self._delayed) <= self.counts[TaskStatus.READY] or self.finished is not None
        for status in TaskStatus:
            assert tally[status] == self.counts[status], f"count of {status.value} is off"
        waiting = Counter(t.priority for t in self.tasks.values() if t.status is TaskStatus.WAITING)
        assert +waiting == +self._waiting_levels, "waiting levels are off"
        for peer in self.peers.values():
            assert len(peer.running) <= peer.cpus, f"{peer.name} runs more than its cpus"
            assert not peer.running & peer.collecting
            assert (peer.name in self._free) == (len(peer.running) < peer.cpus), peer.name
            for name in peer.planned:
                assert self.tasks[name].planned_on == peer.name, name
        assert set(self._free) <= set(self.peers)
