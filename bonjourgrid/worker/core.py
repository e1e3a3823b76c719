"""The peer's state machine, pure: events in, instructions out; no sockets, no clock.

Theory of operation. A peer is IDLE (recruitable), BUSY (its owner is using it) or
RESERVED by exactly one job. All changes of that state happen in `WorkerCore.handle`, from
the table `_TRANSITIONS`; the daemon (`worker/daemon.py`) turns the instructions into zmq
replies, TXT updates and subprocesses, and feeds back what happened as events.

A reservation is a lease: the holder renews it with heartbeats; when it runs out (the
coordinator died, or its link did), the peer stops the job's tasks and is IDLE again.
Reserve is a compare-and-set on IDLE, and the daemon handles one event at a time, so two
coordinators can never both hold the peer.

What a reservation owns besides its tasks (the job's keypair, its pinned files, its
prefetches) lives in the daemon, between the `JobStarted` and `JobEnded` instructions; the
core says when, and refuses `run` and `prefetch` from anyone but the holder.

A run moves through `_RUN_STEPS`: a `run` takes a slot; its `run_part`s (when its inputs did
not fit one frame) are assembled in order; `StartTask` hands the whole of it to the daemon,
whose `TaskStarted` makes the core acknowledge it (`started`). Whatever stops a run before
that answers `refused` with the reason, so the coordinator never waits on a silent peer; a
`heartbeat_ack` lists the runs in progress, so it can tell a run the peer forgot.

A run with launch "external" moves through the same steps: for the core its command is the
daemon's business, which stages the inputs and lets a middleware's job claim and run it
(`bgrid task-step`, worker/task_steps.py); it holds its slot, is listed in heartbeats and
ends with `task_done` as any run does, and `cancel` drops it.

Suspend, then vacate (HTCondor's desktop policy). When the owner comes back to a RESERVED
peer, it does not drop the job at once: it is SUSPENDED. The daemon stops every run's
process group (SIGSTOP: off the CPU at once, its memory kept), the peer advertises `busy`,
and the holder hears `suspension` (suspended). The lease goes on: heartbeats are answered
and renew it, so the coordinator keeps the runs and the peer. If the owner is away again
within `vacate_after_s`, the runs continue where they were (SIGCONT), the peer is RESERVED
again and the holder hears `suspension` (resumed). Otherwise, at the first Tick past it, the
peer vacates: today's preemption, the runs stopped (their memory released), the lease ended
and `preempted` sent, which the coordinator treats as a lost peer (no retry used). A
`vacate_after_s` of 0 vacates at once. A run that arrives while suspended is taken (its
process is stopped as soon as it is spawned): refusing it would cost its task an attempt.

Service runs (a backend's middleware daemons, worker/service_run.py) belong to the lease too:
only its holder starts and stops them, they take no task slot, and whatever ends the lease
(release, expiry, the owner back) stops them as it stops the runs. Their steps are
`_SERVICE_STEPS`; at most `MAX_SERVICES` run at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from bonjourgrid.protocol import (
    Denied,
    HeartbeatAck,
    Message,
    Preempted,
    Prefetched,
    Refused,
    Released,
    Reserved,
    ServiceExited,
    ServiceFailed,
    ServiceUp,
    Started,
    Suspension,
    TaskDone,
)


class PeerState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    RESERVED = "reserved"
    SUSPENDED = "suspended"  # still reserved, its runs stopped: advertised as busy


# Which state each state may move to, and on what. Anything else is a bug (validate_state).
_TRANSITIONS: dict[tuple[PeerState, PeerState], str] = {
    (PeerState.IDLE, PeerState.RESERVED): "a coordinator reserved the peer",
    (PeerState.RESERVED, PeerState.IDLE): "released, or the lease ran out",
    (PeerState.IDLE, PeerState.BUSY): "the owner came back",
    (PeerState.RESERVED, PeerState.BUSY): "the owner came back: the job is preempted",
    (PeerState.BUSY, PeerState.IDLE): "the owner went away",
    (PeerState.RESERVED, PeerState.SUSPENDED): "the owner came back: the runs are suspended",
    (PeerState.SUSPENDED, PeerState.RESERVED): "the owner went away in time: the runs go on",
    (PeerState.SUSPENDED, PeerState.BUSY): "vacated, released or expired while the owner is here",
}
VACATE_AFTER_S = 600.0  # HTCondor's default: an owner back for 10 minutes gets the memory too


# How a run moves (the slot is taken at `run` and given back at the end of any path).
_RUN_STEPS: dict[tuple[str, str], str] = {
    ("run", "assembling"): "its inputs come in run_part messages",
    ("run", "starting"): "all of it came in one message",
    ("assembling", "starting"): "its last part came",
    ("starting", "started"): "the daemon started it: acknowledged with `started`",
    ("run", "refused"): "not the holder's, or no free slot, or malformed",
    ("assembling", "refused"): "a part out of order or malformed",
    ("starting", "refused"): "the daemon could not start it",
    ("started", "done"): "it ended: `task_done`",
}

# How a service run moves (`services` holds those between `starting` and their end).
_SERVICE_STEPS: dict[tuple[str, str], str] = {
    ("start", "starting"): "the holder asked for it: the daemon prepares and starts it",
    ("start", "failed"): "not the holder's, a name already running, or too many services",
    ("starting", "up"): "it is ready: `service_up`",
    ("starting", "failed"): "it could not start, or was not ready in time: `service_failed`",
    ("starting", "stopping"): "`service_stop` (or the lease ended) before it was ready",
    ("up", "stopping"): "`service_stop`, or the lease ended",
    ("up", "exited"): "it ended on its own: `service_exited` (not stopped)",
    ("stopping", "exited"): "its process group is gone: `service_exited` (stopped)",
}
MAX_SERVICES = 16  # service runs at once on one peer


# -- events (what happened) ---------------------------------------------------------------


@dataclass(frozen=True)
class ReserveRequested:
    client: bytes
    job: str
    lease_s: float
    coordinator: str
    keys: Any = None  # the job's keypair as the daemon parsed it; opaque to the core


@dataclass(frozen=True)
class HeartbeatReceived:
    client: bytes
    job: str
    lease_s: float


@dataclass(frozen=True)
class ReleaseRequested:
    client: bytes
    job: str


@dataclass(frozen=True)
class RunRequested:
    client: bytes
    job: str
    task: str
    attempt: int
    spec: Any  # the task as the daemon parsed it at the wire; opaque to the core
    parts: int = 0  # `run_part` messages still to come


@dataclass(frozen=True)
class RunPartReceived:
    client: bytes
    job: str
    task: str
    attempt: int
    part: int
    items: Any  # its inputs and outputs as the daemon parsed them; opaque to the core


@dataclass(frozen=True)
class RunUnreadable:
    """A `run` or `run_part` that failed its checks, but says which run it is about."""

    client: bytes
    job: str
    task: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class TaskStarted:
    """The daemon started a run it was told to (StartTask)."""

    job: str
    task: str
    attempt: int


@dataclass(frozen=True)
class StartFailed:
    """The daemon could not start a run it was told to (StartTask)."""

    job: str
    task: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PrefetchRequested:
    client: bytes
    job: str
    files: Any  # as the daemon parsed them at the wire; opaque to the core


@dataclass(frozen=True)
class PrefetchFinished:
    job: str
    report: Prefetched


@dataclass(frozen=True)
class CancelRequested:
    client: bytes
    job: str
    task: str


@dataclass(frozen=True)
class TaskFinished:
    job: str
    task: str
    attempt: int
    report: TaskDone


@dataclass(frozen=True)
class ServiceStartRequested:
    client: bytes
    job: str
    name: str
    spec: Any  # the decoded `service_start`; opaque to the core


@dataclass(frozen=True)
class ServiceStopRequested:
    client: bytes
    job: str
    name: str


@dataclass(frozen=True)
class ServiceIsUp:
    """The daemon started a service it was told to (StartService) and it is ready."""

    job: str
    name: str
    report: ServiceUp


@dataclass(frozen=True)
class ServiceStartFailed:
    job: str
    name: str
    reason: str


@dataclass(frozen=True)
class ServiceEnded:
    """A service's process ended, on its own or stopped (StopService); its directory is gone."""

    job: str
    name: str
    report: ServiceExited


@dataclass(frozen=True)
class OwnerActivity:
    active: bool


@dataclass(frozen=True)
class Tick:
    pass


Event = (
    ReserveRequested
    | HeartbeatReceived
    | ReleaseRequested
    | RunRequested
    | RunPartReceived
    | RunUnreadable
    | TaskStarted
    | StartFailed
    | PrefetchRequested
    | PrefetchFinished
    | CancelRequested
    | TaskFinished
    | ServiceStartRequested
    | ServiceStopRequested
    | ServiceIsUp
    | ServiceStartFailed
    | ServiceEnded
    | OwnerActivity
    | Tick
)


# -- instructions (what the daemon must do) -----------------------------------------------


@dataclass(frozen=True)
class Send:
    client: bytes
    message: Message


@dataclass(frozen=True)
class Advertise:
    state: PeerState
    job: str | None


@dataclass(frozen=True)
class StartTask:
    """Start a run: `spec` from its `run`, `parts` the items of its `run_part`s, in order.
    The daemon answers with TaskStarted or StartFailed."""

    job: str
    task: str
    attempt: int
    spec: Any
    parts: tuple[Any, ...] = ()


@dataclass(frozen=True)
class StopTask:
    job: str
    task: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class JobStarted:
    """A reservation began: admit the job's key, keep its pins until `JobEnded`."""

    job: str
    keys: Any


@dataclass(frozen=True)
class JobEnded:
    """The reservation ended: drop the job's key, pins and prefetches."""

    job: str
    reason: str


@dataclass(frozen=True)
class StartPrefetch:
    job: str
    files: Any


@dataclass(frozen=True)
class StartService:
    """Start a service run; the daemon answers ServiceIsUp or ServiceStartFailed, then
    ServiceEnded when its process ends."""

    job: str
    name: str
    spec: Any


@dataclass(frozen=True)
class StopService:
    """Stop a service run with its process group, then ServiceEnded (stopped)."""

    job: str
    name: str
    reason: str


@dataclass(frozen=True)
class SuspendTasks:
    """Stop every run of the job (SIGSTOP its process group), and any it starts from now on."""

    job: str


@dataclass(frozen=True)
class ResumeTasks:
    """Continue every run of the job (SIGCONT its process group)."""

    job: str


Instruction = (
    Send
    | Advertise
    | StartTask
    | StopTask
    | JobStarted
    | JobEnded
    | StartPrefetch
    | StartService
    | StopService
    | SuspendTasks
    | ResumeTasks
)


@dataclass
class _Lease:
    job: str
    client: bytes
    coordinator: str
    expires: float


@dataclass
class _Assembly:
    """A run whose `run_part`s are still coming."""

    attempt: int
    spec: Any
    parts: int
    received: list[Any] = field(default_factory=list)


@dataclass
class WorkerCore:
    """The peer state machine for one worker daemon."""

    cpus: int
    data_port: int
    state: PeerState = PeerState.IDLE
    lease: _Lease | None = None
    running: dict[str, int] = field(default_factory=dict)  # task -> attempt, of lease.job
    assembling: dict[str, _Assembly] = field(default_factory=dict)  # runs still coming in
    started: set[str] = field(default_factory=set)  # tasks of `running` acknowledged
    services: dict[str, str] = field(default_factory=dict)  # name -> step, of lease.job
    owner_active: bool = False
    vacate_after_s: float = VACATE_AFTER_S  # how long a suspended peer waits for its owner to go
    suspended_since: float | None = None  # when the runs were suspended (SUSPENDED)
    log: list[tuple[float, str]] = field(default_factory=list)

    def handle(self, event: Event, now: float) -> list[Instruction]:
        out: list[Instruction] = []
        match event:
            case ReserveRequested():
                self._reserve(event, now, out)
            case HeartbeatReceived():
                if self._holds(event.client, event.job):
                    assert self.lease is not None
                    self.lease.expires = now + event.lease_s
                    runs = tuple(
                        sorted((t, a) for t, a in self.running.items() if t in self.started)
                    )
                    out.append(Send(event.client, HeartbeatAck(event.job, runs)))
                else:
                    out.append(self._deny(event.client, event.job))
            case ReleaseRequested():
                if self._holds(event.client, event.job):
                    self._end_lease("released by its coordinator", now, out)
                    out.append(Send(event.client, Released(event.job)))
                else:
                    out.append(self._deny(event.client, event.job))
            case RunRequested():
                self._run(event, out)
            case RunPartReceived():
                self._run_part(event, out)
            case RunUnreadable():
                if not self._holds(event.client, event.job):
                    out.append(self._deny(event.client, event.job))
                else:
                    self._refuse(
                        event.client, event.job, event.task, event.attempt, event.reason, out
                    )
            case TaskStarted():
                if self._runs(event.job, event.task, event.attempt):
                    assert self.lease is not None
                    self.started.add(event.task)
                    out.append(
                        Send(self.lease.client, Started(event.job, event.task, event.attempt))
                    )
            case StartFailed():
                if self._runs(event.job, event.task, event.attempt):
                    assert self.lease is not None
                    self._refuse(
                        self.lease.client, event.job, event.task, event.attempt, event.reason, out
                    )
            case PrefetchRequested():
                if self._holds(event.client, event.job):
                    out.append(StartPrefetch(event.job, event.files))
                else:
                    out.append(self._deny(event.client, event.job))
            case PrefetchFinished():
                if self.lease is not None and self.lease.job == event.job:
                    out.append(Send(self.lease.client, event.report))
            case CancelRequested():
                if self._holds(event.client, event.job) and event.task in self.running:
                    attempt = self.running[event.task]
                    self._forget(event.task)
                    out.append(StopTask(event.job, event.task, attempt, "cancelled"))
            case TaskFinished():
                if self._runs(event.job, event.task, event.attempt):
                    assert self.lease is not None
                    self._forget(event.task)
                    out.append(Send(self.lease.client, event.report))
            case (
                ServiceStartRequested()
                | ServiceStopRequested()
                | ServiceIsUp()
                | ServiceStartFailed()
                | ServiceEnded()
            ):
                self._service(event, out)
            case OwnerActivity():
                self._owner(event.active, now, out)
            case Tick():
                if self.lease is not None and now >= self.lease.expires:
                    self._end_lease("lease expired: its coordinator is gone", now, out)
                elif (
                    self.suspended_since is not None
                    and now >= self.suspended_since + self.vacate_after_s
                ):
                    stayed = f"owner stayed {self.vacate_after_s:g} s: vacated"
                    self._vacate(f"the {stayed}", f"its {stayed}", now, out)
        return out

    def _reserve(self, event: ReserveRequested, now: float, out: list[Instruction]) -> None:
        if self._holds(event.client, event.job):  # a retried reserve: grant it again
            assert self.lease is not None
            self.lease.expires = now + event.lease_s
        elif self.state is not PeerState.IDLE:
            out.append(self._deny(event.client, event.job))
            return
        else:
            self._move(PeerState.RESERVED, now, f"reserved by job {event.job}")
            self.lease = _Lease(event.job, event.client, event.coordinator, now + event.lease_s)
            # Before `reserved` goes out: the job's key opens the data server from then on.
            out.append(JobStarted(event.job, event.keys))
            out.append(Advertise(PeerState.RESERVED, event.job))
        out.append(Send(event.client, Reserved(event.job, self.data_port, self.cpus)))

    def _run(self, event: RunRequested, out: list[Instruction]) -> None:
        if not self._holds(event.client, event.job):
            out.append(self._deny(event.client, event.job))
        elif event.task in self.running or len(self.running) >= self.cpus:
            reason = (
                "already running" if event.task in self.running else f"all {self.cpus} slots busy"
            )
            out.append(Send(event.client, Refused(event.job, event.task, event.attempt, reason)))
        else:
            self.running[event.task] = event.attempt
            if event.parts:
                self.assembling[event.task] = _Assembly(event.attempt, event.spec, event.parts)
            else:
                out.append(StartTask(event.job, event.task, event.attempt, event.spec))

    def _run_part(self, event: RunPartReceived, out: list[Instruction]) -> None:
        if not self._holds(event.client, event.job):
            out.append(self._deny(event.client, event.job))
            return
        run = self.assembling.get(event.task)
        if run is None or run.attempt != event.attempt or event.part != len(run.received) + 1:
            why = f"part {event.part} of a run that is not expecting it"
            self._refuse(event.client, event.job, event.task, event.attempt, why, out)
            return
        run.received.append(event.items)
        if len(run.received) == run.parts:
            del self.assembling[event.task]
            out.append(
                StartTask(event.job, event.task, event.attempt, run.spec, tuple(run.received))
            )

    def _service(
        self,
        event: ServiceStartRequested
        | ServiceStopRequested
        | ServiceIsUp
        | ServiceStartFailed
        | ServiceEnded,
        out: list[Instruction],
    ) -> None:
        """A step of a service run (`_SERVICE_STEPS`)."""
        match event:
            case ServiceStartRequested(client, job, name, spec):
                if not self._holds(client, job):
                    out.append(self._deny(client, job))
                elif name in self.services or len(self.services) >= MAX_SERVICES:
                    why = (
                        f"a service named {name!r} already runs here"
                        if name in self.services
                        else f"{MAX_SERVICES} services already run here"
                    )
                    out.append(Send(client, ServiceFailed(job, name, why)))
                else:
                    self.services[name] = "starting"
                    out.append(StartService(job, name, spec))
            case ServiceStopRequested(client, job, name):
                if not self._holds(client, job):
                    out.append(self._deny(client, job))
                elif name not in self.services:
                    why = f"no service named {name!r} runs here (it may have exited)"
                    out.append(Send(client, ServiceFailed(job, name, why)))
                elif self.services[name] != "stopping":
                    self.services[name] = "stopping"
                    out.append(StopService(job, name, "stopped by its coordinator"))
            case ServiceIsUp(job, name, report):
                if self._service_step(job, name) == "starting":
                    assert self.lease is not None
                    self.services[name] = "up"
                    out.append(Send(self.lease.client, report))
            case ServiceStartFailed(job, name, reason):
                if self._service_step(job, name) == "starting":
                    assert self.lease is not None
                    del self.services[name]
                    out.append(Send(self.lease.client, ServiceFailed(job, name, reason)))
            case ServiceEnded(job, name, report):
                step = self._service_step(job, name)
                if step == ("stopping" if report.stopped else "up"):
                    assert self.lease is not None
                    del self.services[name]
                    out.append(Send(self.lease.client, report))

    def _service_step(self, job: str, name: str) -> str | None:
        """Where service `name` of the job holding the peer is; None: it has none such."""
        if self.lease is None or self.lease.job != job:
            return None
        return self.services.get(name)

    def _refuse(
        self, client: bytes, job: str, task: str, attempt: int, reason: str, out: list[Instruction]
    ) -> None:
        """Answer `refused`; a run of that attempt gives its slot back (stopped if started)."""
        if self._runs(job, task, attempt):
            if task in self.started:
                out.append(StopTask(job, task, attempt, f"refused: {reason}"))
            self._forget(task)
        out.append(Send(client, Refused(job, task, attempt, reason)))

    def _runs(self, job: str, task: str, attempt: int) -> bool:
        """Whether this run (of the job holding the peer) has a slot."""
        return (
            self.lease is not None and self.lease.job == job and self.running.get(task) == attempt
        )

    def _forget(self, task: str) -> None:
        self.running.pop(task, None)
        self.assembling.pop(task, None)
        self.started.discard(task)

    def _owner(self, active: bool, now: float, out: list[Instruction]) -> None:
        self.owner_active = active
        if active and self.state is PeerState.RESERVED and self.vacate_after_s <= 0:
            self._vacate("the owner came back", "its owner came back", now, out)
        elif active and self.state is PeerState.RESERVED:
            assert self.lease is not None
            self._move(PeerState.SUSPENDED, now, "the owner came back: runs suspended")
            self.suspended_since = now
            out.append(SuspendTasks(self.lease.job))
            out.append(Advertise(PeerState.BUSY, None))
            why = f"its owner came back (vacated after {self.vacate_after_s:g} s)"
            out.append(Send(self.lease.client, Suspension(self.lease.job, "suspended", why)))
        elif not active and self.state is PeerState.SUSPENDED:
            assert self.lease is not None
            self._move(PeerState.RESERVED, now, "the owner went away: runs resumed")
            self.suspended_since = None
            out.append(ResumeTasks(self.lease.job))
            out.append(Advertise(PeerState.RESERVED, self.lease.job))
            why = "its owner went away again"
            out.append(Send(self.lease.client, Suspension(self.lease.job, "resumed", why)))
        elif active and self.state is PeerState.IDLE:
            self._move(PeerState.BUSY, now, "the owner came back")
            out.append(Advertise(PeerState.BUSY, None))
        elif not active and self.state is PeerState.BUSY:
            self._move(PeerState.IDLE, now, "the owner went away")
            out.append(Advertise(PeerState.IDLE, None))

    def _vacate(self, why: str, told: str, now: float, out: list[Instruction]) -> None:
        """The owner is here to stay: the job leaves the peer (`preempted`, saying `told`),
        its runs and services stopped (`why`)."""
        assert self.lease is not None
        holder, job = self.lease.client, self.lease.job
        self._end_lease(why, now, out, to=PeerState.BUSY)
        out.append(Send(holder, Preempted(job, told)))

    def _end_lease(
        self, why: str, now: float, out: list[Instruction], to: PeerState = PeerState.IDLE
    ) -> None:
        assert self.lease is not None
        if self.state is PeerState.SUSPENDED:
            to = PeerState.BUSY  # released or expired while its owner is at the desk
        self.suspended_since = None
        for task, attempt in sorted(self.running.items()):
            out.append(StopTask(self.lease.job, task, attempt, why))
        for name in sorted(self.services):
            out.append(StopService(self.lease.job, name, why))
        out.append(JobEnded(self.lease.job, why))
        self.services.clear()
        self.running.clear()
        self.assembling.clear()
        self.started.clear()
        self.lease = None
        self._move(to, now, why)
        out.append(Advertise(to, None))

    def _holds(self, client: bytes, job: str) -> bool:
        return self.lease is not None and self.lease.job == job and self.lease.client == client

    def _deny(self, client: bytes, job: str) -> Send:
        if self.lease is not None and self.lease.job == job:
            reason = "job already holds this peer through another connection"
        elif self.lease is not None:
            reason = f"reserved by job {self.lease.job}"
        elif self.state is PeerState.BUSY:
            reason = "busy: its owner is using it"
        else:
            reason = "not reserved by this job (the lease may have expired)"
        return Send(client, Denied(job, reason))

    def _move(self, to: PeerState, now: float, why: str) -> None:
        assert (self.state, to) in _TRANSITIONS, f"illegal transition {self.state} -> {to}"
        self.log.append((now, f"{self.state.value} -> {to.value}: {why}"))
        del self.log[:-200]  # a bounded story, not a leak
        self.state = to

    def validate_state(self) -> None:
        """Invariants; tests call this after every scenario."""
        held = (PeerState.RESERVED, PeerState.SUSPENDED)
        assert (self.state in held) == (self.lease is not None)
        assert (self.state is PeerState.SUSPENDED) == (self.suspended_since is not None)
        assert self.state is not PeerState.SUSPENDED or self.owner_active
        assert self.state is not PeerState.RESERVED or not self.owner_active
        assert len(self.running) <= self.cpus
        assert not self.running or self.state in held
        assert not self.services or self.state in held
        assert len(self.services) <= MAX_SERVICES
        assert set(self.services.values()) <= {"starting", "up", "stopping"}
        assert set(self.assembling) <= set(self.running)
        assert self.started <= set(self.running)
        assert not set(self.assembling) & self.started
        assert not (self.owner_active and self.state is PeerState.IDLE)
