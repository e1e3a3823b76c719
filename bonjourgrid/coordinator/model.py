"""The scheduler's vocabulary: task statuses and their moves, the events the shell feeds
the core, the instructions it gets back, and the state the core keeps per task and per peer.
Plain records, no behaviour: `coordinator/core.py` and its parts (`ready.py`, `dataplane.py`)
act on them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bonjourgrid.cache.store import FileRef


class TaskStatus(enum.Enum):
    # Members are singletons compared by identity: hash them by identity too. Enum's own
    # __hash__ hashes the name in Python code, and the core counts statuses at every move.
    __hash__ = object.__hash__

    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    COLLECTING = "collecting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


FINAL = {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.SKIPPED}
# The only moves a task may make; validate_state() and _move() hold the core to them.
TASK_TRANSITIONS = {
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
    (TaskStatus.COLLECTING, TaskStatus.WAITING),
    (TaskStatus.READY, TaskStatus.DONE),  # a noop task: nothing to run
    # a task waits (WAITING) while its pre or post script runs on the coordinator's host:
    # the script decides it (pre_skip, post exit status, a failing pre with no retry left)
    (TaskStatus.WAITING, TaskStatus.DONE),
    (TaskStatus.WAITING, TaskStatus.FAILED),
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
class RunStarted:
    """The peer acknowledged the run (`started`): from now on its heartbeats must list it."""

    peer: str
    task: str
    attempt: int


@dataclass(frozen=True)
class RunPlaced:
    """The middleware started attempt `attempt` of `task` on `peer`: for a middleware that
    places the runs and holds the DAG's edges (the core's `placement="middleware"`), this is
    how a run begins. `attempt` is the middleware's count (DAGMan's retries count up)."""

    peer: str
    task: str
    attempt: int


@dataclass(frozen=True)
class AttemptFailed:
    """The attempt cannot go on: the peer refused the run, or sent a malformed message
    about it, or the run could not be sent. `reason` says which, for the report."""

    peer: str
    task: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PeerRunning:
    """The runs a peer says it has going (a `heartbeat_ack`)."""

    peer: str
    running: frozenset[tuple[str, int]]


@dataclass(frozen=True)
class PeerSuspended:
    """A held peer's owner came back and it stopped its runs (`suspended`), or left again
    and they go on (not `suspended`): a `suspension` message. The runs stay RUNNING and the
    peer held; an owner who stays gets the peer back with `preempted` (PeerLost)."""

    peer: str
    suspended: bool
    reason: str


# How a suspension reads in a task's story (the report counts them: report.py).
SUSPENDED_NOTE = "suspended on "
RESUMED_NOTE = "resumed on "


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


@dataclass(frozen=True)
class SourcesHashed:
    """Source inputs hashed while the job runs (`SchedulerCore.hold_sources`): the tasks
    that read them may run once nothing else holds them."""

    refs: Mapping[str, FileRef]


@dataclass(frozen=True)
class ScriptEnded:
    """A task's pre or post script (`RunScript`) ended with `exit_code` (None: it could not
    be started, or what follows it failed: `error` says why). After a pre: `sources` are
    the task's submit-directory inputs hashed again (the pre may have written them); after
    a pre that skips the task (`pre_skip`) or a post that exits 0: `outputs` are the task's
    declared outputs hashed in the submit directory."""

    task: str
    script: str  # "pre" | "post"
    attempt: int
    exit_code: int | None
    error: str = ""
    outputs: tuple[tuple[str, FileRef], ...] = ()
    sources: Mapping[str, FileRef] = field(default_factory=dict)


Event = (
    PeerJoined
    | PeerLost
    | TaskReported
    | RunStarted
    | RunPlaced
    | AttemptFailed
    | PeerRunning
    | PeerSuspended
    | OutputsCollected
    | CollectFailed
    | FileArrived
    | PrefetchFailed
    | PeersSettled
    | CancelRequested
    | SourcesHashed
    | ScriptEnded
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
class RunScript:
    """Run the task's pre script (before attempt `attempt` is placed) or post script (after
    attempt `attempt` ended) on the coordinator's host; a `ScriptEnded` comes back. The rest
    is the scripts' environment: failed attempts so far (BGRID_RETRY), the command's exit
    code (BGRID_RETURN, -1 when it never ran) and the pre's (BGRID_PRE_RETURN, -1: none)."""

    task: str
    script: str  # "pre" | "post"
    attempt: int
    retry: int
    returned: int = -1
    pre_returned: int = -1


@dataclass(frozen=True)
class StopRun:
    """Stop this attempt on its peer (`cancel`): the core gave up on it, no report expected."""

    task: str
    peer: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class Notice:
    """A decision worth telling the user (logged at INFO, or at DEBUG when `detail`)."""

    message: str
    detail: bool = False


@dataclass(frozen=True)
class Release:
    peer: str


@dataclass(frozen=True)
class Recruit:
    count: int
    reason: str


@dataclass(frozen=True)
class Finished:
    status: str  # "succeeded" | "failed" | "aborted"
    reason: str
    # An `abort_on` task's status, which `bgrid submit` exits with (None: see exit_code)
    exit_status: int | None = None
    aborted_by: str = ""  # the task whose exit code aborted the job (`abort_on`)

    def exit_code(self) -> int:
        """What `bgrid submit` exits with: an abort's status, else 0 succeeded, 1 not."""
        if self.exit_status is not None:
            return self.exit_status
        return 0 if self.status == "succeeded" else 1


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


Instruction = (
    Dispatch
    | Collect
    | Prefetch
    | RunScript
    | StopRun
    | Notice
    | Release
    | Recruit
    | Finished
    | TaskDone
    | TaskFailed
)


# -- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRules:
    """A task's node semantics (the workflow's priority, category, retry_unless_exit,
    abort_on, final, noop); a task without any has none (`SchedulerCore(rules=...)`)."""

    priority: int = 0  # higher goes first among ready tasks
    category: str = ""  # counted against `category_caps[category]` while it runs
    unless_exit: int | None = None  # an attempt exiting with it fails the task for good
    abort_exit: int | None = None  # an attempt exiting with it aborts the job...
    abort_status: int = 1  # ...which then exits with this status
    final: bool = False  # ready once every other task has ended; its outcome is the job's
    noop: bool = False  # never placed: DONE as soon as it is READY


@dataclass(frozen=True, slots=True)  # one per task, for the whole job
class TaskData:
    """A task's files: what it reads, what it writes, and whether its outputs come back."""

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    collect: bool = True  # False: its outputs stay on peers (intermediates)
    pre: bool = False  # a pre script runs before each attempt is placed
    post: bool = False  # a post script decides each attempt (its outputs collected first)
    pre_skip: int | None = None  # the pre's exit code that makes the task done with no run


@dataclass(slots=True)  # 100,000 of them live through a job and its report
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
    bytes_fetched: int = 0  # input bytes its last attempt moved itself (not prefetched)
    outputs: tuple[tuple[str, FileRef], ...] = ()
    not_before: float = 0.0  # a retry waits for its backoff until then
    failed_on: tuple[str, ...] = ()  # peers where an attempt failed (a retry avoids them)
    resumed: bool = False  # DONE from an earlier run's journal: never ran in this one
    planned_on: str | None = None  # the peer it is planned on (prefetching), not yet placed
    # The sequence number of its entries in the ready heaps (a class heap and maybe some
    # peers' affine heaps): entries with another number are stale. -1: in no heap.
    queued: int = -1
    backoff: int = -1  # the sequence number of its entry in the backoff heap; -1: none
    gated: bool = False  # READY, but waits for a broadcast file on its peer
    acked: bool = False  # its peer acknowledged the current attempt (`started`)
    unlisted: int = 0  # heartbeats in a row since then in which its peer did not list it
    # RUNNING, reading a file that went with a lost peer: its fetch may be stuck on that
    # peer. Stopped and placed again once the file is made again (unless it reports first).
    lost_input: str = ""
    rerun: str = ""  # why it ran again after it was done (its output was lost), for the report
    user_priority: int = 0  # the workflow's `priority:` (higher first), before the bottom level
    category: str = ""  # the workflow's `category:` ("" none): its cap bounds runs at once
    script: str = ""  # "pre" or "post" while one runs (it then WAITs, for one more thing)
    pre_passed: bool = False  # its pre exited 0 since its last placement: may be placed
    pre_return: int | None = None  # the exit code of its latest pre, post (for the report)
    post_return: int | None = None


@dataclass
class PeerSlots:
    name: str
    cpus: int
    attrs: Mapping[str, str]
    running: set[str] = field(default_factory=set)
    collecting: set[str] = field(default_factory=set)
    planned: list[str] = field(default_factory=list)  # tasks to run here next, in order
    planned_ready: int = 0  # of those, the ones that could start now (READY)
    planned_bytes: int = 0  # what planned tasks still had to move here when planned
    serving: int = 0  # broadcast copies it is sending now


Matcher = Callable[[str, Mapping[str, str]], bool]
Entry = tuple[int, int, str]  # heap entry: (-(user priority, bottom level), sequence, task)
