"""The scheduler, pure: events in, instructions out; no sockets, no clock, no randomness.

Theory of operation. Every task walks one path:

    WAITING --all inputs done--> READY --placed--> RUNNING --exit 0--> COLLECTING --> DONE
                                   ^                  |  \\--exit != 0, retries left--'(READY)
                                   '--peer lost-------'   \\--no retries left--> FAILED
    (descendants of a FAILED task are SKIPPED; the other branches go on, as in DAGMan)
    (a task with a pre or post script WAITs while it runs: "Pre and post scripts" below)

A resumed job starts with the tasks its journal vouches for already DONE (`done=`); a task
is never DONE before every task it needs. "All inputs done" also counts source inputs still
being hashed (`hold_sources`, until `SourcesHashed`): a big new input is read while the tasks
that do not need it already run.

A failed attempt with retries left makes the task READY again, but not placeable before
`now + backoff` (BACKOFF_BASE_S doubling per failure, capped at BACKOFF_CAP_S): it waits in
a heap of its own, so other ready tasks go past it, and the job cannot end while it waits.
The core has no clock: `next_wakeup()` says when the shell must feed a `Tick`. A retry goes
to another peer than the ones it failed on when one has a free slot.

Ready tasks wait in one heap per class (tasks with the same `require` and category),
ordered by the workflow's `priority` and then by their bottom level (the longest chain of
tasks after them), so among equals the critical path goes first. Placement visits free slots
and pops the best task the slot's peer can run: the cost of a decision depends on the number
of classes, never on the number of tasks, which keeps a 100,000-task DAG schedulable. A
peer is released as soon as no unstarted task is left for it.

Node rules (`rules=`, the workflow's DAGMan-like keys; `NodeRules` in model.py):
- category caps: a task counts against its category's cap from its placement to its end
  (outputs collected). A category at its cap is `full` in the ready queue, whose classes of
  it are then passed over: its tasks wait READY, and a free slot whose only work is capped
  takes nothing and costs nothing per event (`has_ready` says there is no work). A capped
  task is never planned ahead nor gated on a broadcast (it waits for its category, not for
  a peer), so nothing but its class heap holds it.
- `retry_unless_exit`: an attempt that exited with that code fails the task for good.
- `abort_on`: an attempt that exited with that code aborts the job: it fails, every RUNNING
  task is stopped (`StopRun`) and fails, every WAITING or READY one is SKIPPED, a task on a
  peer lost afterwards fails; nothing starts again but the final task. The job ends
  "aborted", `Finished.exit_status` being the rule's status.
- `final`: one task without edges, WAITING (one in `deps_left`, see `undone_preds`) until
  every other task has ended, however it ended, then placed as any. When the job ends, its
  outcome is the job's (DAGMan's FINAL node overrides the other nodes and an ABORT-DAG-ON's
  status). A cancel ends the job without it.
- `noop`: made READY, it is DONE in the same event (`_settle_nodes`), never placed nor
  planned; a chain of noop tasks settles in one loop, not by recursion. Its pre still runs
  first (`make_ready`'s gate), and its post after (as after an exit 0); a retry (its post
  failed) makes it ready again at once, through its pre.

Scale: no event costs O(peers), let alone O(peers x running tasks). Every question asked
per event is answered from an index kept as the state changes, never by a scan: which peers
have a free slot and which of those have work of their own (`ReadyQueue.free`,
`own_work`), which peers are idle (`_idle`, for scale-in), which idle peer still serves a
file a running task reads (counted in the `FileTable`), which peers have room for a plan
or planned work to steal (`DataPlanner`). `validate_state()` checks each index against a
recomputation. What is kept per task for the whole job is kept small (slotted records, a
story as a flat list of interned sentences): a 100,000-task job's state is about 1 KB a task.

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
still needs, the task that made it runs again at once (DONE -> WAITING/READY), and so do
its own producers if their outputs went the same way. A reader already RUNNING elsewhere may
be stuck fetching from the lost peer: it goes on, and is stopped (`StopRun`) and placed again,
without using a retry, as soon as the file exists again, unless it reports first.

Pre and post scripts (DAGMan SCRIPT PRE/POST, PRE_SKIP; `TaskData.pre/post/pre_skip`). They
run on the coordinator's host (the shell's `scripts.py`); the core says when (`RunScript`)
and hears how they went (`ScriptEnded`). While one runs, its task is WAITING with
`script` set, and the script counts as one more thing it waits for (`undone_preds`):
- `make_ready` is the gate: a task with a pre is only READY (placeable) once its pre exited
  0 since its last placement (`pre_passed`); otherwise its pre starts and it WAITs. Every
  placement consumes the pass, so every attempt runs the pre (a retry, a run placed again
  after a lost peer). A pre that does not exit 0 is a failed attempt that never ran (it
  takes an attempt number; retries run the pre again at once: no backoff); one exiting the
  task's `pre_skip` makes it DONE with no run (WAITING -> DONE), with the outputs the shell
  found in the submit directory. After a pre that exits 0, the inputs the shell hashed again
  (the pre may have written them) are learnt as sources before the task is placed.
- A task with a post always has its outputs collected; once they are in the submit
  directory (OutputsCollected), or once its attempt failed in any way (a bad exit, a run
  refused or never acknowledged: BGRID_RETURN -1), its post runs and decides: 0 makes it
  DONE with the outputs as the post left them (WAITING -> DONE), anything else is the
  failed attempt (retried per `retries`, or WAITING -> FAILED).
`validate_state()` holds: a running script means WAITING; a READY task with a pre has passed it.

Speculative copies (`speculation=`, bgrid.toml's `[schedule]`; the policy in copies.py).
When free slots have nothing ready, a RUNNING task that has run `factor` times longer than
the median of its finished siblings (its class) gets a copy on another peer: a second live
run of the same task with its own attempt number (`copies`: task -> its runs besides the one
its record holds). The first run to exit 0 wins: it becomes the task's run (`_swap`), the
others are stopped (`StopRun`) as the task leaves RUNNING (`_left_running`), and only the
winner is collected, so the submit directory is written once. A run that fails, is refused,
goes unlisted or loses its peer while another lives only ends that run (no retry used; its
peer joins `failed_on`); the last one standing is the task's run as before. Scale-in keeps
as many idle peers as running tasks without a copy: a straggler shows at the job's tail,
when peers go idle, and a peer released at once could not run its copy. The running tasks
are scanned (oldest first, `_running`) only when a straggler may have appeared since the
last scan: a run began or ended, or the earliest threshold passed (`next_wakeup` says when),
and at most once per `RESCAN_S` of job time, so a big job's tail, where runs end one after
another, costs one scan a second, not one per event.

Quorum (`quorum=`: task -> N; the rules in copies.py's `Ballot`). A task under quorum is
placed as any, then `_top_up` starts its other runs on free peers that have not voted (before
ready tasks are placed: it is further along). A run that exits 0 votes with its outputs'
digests and leaves its slot (`_retire_copy`, `_retire_run`); when every run of the task has
voted and more are wanted, it stays RUNNING with no run (`_unrun`) until a peer frees. A
majority accepts the outputs of one of its peers still held (`_succeeded`: collected from
there, the runs still going stopped); no possible majority, or no peer left to vote, fails
the task naming each peer and its digests. While a task holds a ballot, scale-in releases no
idle peer (the next vote may need it). A peer outvoted `OUTVOTED_LIMIT` times is distrusted:
placed on last, released once idle, released again at once if it joins.

A held peer whose owner comes back suspends its runs (`PeerSuspended`, worker/core.py):
they stay RUNNING and the peer stays held (its heartbeats still list them); the stories say
"suspended on" / "resumed on" (the report counts the suspensions). Nothing else changes: a
run placed on a free slot of a suspended peer starts stopped there. An owner who stays
vacates the peer: `preempted` is a PeerLost, whose runs go back to the queue with no retry
used.

Peers are checked, not trusted. A dispatched run must be acknowledged (`RunStarted`) within
`ack_timeout_s`, and once it is, every heartbeat of its peer must list it (`PeerRunning`): a
run never acknowledged, or missing from two heartbeats in a row, is a failed attempt, as is
one the peer refused (`AttemptFailed`). A failed attempt is retried per the task's retries.

Parts. The core owns the job's state (tasks, held peers and their slots, counts, stories)
and the moves of a task (`move`, `make_ready`, `enqueue`, `detach`: each with its
bookkeeping). It builds and holds two collaborators, each owning its own state:
- `ReadyQueue` (`ready.py`): the class heaps, the per-peer affine heaps and the backoff
  heap, with lazy deletion of stale entries, which peer can run which class, and how many
  tasks of each capped category are placed;
- `DataPlanner` (`dataplane.py`): placement affinity, prefetch planning, broadcast and the
  remaking of lost intermediates. It is handed what it reads and asks the core for every
  move of a task through the narrow `TaskMoves` protocol, which the core implements.
The `FileTable` (`files.py`) says where contents are; core and planner share it.

Middleware placement (`placement="middleware"`). A middleware that holds the DAG's edges
and places the runs itself (HTCondor's DAGMan) is handed the whole DAG at once; the core
then places nothing (no Dispatch, no Prefetch, no Collect) and follows what the middleware
says, so that the journal, `--resume` and the report stay the core's:
- a run begins with `RunPlaced(peer, task, attempt)`: READY -> RUNNING on that peer (any
  peer name: the middleware may run it on a machine the job does not hold, and a peer may
  run more runs than its cpus). News of a newer attempt than the core knows starts it too.
- `TaskReported` ends it as usual; its outputs are already in the submit directory (the
  middleware moved them), so a success is DONE at once.
- The middleware retries by itself (DAGMan RETRY): a failed attempt with retries left
  makes the task READY to wait for the middleware's next start (no backoff, no placement);
  with none left it FAILS and its descendants are SKIPPED (the middleware will not run them
  either). A run that exited 0 but is reported with an error (a declared output missing)
  failed where the middleware cannot see it: it will not run it again, so it fails for good.
- News of a task still WAITING (its parents' ends not heard yet) is held, and applied once
  they are. The shell keeps the middleware's order, and DAGMan's log puts a node's start
  after its parents' ends, so only a middleware that reorders its news needs this.
- A run of a SKIPPED task (the middleware counted its parent a success) is stopped
  (`StopRun`), and so is every run still going when the job is cancelled.
- A lost peer's runs stay RUNNING: the middleware requeues them or says they failed.
  Acknowledgement deadlines and heartbeat listings do not apply (the runs are the
  middleware's, not a bgrid worker's).
- Node rules are refused (ValueError): the middleware places the runs and applies its own.

The shell (`coordinator/shell.py`) feeds events, passes `now`, and carries out instructions.
`story(task)` tells why a task ran where it ran, as many times as it did.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator.copies import (
    OUTVOTED_LIMIT,
    Ballot,
    Copy,
    Runtimes,
    SpeculationSettings,
    Vote,
)
from bonjourgrid.coordinator.dataplane import DataPlanner
from bonjourgrid.coordinator.files import FileTable
from bonjourgrid.coordinator.model import (
    FINAL,
    RESUMED_NOTE,
    SUSPENDED_NOTE,
    TASK_TRANSITIONS,
    AttemptFailed,
    CancelRequested,
    Collect,
    CollectFailed,
    Dispatch,
    Event,
    FileArrived,
    Finished,
    Instruction,
    Matcher,
    NodeRules,
    Notice,
    OutputsCollected,
    PeerJoined,
    PeerLost,
    PeerRunning,
    PeerSlots,
    PeersSettled,
    PeerSuspended,
    Prefetch,
    PrefetchFailed,
    Recruit,
    Release,
    RunPlaced,
    RunScript,
    RunStarted,
    ScriptEnded,
    SourcesHashed,
    StopRun,
    TaskData,
    TaskDone,
    TaskFailed,
    TaskReported,
    TaskState,
    TaskStatus,
    Tick,
)
from bonjourgrid.coordinator.prefetch import PrefetchSettings
from bonjourgrid.coordinator.ready import ReadyQueue

# The records live in model.py; the shell and the tests reach them through here.
__all__ = [
    "RESUMED_NOTE",
    "SUSPENDED_NOTE",
    "AttemptFailed",
    "CancelRequested",
    "Collect",
    "CollectFailed",
    "Dispatch",
    "Event",
    "FileArrived",
    "Finished",
    "Instruction",
    "NodeRules",
    "Notice",
    "OutputsCollected",
    "PeerJoined",
    "PeerLost",
    "PeerRunning",
    "PeerSlots",
    "PeerSuspended",
    "PeersSettled",
    "Prefetch",
    "PrefetchFailed",
    "Recruit",
    "Release",
    "RunPlaced",
    "RunScript",
    "RunStarted",
    "SchedulerCore",
    "ScriptEnded",
    "SourcesHashed",
    "StopRun",
    "TaskData",
    "TaskDone",
    "TaskFailed",
    "TaskReported",
    "TaskState",
    "TaskStatus",
    "Tick",
]


BACKOFF_BASE_S = 1.0  # wait before the first retry; doubled for each further failure
BACKOFF_CAP_S = 60.0  # the longest wait before a retry
UNLISTED_LIMIT = 2  # heartbeats in a row without an acknowledged run: its attempt failed
RESCAN_S = 1.0  # speculation scans the running tasks at most this often (job time)
_NO_PREFETCH = PrefetchSettings(policy="none", broadcast_min_consumers=0)
# "waiting -> ready: " for every allowed move: a story's step without formatting enums.
_ON_A_PEER = (TaskStatus.RUNNING, TaskStatus.COLLECTING)  # placed and not ended
_MOVE_HEADINGS = {(a, b): f"{a.value} -> {b.value}: " for a, b in TASK_TRANSITIONS}


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
        ack_timeout_s: float | None = None,
        placement: Literal["core", "middleware"] = "core",
        rules: Mapping[str, NodeRules] | None = None,
        category_caps: Mapping[str, int] | None = None,
        speculation: SpeculationSettings | None = None,
        quorum: Mapping[str, int] | None = None,
    ) -> None:
        """`tasks`: (name, predecessors, require text or "", retries) for every task;
        `done`: tasks finished in an earlier run (name -> outputs), closed under predecessors;
        `data`: each task's files (default: none, every output collected); `sources`: the
        contents of the inputs the coordinator serves; `prefetch`: the data policy;
        `ack_timeout_s`: how long a peer has to acknowledge a run (None: forever);
        `placement`: "middleware" when the middleware holds the edges and places the runs
        (see the theory of operation); `rules`: the node semantics of the tasks that have
        some (priority, category, retry_unless_exit, abort_on, final, noop);
        `category_caps`: how many tasks of a category may run at once (a category left out
        has no cap); `speculation`: when a straggler gets a copy (default: never); `quorum`: how
        many agreeing runs the tasks that need more than one need."""
        self.by_middleware = placement == "middleware"
        self.rules: dict[str, NodeRules] = {n: r for n, r in (rules or {}).items() if r}
        if self.by_middleware and (self.rules or category_caps):
            raise ValueError("a middleware that places the runs applies no node rules")
        # News from the middleware about WAITING tasks, applied once their parents are done.
        self._held_news: dict[str, list[RunPlaced | TaskReported | AttemptFailed]] = {}
        self.ack_timeout_s = ack_timeout_s
        self._ack_due: list[tuple[float, str, int]] = []  # (deadline, task, attempt)
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
        self.final: str | None = None  # the task that runs once every other one has ended
        for name, rule in self.rules.items():
            task = self.tasks[name]
            task.user_priority, task.category = rule.priority, rule.category
            if rule.final:
                assert self.final is None and not self.preds[name], f"{name}: one final, apart"
                assert not self.successors.get(name), f"final {name} has successors"
                self.final = name
        self._noops_due: list[str] = []  # noop tasks made READY, DONE before the next pass
        # (task, exit code, status) once a task's `abort_on` exit code stopped the job
        self.abort: tuple[str, int, int] | None = None
        self.data: dict[str, TaskData] = {name: TaskData() for name in self.tasks}
        self.data.update(data or {})
        self.files = FileTable(sources)
        # Source inputs whose digests come while the job runs -> the tasks that read them.
        self._unhashed: dict[str, list[str]] = {}
        # Pre scripts due (`make_ready` has no instruction list): handed out by `handle`.
        self._scripts_due: list[RunScript] = []
        self.peers: dict[str, PeerSlots] = {}
        # also which peers have a free slot, and how many runs each capped category has
        self.ready = ReadyQueue(self.tasks, matches, category_caps)
        self._idle: dict[str, None] = {}  # peers running and collecting nothing (scale-in)
        self._filled: list[str] = []  # peers placed on during a scheduling pass
        self.planner = DataPlanner(
            tasks=self.tasks,
            peers=self.peers,
            preds=self.preds,
            successors=self.successors,
            data=self.data,
            files=self.files,
            ready=self.ready,
            settings=prefetch,
            moves=self,
        )
        self.counts: dict[TaskStatus, int] = defaultdict(int)
        self.counts[TaskStatus.WAITING] = len(self.tasks)
        self._waiting_levels: Counter[int] = Counter(t.priority for t in self.tasks.values())
        self._top_level = max(self._waiting_levels, default=0)
        self.finished: Finished | None = None
        # Per task, its story flat: [when, why, when, why, ...], each `why` interned. Most
        # tasks tell the same few sentences (per peer and attempt): shared, a story costs a
        # few pointers per step, not a tuple and a string (issue 12: 100k tasks in 300 MB).
        self._stories: dict[str, list[float | str]] = defaultdict(list)
        self.resumed = 0
        # Speculative copies ("Speculative copies" above; copies.py): task -> its live runs
        # besides the one its record holds, on other peers.
        self.speculation = speculation or SpeculationSettings()
        self.copies: dict[str, list[Copy]] = {}
        # For the report: every copy made, per task, as (peer, attempt, why it was made).
        self.copies_made: dict[str, list[tuple[str, int, str]]] = {}
        self.runtimes = Runtimes()  # of the tasks that exited 0, per class
        self._running: dict[str, None] = {}  # RUNNING tasks, oldest first (`_multirun` only)
        self._top_attempt: dict[str, int] = {}  # the last attempt number a copy took
        self._stops_due: list[StopRun] = []  # copies stopped by a move (`move` has no `out`)
        self._speculation_due = 0.0  # no straggler can appear before then
        self._speculation_scanned = float("-inf")  # when the running tasks were last scanned
        # Quorum ("Quorum" above; copies.py): task -> N, and the votes of its runs.
        self.quorum: dict[str, int] = {n: q for n, q in (quorum or {}).items() if q > 1}
        if self.by_middleware and self.quorum:
            raise ValueError("a middleware that places the runs runs no quorum")
        self.ballots: dict[str, Ballot] = {}
        # Whether a task may have more than one run at once: else the hot paths skip it all.
        self._speculating = self.speculation.enabled
        self._multirun = self._speculating or bool(self.quorum)
        self._quorum_due: dict[str, None] = {}  # RUNNING tasks that may want more runs
        # RUNNING tasks under quorum with no live run: all voted, more runs wanted
        self._unrun: dict[str, None] = {}
        self.outvoted: Counter[str] = Counter()  # peer -> results the majority did not share
        # Outvoted OUTVOTED_LIMIT times: released once idle, never taken back for the job.
        self.distrusted: dict[str, None] = {}
        self._distrusted_held: list[str] = []  # of those, the peers still held
        self.quorum_votes: dict[str, dict[str, object]] = {}  # task -> its ballot, for the report
        if done:
            self._resume(done, self.preds)
        if self.final is not None and self.tasks[self.final].status is TaskStatus.WAITING:
            self.tasks[self.final].deps_left = self.undone_preds(self.final)
        for task in self.tasks.values():
            if task.deps_left == 0 and task.status is TaskStatus.WAITING:
                self.make_ready(task, 0.0, "no inputs from other tasks")

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
            self.note(name, 0.0, "waiting -> done: resumed, its outputs are intact")
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
        if (
            self.copies
            and isinstance(event, TaskReported | AttemptFailed | RunStarted)
            and self._copy_news(event, now, out)
        ):
            event = Tick()  # news of a copy that only ended that copy: nothing more to do
        match event:
            case PeerJoined() if event.peer in self.distrusted:
                out.append(Release(event.peer))  # outvoted too often: not for this job
            case PeerJoined():
                self._join(event)
            case PeerLost():
                self._lose_peer(event.peer, event.reason, now, out)
            case RunPlaced() | TaskReported() | AttemptFailed() if self.by_middleware:
                self._middleware_news(event, now, out)
            case RunPlaced():
                pass  # the core places the runs: a middleware's word on placement is moot
            case TaskReported():
                self._reported(event, now, out)
            case RunStarted() if not self.by_middleware:
                task = self._running_on(event.peer, event.task, event.attempt)
                if task is not None and not task.acked:
                    task.acked = True
                    self.note(task.name, now, f"{event.peer} acknowledged the run")
            case AttemptFailed():
                task = self._running_on(event.peer, event.task, event.attempt)
                if task is not None and not self._copy_takes_over(task, event.reason, now):
                    self.detach(task)
                    self._failed_attempt(task, event.reason, now, out)
            case PeerRunning() if not self.by_middleware:
                self._check_listed(event, now, out)
            case PeerSuspended():
                self._suspension(event, now, out)
            case OutputsCollected():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    for _, ref in task.outputs:
                        self.files.at_coordinator.add(ref.digest)
                    if self.data[task.name].post and not self.by_middleware:
                        self.detach(task)
                        task.error = ""  # this attempt went well (an earlier one's is over)
                        self._start_post(task, now, "outputs are in the submit directory", out)
                    else:
                        self._done(task, now, "outputs are in the submit directory", out)
            case CollectFailed():
                task = self.tasks.get(event.task)
                if task and task.status is TaskStatus.COLLECTING and task.attempts == event.attempt:
                    self.detach(task)
                    self._failed_attempt(
                        task, f"its outputs could not be fetched: {event.error}", now, out
                    )
            case FileArrived():
                self.planner.arrived(event.peer, event.digest)
            case PrefetchFailed():
                self.planner.prefetch_failed(event.peer, event.digest, now)
            case PeersSettled() if not self.by_middleware:
                self.planner.remake("the earlier run (no peer holds it now)", now, out)
            case SourcesHashed():
                self._sources_hashed(event.refs, now)
            case ScriptEnded() if not self.by_middleware:
                self._script_ended(event, now, out)
            case CancelRequested():
                self._finish(out, "failed", event.reason)
                return out
            case _:
                pass
        if self._held_news:
            self._release_held_news(now, out)
        if self._noops_due or self.final is not None:
            self._settle_nodes(now, out)
        if self._scripts_due:
            out.extend(self._scripts_due)
            self._scripts_due.clear()
        if self._stops_due:
            out.extend(self._stops_due)
            self._stops_due.clear()
        if not schedule:
            return out
        if not self.by_middleware:
            self._end_backoffs(now)
            self._expire_acks(now, out)
            self.planner.broadcast(out)
            if self._quorum_due:
                self._top_up(now, out)
            self._schedule(now, out)
            if self._quorum_due:  # the runs of tasks placed just now
                self._top_up(now, out)
            self.planner.plan(now, out)
            if self._speculating:
                self._speculate(now, out)
            if self._stops_due:
                out.extend(self._stops_due)
                self._stops_due.clear()
        self._scale_in(out)
        if self.counts[TaskStatus.WAITING] + self.counts[TaskStatus.READY] == 0 and not any(
            self.counts[s] for s in (TaskStatus.RUNNING, TaskStatus.COLLECTING)
        ):
            self._conclude(out)
        return out

    def _conclude(self, out: list[Instruction]) -> None:
        """Every task has ended: the job's status, why, and what `bgrid submit` exits with.
        A final task's outcome is the job's, whatever came before (as DAGMan's FINAL node
        overrides the other nodes and an ABORT-DAG-ON's status)."""
        final = self.tasks.get(self.final or "")
        failed = [
            t.name for t in self.tasks.values() if t.status is TaskStatus.FAILED and t is not final
        ]
        skipped = self.counts[TaskStatus.SKIPPED]
        exit_status: int | None = None
        if self.abort is not None:
            name, code, exit_status = self.abort
            status = "aborted"
            reason = (
                f"task {name} exited {code}, which aborts the job (abort_on)"
                + (f"; {len(failed)} task(s) failed or were stopped" if len(failed) > 1 else "")
                + (f"; {skipped} task(s) never ran" if skipped else "")
            )
        elif failed:
            status = "failed"
            reason = f"{len(failed)} task(s) failed ({', '.join(failed[:5])})" + (
                f", {skipped} skipped because they needed their outputs" if skipped else ""
            )
        else:
            status, reason = "succeeded", f"all {len(self.tasks)} tasks succeeded"
        if final is not None and status != "succeeded":
            # the final task decides: its own exit status is what the user asked for
            exit_status = None
            if final.status is TaskStatus.DONE:
                status, reason = "succeeded", f"final task {final.name} succeeded after: {reason}"
            else:
                status, reason = "failed", f"final task {final.name} failed after: {reason}"
        elif final is not None and final.status is not TaskStatus.DONE:
            status, reason = "failed", f"final task {final.name} failed"
        self._finish(out, status, reason, exit_status, self.abort[0] if self.abort else "")

    def _settle_nodes(self, now: float, out: list[Instruction]) -> None:
        """Noop tasks made READY are DONE; the final task is released once nothing else is
        left. Each may lead to the other (a noop final, a noop last task)."""
        final = self.tasks.get(self.final or "")
        while True:
            while self._noops_due:
                task = self.tasks[self._noops_due.pop()]
                if task.status is TaskStatus.READY:
                    task.start = now
                    task.pre_passed = False  # its "run": a retry runs its pre again
                    if self.data[task.name].post:  # its post still runs (DAGMan), as after 0
                        task.exit_code, task.error = 0, ""
                        self._start_post(task, now, "noop: nothing to run", out)
                    else:
                        self._done(task, now, "noop: nothing to run", out)
            if (
                final is None
                or final.status is not TaskStatus.WAITING
                or final.deps_left == self.undone_preds(final.name)
            ):
                return
            final.deps_left -= 1  # every other task has ended
            if final.deps_left == 0:
                self.make_ready(final, now, "every other task has ended")

    # -- transitions --------------------------------------------------------------------

    # The moves below are also what the data planner asks of the core (`TaskMoves`): the
    # core alone changes a task's status, with the bookkeeping each change needs.

    def note(self, task: str, now: float, why: str) -> None:
        """Add to the task's story."""
        self._stories[task] += (now, sys.intern(why))

    def top_waiting_level(self) -> int:
        """The highest bottom level among WAITING tasks (the longest remaining chain)."""
        while self._top_level > 0 and self._waiting_levels[self._top_level] <= 0:
            self._top_level -= 1
        return self._top_level

    def undone_preds(self, name: str) -> int:
        """How many of the tasks `name` needs are not DONE, and of the source inputs it reads
        are not hashed yet (what it waits for)."""
        if name == self.final:  # it waits for every other task to end, however it ends
            ended = self.tasks[name].status in FINAL
            undone = int(self.pending() > (0 if ended else 1))
        else:
            undone = sum(
                1 for dep in self.preds[name] if self.tasks[dep].status is not TaskStatus.DONE
            )
        if self._unhashed:
            undone += sum(1 for path in self.data[name].inputs if path in self._unhashed)
        if self.tasks[name].script:  # its pre or post script runs
            undone += 1
        return undone

    def move(self, task: TaskState, to: TaskStatus, now: float, why: str) -> None:
        heading = _MOVE_HEADINGS.get((task.status, to))
        assert heading is not None, f"{task.name}: {task.status} -> {to}"
        self.counts[task.status] -= 1
        self.counts[to] += 1
        self.ready.end_backoff(task)  # it leaves READY: its backoff no longer matters
        if task.status is TaskStatus.RUNNING:
            task.lost_input = ""  # that attempt is over: it no longer waits for the file
            self.files.stop_reading(self.data[task.name].inputs)
            if self._multirun:
                self._left_running(task, to, now)
        if to is TaskStatus.RUNNING:
            self.files.start_reading(self.data[task.name].inputs)
            if self._multirun:
                self._running[task.name] = None
        if self.ready.caps:
            self._count_in_category(task, to)
        if task.status is TaskStatus.WAITING:
            self._waiting_levels[task.priority] -= 1
        if to is TaskStatus.WAITING:
            self._waiting_levels[task.priority] += 1
            self._top_level = max(self._top_level, task.priority)
        self.note(task.name, now, heading + why)
        task.status = to
        if task.resumed and to is not TaskStatus.DONE:
            task.resumed = False  # made again in this run (its output was lost): not kept

    def _count_in_category(self, task: TaskState, to: TaskStatus) -> None:
        """A task of a capped category counts against its cap from its placement to its
        end (outputs collected), as the report's start and end show it."""
        if task.status in _ON_A_PEER and to not in _ON_A_PEER:
            self.ready.stopped(task)
        elif to in _ON_A_PEER and task.status not in _ON_A_PEER:
            self.ready.started(task)
        if task.status is TaskStatus.READY:
            self.ready.counted_ready(task, -1)
        elif to is TaskStatus.READY:
            self.ready.counted_ready(task, 1)

    def make_ready(self, task: TaskState, now: float, why: str) -> None:
        if self.data[task.name].pre and not task.pre_passed and not self.by_middleware:
            self._start_pre(task, now, why)
            return
        self.move(task, TaskStatus.READY, now, why)
        if self.by_middleware:
            return  # it waits for the middleware to start it
        planned_on = self.peers.get(task.planned_on or "")
        if planned_on is not None:  # planned while it waited (eager, critical-path)
            self.planner.count_ready_plan(planned_on, 1)
        rule = self.rules.get(task.name) if self.rules else None
        if rule is not None and rule.noop:
            self.planner.unplan(task, requeue=False)  # planned for its inputs: not needed
            self._noops_due.append(task.name)  # DONE in this pass, never placed
            return
        self.enqueue(task)

    def enqueue(self, task: TaskState) -> None:
        """Make a READY task placeable: in its class heap, and in the heap of the peer that
        holds most of its input bytes. A reader of a file still being broadcast is only
        placeable on peers that already hold it."""
        if task.backoff != -1:
            return  # placeable when its backoff ends (_end_backoffs)
        entry = self.ready.stamp(task)
        spreading = self.planner.spreading_inputs(task)
        task.gated = bool(spreading)
        if task.gated:
            for peer in self.peers.values():
                if all(self.files.holds(peer.name, d) for d in spreading):
                    self.ready.favour(peer.name, entry)
            return
        self.ready.push(task, entry)
        best = self.planner.data_peer(task)
        if best is not None:
            self.ready.favour(best.name, entry)

    def _reported(self, event: TaskReported, now: float, out: list[Instruction]) -> None:
        task = self.tasks.get(event.task)
        if (
            task is None
            or task.status is not TaskStatus.RUNNING
            or task.attempts != event.attempt
            or task.peer != event.peer
            or task.name in self._unrun
        ):
            return  # a report from an attempt we already gave up on (or that voted)
        task.exit_code, task.stderr_tail = event.exit_code, event.stderr_tail
        task.fetch_s, task.run_s = event.fetch_s, event.run_s
        task.bytes_fetched = event.bytes_fetched
        rule = self.rules.get(task.name)
        if rule is not None and rule.abort_exit == event.exit_code:
            self.detach(task)
            self._abort(task, event.exit_code, rule.abort_status, now, out)
            return
        if event.exit_code == 0 and not event.error and task.name in self.quorum:
            self._retire_run(task)
            self._vote(task, Vote(event.peer, event.attempt, event.outputs), now, out)
            return
        if event.exit_code == 0 and not event.error:
            self._succeeded(task, event.peer, event.outputs, now, out)
            return
        if self._copy_takes_over(task, event.error or f"exit code {event.exit_code}", now):
            return
        self._run_failed(task, event, now, out)

    def _succeeded(
        self,
        task: TaskState,
        peer: str,
        outputs: tuple[tuple[str, FileRef], ...],
        now: float,
        out: list[Instruction],
    ) -> None:
        """The run on `peer` exited 0 (or won its quorum): its outputs are the task's."""
        task.outputs = outputs
        for path in self.data[task.name].inputs:  # it read them there: now cached there
            ref = self.files.ref(path)
            if ref is not None:
                self.files.hold(peer, ref.digest)
        for path, ref in outputs:
            self.files.learn(path, ref)
            self.files.hold(peer, ref.digest)
        if self.data[task.name].collect or self.data[task.name].post:
            slots = self.peers[peer]
            slots.running.discard(task.name)
            slots.collecting.add(task.name)
            self._idle.pop(slots.name, None)  # (a quorum's winner had left its slot)
            if len(slots.running) < slots.cpus:
                self.ready.mark_free(slots)  # the slot it ran in is free
            self.move(task, TaskStatus.COLLECTING, now, f"exited 0 on {peer}")
            out.append(Collect(task.name, peer, task.attempts, outputs))
        else:
            self._done(task, now, f"exited 0 on {peer}; its outputs stay there", out)
        self.planner.restart_stalled_readers(task, now, out)
        self.planner.prefetch_for_waiting(task, out)

    def _run_failed(
        self, task: TaskState, event: TaskReported, now: float, out: list[Instruction]
    ) -> None:
        """Its only run exited badly."""
        self.detach(task)
        lost = {
            ref.digest
            for p in self.data[task.name].inputs
            if (ref := self.files.ref(p)) is not None and not self.files.available(ref.digest)
        }
        if lost:
            # It could not get an input that a lost peer took with it: not its fault. It
            # runs again once the producer has made the file again.
            self.planner.remake("a lost peer", now, out, also=task)
            return
        if task.lost_input:
            # Its fetch failed on the lost peer, and the file exists again meanwhile.
            why = f"could not fetch {task.lost_input} from a lost peer; it exists again"
            self.make_ready(task, now, why)
            return
        why = event.error or f"exit code {event.exit_code}"
        self._failed_attempt(task, why, now, out, exit_code=event.exit_code)

    def _abort(
        self, task: TaskState, code: int, status: int, now: float, out: list[Instruction]
    ) -> None:
        """`task` exited with its `abort_on` code: it fails, the runs going on are stopped
        (as a cancel stops them), nothing else starts but the final task, if any."""
        self.abort = (task.name, code, status)
        why = f"exit code {code} aborts the job (abort_on)"
        out.append(Notice(f"task {task.name} exited {code}: the job is aborted"))
        self._fail_for_good(task, why, why, now, out)
        stop = f"the job was aborted by {task.name}"
        for other in self.tasks.values():  # O(tasks), once per job
            if other.name == self.final:
                continue
            if other.status is TaskStatus.RUNNING:
                out.append(StopRun(other.name, other.peer or "", other.attempts, stop))
                self.detach(other)
                self._fail_for_good(other, f"stopped: {stop}", f"stopped: {stop}", now, out)
            elif other.status in (TaskStatus.WAITING, TaskStatus.READY):
                self.planner.unplan(other)  # its heap entries go stale (status check)
                other.script = ""  # a script of its still running: its end is not heard
                self.move(other, TaskStatus.SKIPPED, now, stop)

    def _running_on(self, peer: str, name: str, attempt: int) -> TaskState | None:
        """The task, if its attempt `attempt` is running on `peer`; else None (stale news)."""
        task = self.tasks.get(name)
        if (
            task is None
            or name in self._unrun
            or task.status is not TaskStatus.RUNNING
            or task.attempts != attempt
            or task.peer != peer
        ):
            return None
        return task

    # -- middleware placement (see the theory of operation) ----------------------------------

    def _middleware_news(
        self, event: RunPlaced | TaskReported | AttemptFailed, now: float, out: list[Instruction]
    ) -> None:
        """What the middleware says of one of its runs."""
        task = self.tasks.get(event.task)
        if task is None:
            return
        if task.status is TaskStatus.WAITING:
            self._held_news.setdefault(task.name, []).append(event)
            self.note(task.name, now, f"news of attempt {event.attempt} waits for its parents")
            return
        if task.status is TaskStatus.SKIPPED:
            if isinstance(event, RunPlaced):
                why = f"{task.name} needs a task that failed"
                self.note(task.name, now, f"started on {event.peer} by the middleware: {why}")
                out.append(StopRun(task.name, event.peer, event.attempt, why))
            return
        if not self._middleware_run(task, event.attempt, event.peer, now):
            return  # about an attempt that is over, or a task done or failed for good
        match event:
            case AttemptFailed():
                self.detach(task)
                self._failed_attempt(task, event.reason, now, out)
            case TaskReported():
                self._middleware_reported(task, event, now, out)
            case RunPlaced():
                pass

    def _middleware_run(self, task: TaskState, attempt: int, peer: str, now: float) -> bool:
        """Whether `attempt` is the task's current run: started now if it is a newer attempt
        (news of a run whose start the core never heard of counts as its start)."""
        if task.status is TaskStatus.RUNNING and attempt == task.attempts:
            if peer and peer != task.peer:  # requeued elsewhere by the middleware
                self.detach(task)
                self._run_on(task, peer)
                self.note(task.name, now, f"the middleware runs attempt {attempt} on {peer}")
            return True
        if task.status not in (TaskStatus.READY, TaskStatus.RUNNING) or attempt <= task.attempts:
            return False
        self.detach(task)
        ended = task.attempts
        task.attempts, task.start, task.end = attempt, now, None
        self._run_on(task, peer)
        why = f"started on {peer} by the middleware (attempt {attempt})"
        if task.status is TaskStatus.READY:
            self.move(task, TaskStatus.RUNNING, now, why)
        else:
            self.note(task.name, now, f"{why}; the end of attempt {ended} was never heard")
        return True

    def _run_on(self, task: TaskState, peer: str) -> None:
        task.peer = peer
        slots = self.peers.get(peer)
        if slots is not None:
            slots.running.add(task.name)
            self._idle.pop(peer, None)
            if len(slots.running) >= slots.cpus:
                self.ready.mark_full(peer)

    def _middleware_reported(
        self, task: TaskState, event: TaskReported, now: float, out: list[Instruction]
    ) -> None:
        task.exit_code, task.stderr_tail = event.exit_code, event.stderr_tail
        task.fetch_s, task.run_s = event.fetch_s, event.run_s
        task.bytes_fetched = event.bytes_fetched
        if event.exit_code == 0 and not event.error:
            task.outputs = event.outputs
            for path, ref in event.outputs:  # the middleware brought them to the submit dir
                self.files.learn(path, ref)
                self.files.at_coordinator.add(ref.digest)
            self._done(task, now, f"exited 0 on {task.peer}; its outputs are here", out)
            return
        self.detach(task)
        if event.exit_code == 0:
            story = f"{event.error}; the middleware counts it a success: no retry"
            self._fail_for_good(task, story, event.error, now, out)
            return
        self._failed_attempt(task, event.error or f"exit code {event.exit_code}", now, out)

    def _release_held_news(self, now: float, out: list[Instruction]) -> None:
        """Apply the held news of tasks no longer WAITING, in the order it came."""
        while due := [n for n in self._held_news if self.tasks[n].status is not TaskStatus.WAITING]:
            for name in due:
                for news in self._held_news.pop(name):
                    self._middleware_news(news, now, out)

    def _middleware_lost_peer(
        self, peer: PeerSlots, reason: str, now: float, out: list[Instruction]
    ) -> None:
        runs = sorted(peer.running)
        out.append(
            Notice(
                f"peer {peer.name} lost ({reason})"
                + (f": the middleware says what becomes of {', '.join(runs)}" if runs else "")
            )
        )
        for name in runs:
            self.note(name, now, f"peer {peer.name} lost ({reason}); the middleware requeues it")
        self.files.drop_peer(peer.name)

    def _check_listed(self, event: PeerRunning, now: float, out: list[Instruction]) -> None:
        peer = self.peers.get(event.peer)
        if peer is None:
            return
        for name in sorted(peer.running):
            task = self.tasks[name]
            if task.peer != peer.name:  # a copy of it runs there
                self._check_copy_listed(task, peer.name, event, now)
                continue
            if not task.acked:
                continue  # not started yet: the acknowledgement deadline watches it
            if (name, task.attempts) in event.running:
                task.unlisted = 0
                continue
            task.unlisted += 1
            if task.unlisted >= UNLISTED_LIMIT:
                why = f"peer {event.peer} is not running it"
                if not self._copy_takes_over(task, why, now):
                    self.detach(task)
                    self._failed_attempt(task, why, now, out)

    def _expire_acks(self, now: float, out: list[Instruction]) -> None:
        while self._ack_due and self._ack_due[0][0] <= now:
            _, name, attempt = heapq.heappop(self._ack_due)
            task = self.tasks[name]
            copy = self._copy_of(name, attempt)
            if copy is not None and not copy.acked:
                why = f"peer {copy.peer} never acknowledged the run of {name}"
                self._end_copy(task, copy, why, now)
            elif (
                task.status is TaskStatus.RUNNING
                and task.attempts == attempt
                and not task.acked
                and name not in self._unrun
            ):
                why = f"peer {task.peer} never acknowledged the run of {name}"
                if not self._copy_takes_over(task, why, now):
                    self.detach(task)
                    self._failed_attempt(task, why, now, out)

    def _done(self, task: TaskState, now: float, why: str, out: list[Instruction]) -> None:
        self.detach(task)
        task.end = now
        task.error = ""
        task.pre_passed = False  # (a noop's pre passed, and it is done without a placement)
        self.move(task, TaskStatus.DONE, now, why)
        out.append(TaskDone(task.name, task.peer, task.attempts, task.outputs))
        for name in self.successors.get(task.name, ()):
            succ = self.tasks[name]
            if succ.status is not TaskStatus.WAITING:
                continue  # it ran already: this was a remake for another reader
            succ.deps_left -= 1
            if succ.deps_left == 0:
                self.make_ready(succ, now, "all its inputs exist")

    def backoff(self, failures: int) -> float:
        """Seconds a task waits before its retry after `failures` failed attempts."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** max(0, failures - 1))

    def _failed_attempt(
        self,
        task: TaskState,
        why: str,
        now: float,
        out: list[Instruction],
        exit_code: int | None = None,
    ) -> None:
        """`exit_code`: what the command exited with (None: it did not run to an end)."""
        if (
            self.data[task.name].post
            and not self.by_middleware
            and task.status in (TaskStatus.RUNNING, TaskStatus.COLLECTING)
        ):
            task.error = why  # the post decides; it fails with this if the post does not say 0
            self._start_post(task, now, why, out)
            return
        task.failures += 1
        task.error = why
        if task.peer is not None and task.peer not in task.failed_on:
            task.failed_on += (task.peer,)
        rule = self.rules.get(task.name)
        if exit_code is not None and rule is not None and rule.unless_exit == exit_code:
            story = f"{why}; retry_unless_exit {exit_code}: no retry"
            self._fail_for_good(task, story, why, now, out)
            return
        if self.by_middleware:
            # Attempt n that failed was the n-th: news of an earlier one may never have come.
            task.failures = max(task.failures, task.attempts)
            if task.failures <= task.retries:
                retry = f"{why}; the middleware retries it ({task.failures}/{task.retries})"
                self.move(task, TaskStatus.READY, now, retry)
                return
        elif task.failures <= task.retries and (
            self.data[task.name].pre or (rule is not None and rule.noop)
        ):
            # No backoff: its pre script is what it waits for before each attempt (DAGMan);
            # a noop (its post failed) has nothing to place: done again once ready.
            retry = f"{why}; retry {task.failures}/{task.retries}"
            task.deps_left = self.undone_preds(task.name)
            if task.deps_left and task.status is TaskStatus.WAITING:  # its pre failed
                self.note(task.name, now, f"{retry}: its pre runs again once its inputs are")
            elif task.deps_left:  # an input it needs is being made again: the pre runs after
                self.move(task, TaskStatus.WAITING, now, retry)
            else:
                self.make_ready(task, now, retry)
            return
        elif task.failures <= task.retries:
            wait = self.backoff(task.failures)
            self.move(
                task,
                TaskStatus.READY,
                now,
                f"{why}; retry {task.failures}/{task.retries} in {wait:g} s",
            )
            if self.peers and all(name in task.failed_on for name in self.peers):
                # Only peers it already failed on are held (the others went back at
                # scale-in): ask for a fresh one while the retry waits out its backoff.
                out.append(Recruit(1, f"a fresh peer for the retry of {task.name}"))
            if wait > 0:
                self.ready.defer(task, now + wait)
            else:
                self.enqueue(task)
            return
        self._fail_for_good(task, f"{why}; no retries left", why, now, out)

    def _fail_for_good(
        self, task: TaskState, story: str, why: str, now: float, out: list[Instruction]
    ) -> None:
        task.end = now
        task.error = why
        self.move(task, TaskStatus.FAILED, now, story)
        out.append(TaskFailed(task.name, why, task.attempts))
        self._skip_descendants(task, now)

    # -- pre and post scripts (DAGMan SCRIPT PRE/POST; see the theory of operation) --------

    def _start_pre(self, task: TaskState, now: float, why: str) -> None:
        """Its pre runs before it may be placed: it WAITs for it, as for one more input."""
        task.script = "pre"
        why = f"{why}; its pre script runs first"
        if task.status is TaskStatus.WAITING:
            self.note(task.name, now, why)
        else:
            self.move(task, TaskStatus.WAITING, now, why)
        task.deps_left = self.undone_preds(task.name)
        self._scripts_due.append(
            RunScript(task.name, "pre", task.attempts + 1, task.failures, -1, -1)
        )

    def _start_post(self, task: TaskState, now: float, why: str, out: list[Instruction]) -> None:
        """Its attempt is over (outputs in the submit directory, or failed): its post decides."""
        task.script = "post"
        self.move(task, TaskStatus.WAITING, now, f"{why}; its post script decides")
        task.deps_left = self.undone_preds(task.name)
        returned = -1 if task.exit_code is None else task.exit_code
        pre = -1 if task.pre_return is None else task.pre_return
        out.append(RunScript(task.name, "post", task.attempts, task.failures, returned, pre))

    def _script_ended(self, event: ScriptEnded, now: float, out: list[Instruction]) -> None:
        task = self.tasks.get(event.task)
        if task is None or not task.script or task.script != event.script:
            return
        if event.attempt != task.attempts + (1 if task.script == "pre" else 0):
            return  # about a script of an attempt that is over
        task.script = ""
        task.deps_left -= 1
        code = event.exit_code
        if event.script == "post" or code != 0 or event.error:
            self.planner.unplan(task, requeue=False)  # it ends, or waits for its next pre
        said = f"{event.script} script " + (f"exited {code}" if code is not None else "failed")
        if event.script == "post":
            task.post_return = code
            if code == 0 and not event.error:
                command = f" (the command failed: {task.error})" if task.error else ""
                self._learn_outputs(task, event.outputs)
                self._done(task, now, f"{said}{command}", out)
            else:
                why = event.error or said
                if code is not None and task.error:
                    why = f"{why}; the command: {task.error}"
                # the post's exit is the attempt's, as DAGMan's RETRY ... UNLESS-EXIT sees it
                self._failed_attempt(task, why, now, out, exit_code=code)
            return
        task.pre_return = code
        skip = self.data[task.name].pre_skip
        if code is not None and code == skip and not event.error:
            self._learn_outputs(task, event.outputs)
            task.peer = None  # it ran nowhere
            self._done(task, now, f"{said} (pre_skip): done without running", out)
        elif code == 0 and not event.error:
            self.add_sources(event.sources)
            task.pre_passed = True
            if task.deps_left == 0:
                self.make_ready(task, now, said)
            else:
                self.note(task.name, now, f"{said}; an input it needs is being made again")
        else:
            task.attempts += 1  # the attempt it was for ends here, without a run
            task.peer, task.exit_code = None, None
            self._failed_attempt(task, event.error or said, now, out)

    def _learn_outputs(self, task: TaskState, outputs: tuple[tuple[str, FileRef], ...]) -> None:
        """A script's word on the outputs: as they are in the submit directory now."""
        task.outputs = outputs
        for path, ref in outputs:
            self.files.learn(path, ref)
            self.files.at_coordinator.add(ref.digest)

    def _end_backoffs(self, now: float) -> None:
        for task in self.ready.due(now):
            self.note(task.name, now, "backoff over: may be placed again")
            self.enqueue(task)

    def _skip_descendants(self, failed: TaskState, now: float) -> None:
        stack = list(self.successors.get(failed.name, ()))
        while stack:
            task = self.tasks[stack.pop()]
            if task.status in (TaskStatus.WAITING, TaskStatus.READY):
                # A READY entry left in its heap is dropped when popped (status check).
                self.planner.unplan(task)
                self.move(task, TaskStatus.SKIPPED, now, f"needs {failed.name}, which failed")
                stack.extend(self.successors.get(task.name, ()))

    def detach(self, task: TaskState) -> None:
        if task.peer is not None:
            self._free_slot(task.peer, task.name)

    def _free_slot(self, peer_name: str, task_name: str) -> None:
        peer = self.peers.get(peer_name)
        if peer is not None:
            peer.running.discard(task_name)
            peer.collecting.discard(task_name)
            if len(peer.running) < peer.cpus:
                self.ready.mark_free(peer)
            if not peer.running and not peer.collecting:
                self._idle[peer.name] = None

    def _join(self, event: PeerJoined) -> None:
        peer = self.peers[event.peer] = PeerSlots(event.peer, max(1, event.cpus), event.attrs)
        self.ready.add_peer(event.peer)
        self.planner.add_peer(peer)
        self._idle[event.peer] = None
        if event.cached:
            self.planner.peer_joined(peer, event.cached)

    def _suspension(self, event: PeerSuspended, now: float, out: list[Instruction]) -> None:
        """A held peer suspended its runs (its owner is back) or resumed them: a note in
        their stories, nothing else. They stay RUNNING and the peer held: its heartbeats
        still list them, and an owner who stays vacates the peer (`preempted`: PeerLost)."""
        peer = self.peers.get(event.peer)
        if peer is None:
            return
        word = SUSPENDED_NOTE if event.suspended else RESUMED_NOTE
        for name in sorted(peer.running):
            self.note(name, now, f"{word}{event.peer}: {event.reason}")
        runs = ", ".join(sorted(peer.running)) or "no run"
        what = "suspended" if event.suspended else "resumed"
        out.append(Notice(f"peer {event.peer} {what} {runs}: {event.reason}"))

    def _lose_peer(self, name: str, reason: str, now: float, out: list[Instruction]) -> None:
        peer = self.peers.pop(name, None)
        self._idle.pop(name, None)
        self.ready.drop_peer(name)
        self.planner.drop_peer(name)
        if peer is None:
            return
        if self.by_middleware:
            self._middleware_lost_peer(peer, reason, now, out)
            return
        lost_runs = sorted(peer.running | peer.collecting)
        out.append(
            Notice(
                f"peer {name} lost ({reason})"
                + (f": {', '.join(lost_runs)} go back to the queue" if lost_runs else "")
            )
        )
        for task_name in list(peer.planned):
            self.planner.unplan(self.tasks[task_name])
        for task_name in sorted(peer.running | peer.collecting):
            task = self.tasks[task_name]
            copy = self._copy_on(task_name, name)
            if copy is not None:  # the run it held was a copy: the task's others go on
                self._end_copy(task, copy, f"peer {name} lost ({reason})", now)
                continue
            if self._copy_takes_over(task, f"peer {name} lost ({reason})", now):
                continue
            if self.abort is not None and task_name != self.final:
                why = f"its outputs went with peer {name} ({reason}) after the job was aborted"
                self._fail_for_good(task, why, why, now, out)  # nothing new starts
                continue
            why = f"peer {name} lost ({reason}): rescheduled"
            task.deps_left = self.undone_preds(task_name)
            if task.deps_left:  # a producer is being made again: wait for its file
                self.move(task, TaskStatus.WAITING, now, why)
            else:
                self.make_ready(task, now, why)
        self.planner.peer_lost(name, now, out)

    # -- speculative copies (see the theory of operation; copies.py) -----------------------

    def _copy_of(self, name: str, attempt: int) -> Copy | None:
        for copy in self.copies.get(name, ()):
            if copy.attempt == attempt:
                return copy
        return None

    def _copy_on(self, name: str, peer: str) -> Copy | None:
        for copy in self.copies.get(name, ()):
            if copy.peer == peer:
                return copy
        return None

    def _copy_news(
        self, event: TaskReported | AttemptFailed | RunStarted, now: float, out: list[Instruction]
    ) -> bool:
        """News of a copy (not of the run the task's record holds). True when it only
        concerned that copy; False when the core should go on as for the task's own run
        (a copy that exited 0 won: it has become the task's run)."""
        copy = self._copy_of(event.task, event.attempt)
        if copy is None or copy.peer != event.peer:
            return False
        task = self.tasks[event.task]
        match event:
            case RunStarted():
                if not copy.acked:
                    copy.acked = True
                    self.note(task.name, now, f"{copy.peer} acknowledged the copy")
                return True
            case AttemptFailed():
                self._end_copy(task, copy, event.reason, now)
                return True
            case TaskReported():
                rule = self.rules.get(task.name)
                aborts = rule is not None and rule.abort_exit == event.exit_code
                if event.exit_code == 0 and not event.error and task.name in self.quorum:
                    self._retire_copy(task, copy)
                    self._vote(task, Vote(copy.peer, copy.attempt, event.outputs), now, out)
                    return True
                if (event.exit_code == 0 and not event.error) or aborts:
                    self._swap(task, copy)
                    self.note(task.name, now, f"the copy on {copy.peer} ended first: it wins")
                    return False
                self._end_copy(task, copy, event.error or f"exit code {event.exit_code}", now)
                return True
        return False  # pragma: no cover (the three kinds above)

    def _swap(self, task: TaskState, copy: Copy) -> None:
        """`copy` becomes the task's run, and the task's run one of its copies."""
        assert task.peer is not None and task.start is not None
        fields = (task.peer, task.attempts, task.start, task.acked, task.unlisted)
        task.peer, task.attempts, task.start = copy.peer, copy.attempt, copy.start
        task.acked, task.unlisted = copy.acked, copy.unlisted
        copy.peer, copy.attempt, copy.start, copy.acked, copy.unlisted = fields

    def _end_copy(self, task: TaskState, copy: Copy, why: str, now: float) -> None:
        """One copy ended badly (failed, refused, lost): the task's other runs go on."""
        copies = self.copies[task.name]
        copies.remove(copy)
        if not copies:
            del self.copies[task.name]
        self._free_slot(copy.peer, task.name)
        if copy.peer not in task.failed_on:
            task.failed_on += (copy.peer,)
        self.note(
            task.name,
            now,
            f"its copy on {copy.peer} (attempt {copy.attempt}) ended: {why}; "
            f"its run on {task.peer} goes on, no retry used",
        )

    def _copy_takes_over(self, task: TaskState, why: str, now: float) -> bool:
        """The task's run ended badly while a copy lives: the copy becomes its run, and no
        retry is used (the task fails an attempt only when its last copy does)."""
        copies = self.copies.get(task.name)
        if not copies or task.status is not TaskStatus.RUNNING:
            return False
        acked = [c for c in copies if c.acked]
        copy = (acked or copies)[0]
        ended = f"{task.peer} (attempt {task.attempts})"
        self._swap(task, copy)
        self._end_copy(task, copy, why, now)  # (it holds the ended run now)
        self.note(task.name, now, f"its run on {ended} ended: its copy on {task.peer} goes on")
        return True

    def _check_copy_listed(
        self, task: TaskState, peer: str, event: PeerRunning, now: float
    ) -> None:
        copy = self._copy_on(task.name, peer)
        if copy is None or not copy.acked:
            return  # not started yet: the acknowledgement deadline watches it
        if (task.name, copy.attempt) in event.running:
            copy.unlisted = 0
            return
        copy.unlisted += 1
        if copy.unlisted >= UNLISTED_LIMIT:
            self._end_copy(task, copy, f"peer {peer} is not running it", now)

    def _left_running(self, task: TaskState, to: TaskStatus, now: float) -> None:
        """A task leaves RUNNING (from `move`): its run time counts for its siblings if it
        exited 0, and its copies are stopped: the first to end decided (a success is only
        collected from the winner; a task stopped or failed for good stops them all)."""
        self._running.pop(task.name, None)
        self._unrun.pop(task.name, None)
        self._quorum_due.pop(task.name, None)
        if to is TaskStatus.FAILED and task.name in self.ballots:
            self._record_ballot(task.name, self.ballots[task.name], "")
        succeeded = to in (TaskStatus.COLLECTING, TaskStatus.DONE)
        if succeeded and task.start is not None and self._speculating:
            self.runtimes.add((task.require, task.category), now - task.start)
            self._rescan_soon()  # a new median
        copies = self.copies.pop(task.name, None)
        if not copies:
            return
        reason = (
            f"its run on {task.peer} (attempt {task.attempts}) finished first"
            if succeeded
            else f"the task is no longer running ({to.value})"
        )
        for copy in copies:
            self._free_slot(copy.peer, task.name)
            self._stops_due.append(StopRun(task.name, copy.peer, copy.attempt, reason))
            stopped = f"its copy on {copy.peer} (attempt {copy.attempt}) stopped: {reason}"
            self.note(task.name, now, stopped)

    def _speculate(self, now: float, out: list[Instruction]) -> None:
        """Free slots with nothing ready take copies of stragglers (copies.py). The running
        tasks are scanned oldest first, only when a straggler may have appeared since the
        last scan (`_speculation_due`: the earliest one could, or a run began or ended), and
        at most once per `RESCAN_S` of the job's time: at a big job's tail, where runs end
        one after the other, not once per event."""
        if self.ready.has_ready() or not self.ready.free or now < self._speculation_due:
            return
        settings = self.speculation
        self._speculation_due = float("inf")
        self._speculation_scanned = now
        for name in self._running:
            task = self.tasks[name]
            if name in self.copies or task.start is None or name in self.quorum:
                continue
            median = self.runtimes.median((task.require, task.category), settings.min_siblings)
            if median is None:
                continue
            threshold = settings.threshold(median)
            if now - task.start < threshold:
                self._speculation_due = min(self._speculation_due, task.start + threshold)
                continue
            peer = self._peer_for_copy(task)
            if peer is None:
                self._rescan_soon()  # a straggler waits for a peer: scan again
                continue
            why = (
                f"a speculative copy: running for {now - task.start:.0f} s, over "
                f"{settings.factor:g} x the median {median:.1f} s of its finished siblings, "
                f"while {peer.name} had nothing ready"
            )
            self._start_copy(task, peer, why, now, out)

    def _rescan_soon(self) -> None:
        """Scan the running tasks again, but not sooner than `RESCAN_S` after the last scan
        (a straggler's threshold is `min_runtime_s` at least: a fraction of it is no delay)."""
        gap = min(RESCAN_S, self.speculation.min_runtime_s / 10)
        self._speculation_due = min(self._speculation_due, self._speculation_scanned + gap)

    def _peer_for_copy(self, task: TaskState) -> PeerSlots | None:
        """A peer with a free slot that can run `task`, runs no run of it, and has not
        seen it fail (the free peers are few when nothing is ready: this is no scan of all)."""
        for name in self.ready.free:
            peer = self.peers[name]
            if (
                name != task.peer
                and task.name not in peer.running
                and name not in task.failed_on
                and len(peer.running) < peer.cpus
                and self.ready.can_run(peer, task.require)
            ):
                return peer
        return None

    def _start_copy(
        self,
        task: TaskState,
        peer: PeerSlots,
        why: str,
        now: float,
        out: list[Instruction],
        own_run: bool = False,
    ) -> None:
        """A further run of a RUNNING task on `peer`: a copy, or (`own_run`: a task under
        quorum whose runs all voted) the task's run."""
        attempt = max(task.attempts, self._top_attempt.get(task.name, 0)) + 1
        self._top_attempt[task.name] = attempt
        if own_run:
            task.peer, task.attempts, task.start = peer.name, attempt, now
            task.acked, task.unlisted = False, 0
        else:
            self.copies.setdefault(task.name, []).append(Copy(peer.name, attempt, now, why))
        self.copies_made.setdefault(task.name, []).append((peer.name, attempt, why))
        peer.running.add(task.name)
        self._idle.pop(peer.name, None)
        if len(peer.running) >= peer.cpus:
            self.ready.mark_full(peer.name)
        if self.ack_timeout_s is not None:
            heapq.heappush(self._ack_due, (now + self.ack_timeout_s, task.name, attempt))
        self.note(task.name, now, f"a further run on {peer.name} (attempt {attempt}): {why}")
        out.append(Notice(f"task {task.name}: a further run on {peer.name} ({why})", True))
        out.append(Dispatch(task.name, peer.name, attempt))

    # -- quorum (see the theory of operation; copies.py) -------------------------------------

    def _retire_copy(self, task: TaskState, copy: Copy) -> None:
        """A copy under quorum exited 0: it voted, its slot is free (its peer did nothing
        wrong: it is not among `failed_on`)."""
        copies = self.copies[task.name]
        copies.remove(copy)
        if not copies:
            del self.copies[task.name]
        self._free_slot(copy.peer, task.name)

    def _retire_run(self, task: TaskState) -> None:
        """The task's own run under quorum exited 0: a live copy becomes its run, or none is
        left (`_unrun`) until a further run starts."""
        self.detach(task)
        copies = self.copies.get(task.name)
        if copies:
            copy = copies[0]
            self._swap(task, copy)
            copies.remove(copy)  # (it holds the run that voted now)
            if not copies:
                del self.copies[task.name]
        else:
            self._unrun[task.name] = None
            task.acked = True  # no run of its awaits an acknowledgement

    def _vote(self, task: TaskState, vote: Vote, now: float, out: list[Instruction]) -> None:
        ballot = self.ballots[task.name]
        counted = ballot.cast(vote)
        said = f"run {vote.attempt} on {vote.peer} exited 0: {vote.digest()}"
        self.note(task.name, now, said if counted else f"{said} (its peer voted already)")
        winners = ballot.winners()
        if not winners:
            self._quorum_due[task.name] = None  # more runs, or no majority can form
            return
        held = [v for v in winners if v.peer in self.peers]
        if not held:  # the majority's outputs went with lost peers: vote again without them
            ballot.votes = [v for v in ballot.votes if v.peer in self.peers]
            self.note(task.name, now, "the peers of the majority are lost: their votes go")
            self._quorum_due[task.name] = None
            return
        winner = held[-1]
        for peer in ballot.outvoted():
            self.outvoted[peer] += 1
            if self.outvoted[peer] >= OUTVOTED_LIMIT and peer not in self.distrusted:
                self.distrusted[peer] = None
                self._distrusted_held.append(peer)
                out.append(
                    Notice(
                        f"peer {peer} was outvoted {self.outvoted[peer]} times: "
                        "it takes no new run of this job's and is released once idle"
                    )
                )
        agreed = f"{len(winners)} of {len(ballot.votes)} runs agree ({ballot.quorum} wanted)"
        self._record_ballot(task.name, ballot, winner.digest())
        if task.name not in self._unrun:  # a run still going: the majority is in already
            reason = f"a majority agreed: {agreed}"
            out.append(StopRun(task.name, task.peer or "", task.attempts, reason))
            self.detach(task)
        self._unrun.pop(task.name, None)
        task.peer, task.attempts = winner.peer, winner.attempt
        self.note(task.name, now, f"quorum: {agreed}; the outputs of {winner.peer} are kept")
        self._succeeded(task, winner.peer, winner.outputs, now, out)

    def _record_ballot(self, name: str, ballot: Ballot, accepted: str) -> None:
        """The votes, for the report (the ballot itself ends with the task's run)."""
        self.quorum_votes[name] = {
            "quorum": ballot.quorum,
            "votes": [
                {"peer": v.peer, "attempt": v.attempt, "digests": dict(v.key)} for v in ballot.votes
            ],
            "accepted": accepted,
        }
        del self.ballots[name]

    def _top_up(self, now: float, out: list[Instruction]) -> None:
        """Tasks under quorum that want more runs get them on free peers that did not vote,
        before any ready task is placed (they are further along); a task whose votes can
        form no majority any more fails, naming each peer and its digests."""
        for name in list(self._quorum_due):
            task = self.tasks[name]
            ballot = self.ballots.get(name)
            if task.status is not TaskStatus.RUNNING or ballot is None:
                del self._quorum_due[name]
                continue
            live = len(self.copies.get(name, ())) + (0 if name in self._unrun else 1)
            wanted = ballot.runs_wanted(live)
            while wanted > 0:
                peer = self._peer_for_vote(task, ballot)
                if peer is None:
                    break
                n = len(ballot.votes) + live + 1
                why = f"quorum {ballot.quorum}: run {n} on a distinct peer"
                self._start_copy(task, peer, why, now, out, own_run=name in self._unrun)
                self._unrun.pop(name, None)
                live += 1
                wanted -= 1
            if wanted == 0:
                del self._quorum_due[name]
            elif wanted < 0 or (live == 0 and not self._could_vote(task, ballot)):
                del self._quorum_due[name]
                self._no_majority(task, ballot, now, out, wanted < 0)
            elif live == 0:
                out.append(Recruit(1, f"a peer to vote on {name}"))

    def _peer_for_vote(self, task: TaskState, ballot: Ballot) -> PeerSlots | None:
        voters = ballot.voters()
        for name in self.ready.free:
            peer = self.peers[name]
            if (
                name not in voters
                and name not in self.distrusted
                and name not in task.failed_on
                and task.name not in peer.running
                and task.peer != name
                and len(peer.running) < peer.cpus
                and self.ready.can_run(peer, task.require)
            ):
                return peer
        return None

    def _could_vote(self, task: TaskState, ballot: Ballot) -> bool:
        """Whether a held peer (busy or not) could still run a vote: else none will come.
        (O(peers), only while a task under quorum waits with no run at all.)"""
        voters = ballot.voters()
        return any(
            name not in voters
            and name not in self.distrusted
            and name not in task.failed_on
            and self.ready.can_run(peer, task.require)
            for name, peer in self.peers.items()
        )

    def _no_majority(
        self, task: TaskState, ballot: Ballot, now: float, out: list[Instruction], bound: bool
    ) -> None:
        why = (
            f"no majority of {ballot.quorum} agreeing runs "
            + ("can form" if bound else "and no other peer to run it")
            + f": {ballot.describe()}"
        )
        self._record_ballot(task.name, ballot, "")
        if task.name not in self._unrun:  # its own run still goes (copies stop as it fails)
            out.append(StopRun(task.name, task.peer or "", task.attempts, why))
            self.detach(task)
        self._unrun.pop(task.name, None)
        self._fail_for_good(task, why, why, now, out)

    # -- decisions ----------------------------------------------------------------------

    def _schedule(self, now: float, out: list[Instruction]) -> None:
        # Only peers with a free slot are visited, and only while there is work for them:
        # an event costs O(classes), not O(peers), with thousands of peers and tasks.
        # First what is planned for a peer or whose data it holds (`own_work`: only free
        # peers that have some), then the best task any peer can run, then (slots that
        # would idle) planned work of other peers. The free peers are not copied per
        # event: a peer that fills up leaves them after the pass (`_filled`).
        own_work = self.ready.own_work
        for name in list(own_work) if own_work else ():
            peer = self.peers[name]
            self._fill(peer, self._take_own, now, out)
            if not peer.planned_ready and not self.ready.has_affine(name):
                own_work.pop(name, None)
        if self.ready.has_ready():
            for name in self.ready.free:
                if not self.ready.has_ready():
                    break
                self._fill(self.peers[name], self.ready.pop_best, now, out)
        if self.planner.planned and not self.ready.has_ready():
            for name in self.ready.free:
                if not self.planner.planned:
                    break
                self._fill(self.peers[name], self._steal, now, out)
        for name in self._filled:
            peer = self.peers[name]
            if len(peer.running) >= peer.cpus:
                self.ready.mark_full(name)
        self._filled.clear()

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
        for name in peer.planned if peer.planned_ready else ():
            task = self.tasks[name]
            if task.status is TaskStatus.READY and self._may_start_on(peer, task):
                self.planner.unplan(task, requeue=False)
                return task
        return self.ready.pop_affine(peer, self.planner.holds_broadcast_inputs)

    def _steal(self, peer: PeerSlots) -> TaskState | None:
        """An idle slot takes the last task planned on the most loaded other peer."""
        if not self.planner.planned:
            return None
        for victim in self.planner.victims(peer.name):
            for name in reversed(victim.planned):
                task = self.tasks[name]
                if (
                    task.status is TaskStatus.READY
                    and self._may_start_on(peer, task)
                    and self.ready.can_run(peer, task.require)
                ):
                    self.planner.unplan(task)
                    self.note(name, 0.0, f"taken over by idle {peer.name}")
                    return self.ready.pop_best(peer)
        return None

    def _may_start_on(self, peer: PeerSlots, task: TaskState) -> bool:
        """Whether a task waiting for a broadcast file (gated) may start there now."""
        return not task.gated or self.planner.holds_broadcast_inputs(peer, task)

    def _place(self, task: TaskState, peer: PeerSlots, now: float, out: list[Instruction]) -> None:
        target = peer
        if peer.name in task.failed_on or (
            self._multirun and (peer.name in self.distrusted or self._voted(task, peer))
        ):
            target = self._fresh_peer_for(task) or peer
        task.attempts += 1
        if self._multirun:  # a copy may have taken a later attempt number
            task.attempts = max(task.attempts, self._top_attempt.get(task.name, 0) + 1)
        task.queued = -1  # its other heap entries are stale from now on
        task.peer = target.name
        task.start = now
        task.end = None
        task.acked, task.unlisted = False, 0
        task.lost_input = ""
        task.exit_code = None  # until this attempt reports (a post's BGRID_RETURN: -1)
        task.pre_passed = False  # the next attempt runs its pre again
        if self.ack_timeout_s is not None:
            heapq.heappush(self._ack_due, (now + self.ack_timeout_s, task.name, task.attempts))
        target.running.add(task.name)
        self._idle.pop(target.name, None)
        if len(target.running) >= target.cpus:
            self._filled.append(target.name)  # leaves the free peers after this pass
        self.move(
            task, TaskStatus.RUNNING, now, f"placed on {target.name} (attempt {task.attempts})"
        )
        out.append(Dispatch(task.name, target.name, task.attempts))
        if not self._multirun:
            return
        self._rescan_soon()  # a new run: the next straggler may come sooner
        if task.name in self.quorum:  # its other runs start as slots allow (`_top_up`)
            self.ballots.setdefault(task.name, Ballot(self.quorum[task.name]))
            self._quorum_due[task.name] = None

    def _fresh_peer_for(self, task: TaskState) -> PeerSlots | None:
        """A peer with a free slot that can run `task` and has not seen it fail."""
        for peer in self.peers.values():
            if (
                len(peer.running) < peer.cpus
                and peer.name not in task.failed_on
                and peer.name not in self.distrusted
                and not self._voted(task, peer)
                and self.ready.can_run(peer, task.require)
            ):
                return peer
        return None

    def _voted(self, task: TaskState, peer: PeerSlots) -> bool:
        ballot = self.ballots.get(task.name)
        return ballot is not None and peer.name in ballot.voters()

    def _scale_in(self, out: list[Instruction]) -> None:
        if self._distrusted_held:  # few: outvoted peers still held
            for name in self._distrusted_held:
                if name in self._idle and not self.planner.still_serving(name):
                    self._release(name, out)
            self._distrusted_held = [n for n in self._distrusted_held if n in self.peers]
        if self.counts[TaskStatus.WAITING] + self.counts[TaskStatus.READY]:
            return
        # Only idle peers are looked at (an index, not a scan of the free ones), and the
        # question whether one still serves a file is answered by counts kept as tasks
        # start and stop: each event costs O(idle peers still serving), never O(peers x
        # running tasks). With speculation on, as many idle peers as running tasks without
        # a copy are kept for their copies (a straggler shows only at the job's tail, when
        # peers go idle: released at once, none would be left to run its copy).
        keep = len(self._running) - len(self.copies) if self._speculating else 0
        if self.ballots:
            return  # a quorum may want further runs: on peers that did not vote yet
        for name in list(self._idle):
            if self.planner.still_serving(name):
                continue
            if keep > 0:
                keep -= 1
                continue
            self._release(name, out)

    def _release(self, name: str, out: list[Instruction]) -> None:
        """An idle peer goes back to its owner's pool."""
        del self.peers[name]
        self.files.drop_peer(name)
        del self._idle[name]
        self.ready.drop_peer(name)
        self.planner.drop_peer(name)
        out.append(Release(name))

    def _finish(
        self,
        out: list[Instruction],
        status: str,
        reason: str,
        exit_status: int | None = None,
        aborted_by: str = "",
    ) -> None:
        if self.by_middleware:  # the job ends before these runs do (cancelled)
            for task in self.tasks.values():
                if task.status is TaskStatus.RUNNING:
                    out.append(StopRun(task.name, task.peer or "", task.attempts, reason))
        for name in list(self.peers):
            out.append(Release(name))
        self.peers.clear()
        self._idle.clear()
        self.ready.drop_all_peers()
        self.planner.drop_all_peers()
        self.finished = Finished(status, reason, exit_status, aborted_by)
        out.append(self.finished)

    # -- questions ------------------------------------------------------------------------

    def hold_sources(self, paths: Iterable[str]) -> None:
        """Source inputs hashed while the job runs (the shell's staging hashes big new files
        in the background): until `SourcesHashed` names one, every task reading it waits,
        as for a task it needs (one more in `deps_left`), and tasks reading none of them run.
        Called before any task is placed."""
        held = set(paths) - self._unhashed.keys()
        if not held:
            return
        assert not self.counts[TaskStatus.RUNNING], "sources are held before the first run"
        for path in held:
            self._unhashed[path] = []
        for name, data in self.data.items():
            reads = [path for path in data.inputs if path in held]
            task = self.tasks[name]
            if not reads or task.status is TaskStatus.DONE:  # resumed: it needs them no more
                continue
            for path in reads:
                self._unhashed[path].append(name)
            task.deps_left += len(reads)
            if task.status is TaskStatus.READY:
                self.move(task, TaskStatus.WAITING, 0.0, "an input of its is being hashed")

    def _sources_hashed(self, refs: Mapping[str, FileRef], now: float) -> None:
        self.add_sources(refs)
        for path in refs:
            for name in self._unhashed.pop(path, ()):
                task = self.tasks[name]
                if task.status is TaskStatus.WAITING:
                    task.deps_left -= 1
                    if task.deps_left == 0:
                        self.make_ready(task, now, "its inputs are hashed")

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
        return self.ready.unplaceable(self.peers.values())

    def wanted_peers(self) -> int:
        """How many more single-slot peers the ready tasks could use right now (not those
        that a category's cap holds back)."""
        free = sum(p.cpus - len(p.running) for p in self.peers.values())
        startable = self.counts[TaskStatus.READY] - self.ready.backing_off - self.ready.held_back()
        return max(0, startable - free)

    def next_wakeup(self) -> float | None:
        """When the next retry backoff or run acknowledgement deadline ends, or a straggler
        may show (feed a `Tick` then); None if nothing waits."""
        if self.finished is not None:
            return None
        scan = self._speculation_due  # (only when a scan could run: else a Tick is moot)
        may_scan = self._speculating and self.ready.free and not self.ready.has_ready()
        straggler = scan if may_scan and self._speculation_scanned < scan < float("inf") else None
        due = [
            t
            for t in (
                self.ready.next_due(),
                self._ack_due[0][0] if self._ack_due else None,
                straggler,
            )
            if t is not None
        ]
        return min(due) if due else None

    def pending(self) -> int:
        """Tasks not yet done, failed or skipped."""
        return len(self.tasks) - sum(self.counts[s] for s in FINAL)

    def story(self, task: str) -> list[tuple[float, str]]:
        steps = self._stories.get(task, [])
        return [(float(when), str(why)) for when, why in zip(steps[::2], steps[1::2], strict=True)]

    def validate_state(self) -> None:
        """Invariants; tests call this after every scenario."""
        tally: dict[TaskStatus, int] = defaultdict(int)
        for task in self.tasks.values():
            tally[task.status] += 1
            if self.by_middleware:
                assert task.status is not TaskStatus.COLLECTING, f"{task.name} is collected"
                assert task.queued == -1 and task.backoff == -1, f"{task.name} is queued"
                assert task.planned_on is None, f"{task.name} is planned"
                if task.name in self._held_news:
                    assert task.status is TaskStatus.WAITING, f"{task.name}: news held"
            elif task.name in self._unrun:
                assert task.status is TaskStatus.RUNNING and task.name in self.quorum, task.name
                assert (
                    task.name not in self.peers.get(task.peer or "", PeerSlots("", 1, {})).running
                )
            elif task.status in (TaskStatus.RUNNING, TaskStatus.COLLECTING) and not self.finished:
                peer = self.peers.get(task.peer or "")
                assert peer is not None, f"{task.name} is {task.status.value} on a peer we lost"
                assert task.name in (peer.running | peer.collecting)
            if task.status is TaskStatus.WAITING:
                assert task.deps_left > 0, f"{task.name} waits on nothing"
                assert task.deps_left == self.undone_preds(task.name), f"{task.name}: deps_left"
            if task.resumed:
                assert task.status is TaskStatus.DONE and task.attempts == 0
            data = self.data[task.name]
            if task.script:
                assert task.status is TaskStatus.WAITING, f"{task.name}: script off WAITING"
                assert getattr(data, task.script), f"{task.name} has no {task.script} script"
            if task.pre_passed:  # a placement consumes it (a job's end or a skip moots it)
                assert data.pre and task.status not in (TaskStatus.RUNNING, TaskStatus.COLLECTING)
            if data.pre and task.status is TaskStatus.READY and not self.by_middleware:
                assert task.pre_passed, f"{task.name} is placeable before its pre script"
            if task.lost_input:
                assert task.status is TaskStatus.RUNNING, f"{task.name} waits for a file idle"
            rule = self.rules.get(task.name)
            if rule is not None and rule.noop:
                # (a failing pre takes an attempt number, without a placement)
                assert task.peer is None, f"noop {task.name} was placed"
                if task.status is TaskStatus.READY:
                    assert task.name in self._noops_due, f"noop {task.name} is not done"
            if self.abort is not None and task.name != self.final and not self.finished:
                assert task.status in FINAL or task.status is TaskStatus.COLLECTING, task.name
            if task.planned_on is not None and self.finished is None:
                assert task.status in (TaskStatus.READY, TaskStatus.WAITING), task.name
                assert task.name in self.peers[task.planned_on].planned, task.name
        self.ready.validate(self.finished is not None, self.peers)
        for status in TaskStatus:
            assert tally[status] == self.counts[status], f"count of {status.value} is off"
        waiting = Counter(t.priority for t in self.tasks.values() if t.status is TaskStatus.WAITING)
        assert +waiting == +self._waiting_levels, "waiting levels are off"
        for peer in self.peers.values():
            if self.by_middleware:  # a peer's runs are the middleware's to count
                for name in peer.running:
                    task = self.tasks[name]
                    assert task.status is TaskStatus.RUNNING and task.peer == peer.name, name
            else:
                assert len(peer.running) <= peer.cpus, f"{peer.name} runs more than its cpus"
            assert not peer.running & peer.collecting
            idle = not peer.running and not peer.collecting
            assert (peer.name in self._idle) == idle, f"{peer.name}: idle is off"
            for name in peer.planned:
                assert self.tasks[name].planned_on == peer.name, name
            ready = [n for n in peer.planned if self.tasks[n].status is TaskStatus.READY]
            assert peer.planned_ready == len(ready), f"{peer.name}: planned_ready is off"
        if self.finished is None:
            self.planner.validate()
        assert set(self._idle) <= set(self.peers)
        self._validate_copies()
        self.files.validate()

    def _validate_copies(self) -> None:
        if not self._multirun:
            assert not (self._running or self.copies or self.ballots), "copies without the policy"
            return
        running = {n for n, t in self.tasks.items() if t.status is TaskStatus.RUNNING}
        assert set(self._running) == running, "the index of running tasks is off"
        assert set(self._quorum_due) <= set(self.ballots), "a quorum is due without votes"
        for name in self.ballots:  # (a ballot ends with a verdict or the task's failure)
            assert self.tasks[name].status not in (*FINAL, TaskStatus.COLLECTING), name
        for name, copies in self.copies.items():
            task = self.tasks[name]
            assert copies and not self.by_middleware, name
            assert task.status is TaskStatus.RUNNING, f"{name} has copies but is not running"
            where = [task.peer] + [c.peer for c in copies]
            assert len(set(where)) == len(where), f"{name}: two runs on one peer"
            attempts = [task.attempts] + [c.attempt for c in copies]
            assert len(set(attempts)) == len(attempts), f"{name}: two runs, one attempt number"
            if self.finished is None:
                for copy in copies:
                    assert name in self.peers[copy.peer].running, f"{name} off {copy.peer}"
        if self.by_middleware or self.finished is not None:
            return
        for peer in self.peers.values():
            for name in peer.running:  # each run a slot holds is the task's or a copy's
                task = self.tasks[name]
                assert task.status is TaskStatus.RUNNING, f"{name} holds a slot of {peer.name}"
                assert task.peer == peer.name or self._copy_on(name, peer.name), name
