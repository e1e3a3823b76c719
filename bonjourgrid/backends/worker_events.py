"""What bgrid workers say about runs, as typed task events; and the link a backend uses to
talk to them.

Every backend whose runs end up in a bgrid worker (`native`; a middleware whose jobs start
bgrid workers) hears the same messages: `started`, `refused`, `task_done`, and `preempted` /
`denied` when a peer leaves. `WorkerEvents` turns them into `TaskStarted` / `TaskFinished`
/ `TaskFailed` / `PeerGone`, in one place. A message that failed `decode` but names its run
arrives as `Unreadable` (the coordinator's link reader checks that the run is the peer's).

`WorkerChannel` is what such a backend is handed (`BackendContext.peers`): send a message
to a held peer, receive the task messages of all held peers in arrival order, and resolve
the data sources the core named for an input into wire `Source`s. The coordinator owns the
links (`coordinator/peers.py`) and delivers into the channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from bonjourgrid.backends.base import (
    PeerGone,
    RunDetail,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
)
from bonjourgrid.coordinator.files import COORDINATOR
from bonjourgrid.protocol import Denied, Message, Preempted, Refused, Source, Started, TaskDone


@dataclass(frozen=True)
class Unreadable:
    """A worker's message about a run that failed `decode` (`attempt_of` named the run)."""

    task: str
    attempt: int
    reason: str


WorkerMessage = Started | Refused | TaskDone | Preempted | Denied | Unreadable


class WorkerEvents:
    """Decodes bgrid workers' task messages into task events. `expect` each submitted run:
    a `task_done` must name the outputs the run declared."""

    def __init__(self) -> None:
        self._outputs: dict[tuple[str, int], tuple[str, ...]] = {}

    def expect(self, run: TaskRun) -> None:
        self._outputs[(run.task, run.attempt)] = run.outputs

    def forget(self, task: str, attempt: int) -> None:
        """The run will not report (it could not be sent)."""
        self._outputs.pop((task, attempt), None)

    def translate(self, peer: str, message: WorkerMessage) -> TaskEvent:
        match message:
            case Started(task=task, attempt=attempt):
                return TaskStarted(task, attempt, peer)
            case TaskDone():
                return self._ended(peer, message)
            case Refused(task=task, attempt=attempt, reason=reason):
                self.forget(task, attempt)
                return TaskFailed(task, attempt, peer, f"peer {peer} refused the run: {reason}")
            case Unreadable(task=task, attempt=attempt, reason=reason):
                self.forget(task, attempt)
                return TaskFailed(task, attempt, peer, reason)
            case Preempted(reason=reason):
                return PeerGone(peer, f"preempted: {reason}")
            case Denied(reason=reason):
                return PeerGone(peer, f"it dropped the reservation: {reason}")
        raise TypeError(f"not a worker task message: {message!r}")  # pragma: no cover

    def _ended(self, peer: str, msg: TaskDone) -> TaskFinished | TaskFailed:
        declared = self._outputs.pop((msg.task, msg.attempt), None)
        error = msg.error
        if declared is None:
            # Not a run it was given (or one that ended already): the core drops it as stale.
            error = error or (
                f"peer {peer} reported attempt {msg.attempt} of {msg.task}, which it was not given"
            )
        elif (
            not error
            and msg.exit_code == 0
            and sorted(p for p, _ in msg.outputs) != sorted(declared)
        ):
            error = f"peer {peer} reported outputs that the task does not declare"
        detail = RunDetail(
            fetch_s=msg.fetch_s,
            bytes_fetched=msg.bytes_fetched,
            peer_to_peer=sum(size for _, label, size in msg.fetched if label != COORDINATOR),
            cache_hits=msg.hit_bytes,
            logs=True,
            stdout=msg.stdout,
            stdout_size=msg.stdout_size,
            stderr=msg.stderr,
            stderr_size=msg.stderr_size,
        )
        if msg.exit_code == 0 and not error:
            return TaskFinished(
                msg.task, msg.attempt, peer, msg.outputs, msg.run_s, msg.stderr_tail, detail
            )
        return TaskFailed(
            msg.task,
            msg.attempt,
            peer,
            error or f"exit code {msg.exit_code}",
            msg.exit_code,
            msg.stderr_tail,
            msg.run_s,
            detail,
        )


SendToPeer = Callable[[str, Message], Awaitable[bool]]
ResolveSources = Callable[[str, str, Sequence[str]], tuple[Source, ...]]


class WorkerChannel:
    """The job's control links to its held bgrid workers, as a backend sees them."""

    def __init__(self, send: SendToPeer, sources: ResolveSources) -> None:
        self._send = send
        self._sources = sources
        self._inbox: asyncio.Queue[tuple[str, WorkerMessage]] = asyncio.Queue()

    async def send(self, peer: str, message: Message) -> bool:
        """Send `message` to `peer`; False if the job holds no link to it (lost meanwhile)."""
        return await self._send(peer, message)

    def sources(self, peer: str, digest: str, names: Sequence[str]) -> tuple[Source, ...]:
        """Where `peer` fetches `digest` from: the holders the core named (peer names, or
        the coordinator), as wire sources."""
        return self._sources(peer, digest, names)

    def deliver(self, peer: str, message: WorkerMessage) -> None:
        """A task message from `peer` (the link reader), or about a run that never reached
        it (the backend): `messages` yields it next."""
        self._inbox.put_nowait((peer, message))

    async def messages(self) -> AsyncIterator[tuple[str, WorkerMessage]]:
        """Task messages of every held peer, in the order they arrived."""
        inbox = self._inbox
        while True:
            yield await inbox.get()
