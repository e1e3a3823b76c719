"""FakeDagMiddleware: a stand-in for HTCondor DAGMan, which cannot run on this machine (no
registry reachable here ships HTCondor's daemons).

It is handed the whole DAG (`submit_plan`), as DAGMan is, and keeps DAGMan's rules: a node
runs once all its parents succeeded; a failed run is retried up to the node's RETRY count,
its attempts counting up from the plan's; a removed (cancelled) run counts as failed and is
retried, and no event is owed for it; the descendants of a node that failed for good never
run. It keeps HTCondor's file transfer's rule too: a declared output that the run did not
write fails it (HTCondor would hold the job).

Each run is `/bin/sh -c COMMAND` in the submit directory (`plan.root`), on this host; the
peer it is said to run on is a round-robin of the deployed peers' names, a label only.
Runs go through the backend seam, `context.commands`, with `spawn`, not `run`: `run` awaits
its command and hands back no process, so a run could not be stopped (and a task cancelled
while awaiting it leaves its command running); `spawn` starts it in a process group of its
own, which `cancel` kills and `Commands.close` (at teardown) stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar

from bonjourgrid.backends.base import (
    BackendContext,
    Capabilities,
    HeldPeer,
    JobPlan,
    RunDetail,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
)
from bonjourgrid.errors import ConfigError

_TAIL = 4096  # bytes of a run's output kept for the report


class FakeDagMiddleware:
    """A stand-in for HTCondor DAGMan (see the module docstring)."""

    name: ClassVar[str] = "fake-dagman"
    capabilities: ClassVar[Capabilities] = Capabilities(
        middleware="native", placement="middleware", dependencies="middleware", data=False
    )

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.peers: list[str] = []
        self._turn = itertools.count()
        self._events: asyncio.Queue[TaskEvent | None] = asyncio.Queue()
        self._driver: asyncio.Task[None] | None = None
        self._running: dict[tuple[str, int], asyncio.subprocess.Process] = {}
        self._cancelled: set[tuple[str, int]] = set()

    # -- deployment ------------------------------------------------------------------------

    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        self.peers = [peer.name for peer in peers]

    async def add_peer(self, peer: HeldPeer) -> None:
        self.peers.append(peer.name)

    async def remove_peer(self, peer: str, reason: str) -> None:
        # Its runs go on (they run on this host): no new run is labelled with it.
        with contextlib.suppress(ValueError):
            self.peers.remove(peer)

    async def teardown(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        await self.context.commands.close()
        self._events.put_nowait(None)

    # -- executor --------------------------------------------------------------------------

    def translate(self, plan: JobPlan) -> dict[str, str]:
        lines = [f"JOB {run.task} {run.task}.sub" for run in plan.runs]
        lines += [f"RETRY {run.task} {run.retries}" for run in plan.runs if run.retries]
        lines += [f"PARENT {p} CHILD {run.task}" for run in plan.runs for p in run.parents]
        return {"fake.dag": "\n".join(lines) + "\n"}

    async def submit(self, run: TaskRun) -> None:
        raise ConfigError("the fake DAGMan takes the whole DAG (submit_plan)")

    async def submit_plan(self, plan: JobPlan) -> None:
        self.context.state_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.translate(plan).items():
            (self.context.state_dir / name).write_text(text)
        self._driver = asyncio.create_task(self._run_dag(plan))

    async def events(self) -> AsyncIterator[TaskEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        self._cancelled.add((task, attempt))
        proc = self._running.get((task, attempt))
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    # -- DAGMan's rules ----------------------------------------------------------------------

    async def _run_dag(self, plan: JobPlan) -> None:
        runs = {run.task: run for run in plan.runs}
        waits_for = {run.task: set(run.parents) & runs.keys() for run in plan.runs}
        children: dict[str, list[str]] = defaultdict(list)
        for run in plan.runs:
            for parent in waits_for[run.task]:
                children[parent].append(run.task)
        nodes: dict[asyncio.Task[bool], str] = {}

        def start(name: str) -> None:
            nodes[asyncio.create_task(self._run_node(runs[name], plan.root))] = name

        for name, parents in waits_for.items():
            if not parents:
                start(name)
        try:
            while nodes:
                ended, _ = await asyncio.wait(nodes, return_when=asyncio.FIRST_COMPLETED)
                for node in ended:
                    name = nodes.pop(node)
                    if not node.result():
                        continue  # failed for good: its descendants never run
                    for child in children[name]:
                        waits_for[child].discard(name)
                        if not waits_for[child]:
                            start(child)
        finally:
            for node in nodes:
                node.cancel()
            await asyncio.gather(*nodes, return_exceptions=True)
            self._events.put_nowait(None)  # DAGMan left the queue

    async def _run_node(self, run: TaskRun, root: Path) -> bool:
        for attempt in range(run.attempt, run.attempt + run.retries + 1):
            if await self._run_once(run, attempt, root):
                return True
        return False

    async def _run_once(self, run: TaskRun, attempt: int, root: Path) -> bool:
        peer = self.peers[next(self._turn) % len(self.peers)] if self.peers else "localhost"
        log = self.context.state_dir / "logs" / f"{run.task}.{attempt}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._events.put_nowait(TaskStarted(run.task, attempt, peer))
        began = time.monotonic()
        proc = await self.context.commands.spawn(
            ["/bin/sh", "-c", run.command], env=dict(run.env) or None, cwd=root, log=log
        )
        self._running[(run.task, attempt)] = proc
        wall_s = run.limits.get("wall_s")
        try:
            code: int | None = await asyncio.wait_for(proc.wait(), wall_s or None)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            code = None
        finally:
            del self._running[(run.task, attempt)]
        if (run.task, attempt) in self._cancelled:
            return False  # removed: a failed run, of which nothing more is said
        run_s = time.monotonic() - began
        text = log.read_bytes()
        detail = RunDetail(logs=True, stdout=text[-_TAIL:], stdout_size=len(text))
        tail = text[-500:].decode(errors="replace")
        missing = [path for path in run.outputs if not (root / path).is_file()]
        if code == 0 and not missing:
            finished = TaskFinished(run.task, attempt, peer, (), run_s, tail, detail)
            self._events.put_nowait(finished)
            return True
        if code is None:
            why, exit_code = f"held: ran past its wall-clock limit of {wall_s:g} s", None
        elif code == 0:
            why, exit_code = f"held: output {missing[0]} was not written", None
        else:
            why, exit_code = f"exited {code}", code
        self._events.put_nowait(
            TaskFailed(run.task, attempt, peer, why, exit_code, tail, run_s, detail)
        )
        return False
