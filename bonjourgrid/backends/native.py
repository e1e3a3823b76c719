"""The native backend: tasks run on BonjourGrid's own worker daemons.

Nothing to deploy: the coordinator recruits the workers and holds their control links
(`coordinator/peers.py`); this backend is handed them as a `WorkerChannel`
(`BackendContext.peers`). `submit` sends the `run` (and its `run_part`s when it does not fit
one frame) to the peer the core chose, `cancel` sends `cancel`, and `events` turns what the
workers answer into typed task events (`WorkerEvents`). Data moves through bgrid's caches:
the coordinator orders prefetches and collects outputs itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from bonjourgrid.backends.base import (
    BackendContext,
    Capabilities,
    HeldPeer,
    JobPlan,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
)
from bonjourgrid.backends.worker_events import Unreadable, WorkerChannel, WorkerEvents
from bonjourgrid.errors import ConfigError, ProtocolError
from bonjourgrid.protocol import Cancel, Run, TaskInput, split_run


class NativeBackend:
    """Our own workers: the coordinator talks to them directly."""

    name: ClassVar[str] = "native"
    capabilities: ClassVar[Capabilities] = Capabilities(middleware="native")

    def __init__(self, context: BackendContext) -> None:
        if context.peers is None:
            raise ConfigError(
                "the native backend runs tasks on the coordinator's own workers: it must be "
                "handed their links (BackendContext.peers)"
            )
        self.job = context.job
        self.peers: WorkerChannel = context.peers
        self.reports = WorkerEvents()
        self._running: dict[tuple[str, int], str] = {}  # (task, attempt) -> its peer

    # deployment side: the workers are recruited and held by the coordinator

    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        return None

    async def add_peer(self, peer: HeldPeer) -> None:
        return None

    async def remove_peer(self, peer: str, reason: str) -> None:
        return None

    async def teardown(self) -> None:
        self._running.clear()

    # executor side

    def translate(self, plan: JobPlan) -> dict[str, str]:
        return {}  # the runs go as messages, not files

    async def submit(self, run: TaskRun) -> None:
        await self._send(run, "worker")

    # RunStaging: a middleware's job runs the command, the worker stages and reports it

    async def stage(self, run: TaskRun) -> None:
        await self._send(run, "external")

    async def drop(self, task: str, attempt: int, reason: str) -> None:
        await self.cancel(task, attempt, reason)

    async def _send(self, run: TaskRun, launch: str) -> None:
        peer = run.peer
        if peer is None:
            raise ConfigError(f"the native backend runs {run.task} where the core places it")
        inputs = tuple(
            TaskInput(item.path, item.ref, self.peers.sources(peer, item.ref.digest, item.sources))
            for item in run.inputs
        )
        message = Run(
            self.job,
            run.task,
            run.attempt,
            run.command,
            inputs,
            run.outputs,
            dict(run.env),
            {key: int(value) for key, value in run.limits.items()},
            launch=launch,
        )
        key = (run.task, run.attempt)
        self.reports.expect(run)
        self._running[key] = peer
        try:
            # A run too big for one frame goes as a `run` and its `run_part`s, in order.
            for part in split_run(message):
                if not await self.peers.send(peer, part):
                    # Lost meanwhile: its PeerLost puts the task back.
                    self._running.pop(key, None)
                    self.reports.forget(run.task, run.attempt)
                    return
        except ProtocolError as err:
            why = f"the run of {run.task} cannot be sent: {err}"
            self.peers.deliver(peer, Unreadable(run.task, run.attempt, why))

    async def submit_plan(self, plan: JobPlan) -> None:
        raise ConfigError("the native backend is handed ready tasks one by one (submit)")

    async def events(self) -> AsyncIterator[TaskEvent]:
        reports = self.reports
        running = self._running
        async for peer, message in self.peers.messages():
            event = reports.translate(peer, message)
            if isinstance(event, TaskFinished | TaskFailed):
                running.pop((event.task, event.attempt), None)
            yield event

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        peer = self._running.pop((task, attempt), None)
        if peer is not None:
            self.reports.forget(task, attempt)
            await self.peers.send(peer, Cancel(self.job, task))
