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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class PeerState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    RESERVED = "reserved"


# Which state each state may move to, and on what. Anything else is a bug (validate_state).
_TRANSITIONS: dict[tuple[PeerState, PeerState], str] = {
    (PeerState.IDLE, PeerState.RESERVED): "a coordinator reserved the peer",
    (PeerState.RESERVED, PeerState.IDLE): "released, or the lease ran out",
    (PeerState.IDLE, PeerState.BUSY): "the owner came back",
    (PeerState.RESERVED, PeerState.BUSY): "the owner came back: the job is preempted",
    (PeerState.BUSY, PeerState.IDLE): "the owner went away",
}


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


@dataclass(frozen=True)
class PrefetchRequested:
    client: bytes
    job: str
    files: Any  # as the daemon parsed them at the wire; opaque to the core


@dataclass(frozen=True)
class PrefetchFinished:
    job: str
    report: dict[str, Any]  # the fields of a `prefetched` message


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
    report: dict[str, Any]  # the fields of a `task_done` message


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
    | PrefetchRequested
    | PrefetchFinished
    | CancelRequested
    | TaskFinished
    | OwnerActivity
    | Tick
)


# -- instructions (what the daemon must do) -----------------------------------------------


@dataclass(frozen=True)
class Send:
    client: bytes
    msg_type: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Advertise:
    state: PeerState
    job: str | None


@dataclass(frozen=True)
class StartTask:
    job: str
    task: str
    attempt: int
    spec: Any


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


Instruction = Send | Advertise | StartTask | StopTask | JobStarted | JobEnded | StartPrefetch


@dataclass
class _Lease:
    job: str
    client: bytes
    coordinator: str
    expires: float


@dataclass
class WorkerCore:
    """The peer state machine for one worker daemon."""

    cpus: int
    data_port: int
    state: PeerState = PeerState.IDLE
    lease: _Lease | None = None
    running: dict[str, int] = field(default_factory=dict)  # task -> attempt, of lease.job
    owner_active: bool = False
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
                    out.append(Send(event.client, "heartbeat_ack", {"job": event.job}))
                else:
                    out.append(self._deny(event.client, event.job))
            case ReleaseRequested():
                if self._holds(event.client, event.job):
                    self._end_lease("released by its coordinator", now, out)
                    out.append(Send(event.client, "released", {"job": event.job}))
                else:
                    out.append(self._deny(event.client, event.job))
            case RunRequested():
                self._run(event, out)
            case PrefetchRequested():
                if self._holds(event.client, event.job):
                    out.append(StartPrefetch(event.job, event.files))
                else:
                    out.append(self._deny(event.client, event.job))
            case PrefetchFinished():
                if self.lease is not None and self.lease.job == event.job:
                    out.append(Send(self.lease.client, "prefetched", event.report))
            case CancelRequested():
                if self._holds(event.client, event.job) and event.task in self.running:
                    attempt = self.running.pop(event.task)
                    out.append(StopTask(event.job, event.task, attempt, "cancelled"))
            case TaskFinished():
                if (
                    self.lease is not None
                    and self.lease.job == event.job
                    and self.running.get(event.task) == event.attempt
                ):
                    del self.running[event.task]
                    out.append(Send(self.lease.client, "task_done", event.report))
            case OwnerActivity():
                self._owner(event.active, now, out)
            case Tick():
                if self.lease is not None and now >= self.lease.expires:
                    self._end_lease("lease expired: its coordinator is gone", now, out)
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
        out.append(
            Send(
                event.client,
                "reserved",
                {"job": event.job, "data_port": self.data_port, "cpus": self.cpus},
            )
        )

    def _run(self, event: RunRequested, out: list[Instruction]) -> None:
        if not self._holds(event.client, event.job):
            out.append(self._deny(event.client, event.job))
        elif event.task in self.running or len(self.running) >= self.cpus:
            reason = (
                "already running" if event.task in self.running else f"all {self.cpus} slots busy"
            )
            out.append(Send(event.client, "task_done", refused_report(event, reason)))
        else:
            self.running[event.task] = event.attempt
            out.append(StartTask(event.job, event.task, event.attempt, event.spec))

    def _owner(self, active: bool, now: float, out: list[Instruction]) -> None:
        self.owner_active = active
        if active and self.state is PeerState.RESERVED:
            assert self.lease is not None
            holder, job = self.lease.client, self.lease.job
            self._end_lease("the owner came back", now, out, to=PeerState.BUSY)
            out.append(Send(holder, "preempted", {"job": job, "reason": "its owner came back"}))
        elif active and self.state is PeerState.IDLE:
            self._move(PeerState.BUSY, now, "the owner came back")
            out.append(Advertise(PeerState.BUSY, None))
        elif not active and self.state is PeerState.BUSY:
            self._move(PeerState.IDLE, now, "the owner went away")
            out.append(Advertise(PeerState.IDLE, None))

    def _end_lease(
        self, why: str, now: float, out: list[Instruction], to: PeerState = PeerState.IDLE
    ) -> None:
        assert self.lease is not None
        for task, attempt in sorted(self.running.items()):
            out.append(StopTask(self.lease.job, task, attempt, why))
        out.append(JobEnded(self.lease.job, why))
        self.running.clear()
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
        return Send(client, "denied", {"job": job, "reason": reason})

    def _move(self, to: PeerState, now: float, why: str) -> None:
        assert (self.state, to) in _TRANSITIONS, f"illegal transition {self.state} -> {to}"
        self.log.append((now, f"{self.state.value} -> {to.value}: {why}"))
        del self.log[:-200]  # a bounded story, not a leak
        self.state = to

    def validate_state(self) -> None:
        """Invariants; tests call this after every scenario."""
        assert (self.state is PeerState.RESERVED) == (self.lease is not None)
        assert len(self.running) <= self.cpus
        assert not self.running or self.state is PeerState.RESERVED
        assert not (self.owner_active and self.state is PeerState.IDLE)


def refused_report(event: RunRequested, reason: str) -> dict[str, Any]:
    """A `task_done` for a task that never started (the coordinator retries it elsewhere)."""
    return {
        "job": event.job,
        "task": event.task,
        "attempt": event.attempt,
        "exit_code": -1,
        "outputs": [],
        "stderr_tail": "",
        "error": f"refused by the peer: {reason}",
        "fetch_s": 0.0,
        "run_s": 0.0,
        "bytes_fetched": 0,
        "fetched": [],
        "hit_bytes": 0,
    }
