"""External runs: the worker stages a run, a middleware's job runs its command.

Theory of operation. With the slurm backend, Slurm must run and account each task's
process, while bgrid's caches keep moving its data (prefetch, peer to peer, outputs kept on
the peer that made them). So the coordinator sends the worker a `run` with `launch:
"external"` and submits a batch job that runs `bgrid task-step`. On the worker:

- the run goes as any run does: a slot, its inputs fetched into a fresh sandbox, `started`,
  listed in heartbeats; it just does not spawn its command (`ExternalStep`, in `TaskRun`);
- a service run started with `task_steps` (the job's slurmd) gets a unix socket
  `{dir}/task-step.sock` (0600) and `{dir}/task-step`, a shell script that runs this worker's
  own `bgrid task-step` on it: the batch job needs no `bgrid` on its PATH;
- `bgrid task-step` (worker/task_step.py) claims the run over that socket (protocol/steps.py).
  The worker grants it once the inputs are staged: the sandbox, the command, its environment
  (with the sandbox's marker, worker/reaper.py), where its stdout and stderr go, its limits.
  The step runs the command, then says how it exited; the worker stores the outputs and
  reports `task_done` to the coordinator exactly as for a run it spawned, and only then sends
  the step its verdict (exit 0 only when the outputs are stored: Slurm's afterok follows it);
- refused: a claim from another job's socket, of a run this peer never staged, already
  claimed, or ended (cancelled, stopped, failed to stage: the reason is kept a while);
- a step whose connection drops before it says how the command exited failed the attempt
  ("the batch job's step died"); a run stopped by the worker (cancel, lease end, owner back)
  gets `step_stop`, and whatever still carries its marker is killed after the grace period.

The socket and the script go with their service. `TaskSteps` is the daemon's registry of
staged external runs and of the sockets; `ExternalStep` is one run's hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from bonjourgrid.errors import ProtocolError
from bonjourgrid.protocol import (
    StepClaim,
    StepExited,
    StepGranted,
    StepRefused,
    StepStop,
    StepVerdict,
    TaskDone,
    recv_step,
    send_step,
)

log = logging.getLogger(__name__)

SOCKET = "task-step.sock"
SCRIPT = "task-step"
CLAIM_READ_S = 10.0  # a connection that sends no claim by then is closed
# A claim may outrun its `run` (the batch job started before the worker read the message):
# a run this peer has not heard of is waited for this long before the claim is refused.
UNSTAGED_WAIT_S = 10.0
_ENDED_KEPT = 1000  # why recent external runs ended, for the refusals of late claims
_SUN_PATH = 107  # bytes of a unix socket's path (108 with its NUL)
NOT_STORED_EXIT = 1  # what a step exits with when its command exited 0 but its outputs failed

RunKey = tuple[str, str, int]  # (job, task, attempt)


class StepEnded(Exception):
    """The run can no longer be claimed or continued; the message says why."""


def unix_path(path: Path) -> tuple[str, int | None]:
    """A name for the socket at `path` that fits a sun_path, and a directory descriptor to
    close after use (None when the path fits as it is). A long path is reached through
    /proc/self/fd: deep cache directories (and tests' temporary ones) exceed 107 bytes."""
    if len(os.fsencode(path)) <= _SUN_PATH:
        return str(path), None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def script_text(socket_path: Path) -> str:
    """The `{dir}/task-step` of a service: this worker's own interpreter and bgrid."""
    command = [sys.executable, "-m", "bonjourgrid.cli", "task-step", "--socket", str(socket_path)]
    return (
        "#!/bin/sh\n"
        "# Claims a run the bgrid worker on this peer staged, and runs it (bgrid task-step).\n"
        f'exec {shlex.join(command)} "$@"\n'
    )


def verdict_for(report: TaskDone) -> StepVerdict:
    """What a step exits with once its run was reported: the command's exit code, or
    NOT_STORED_EXIT when it exited 0 but its outputs could not be stored."""
    stored = report.exit_code == 0 and not report.error
    if stored:
        return StepVerdict(0, True, "")
    code = report.exit_code if report.exit_code != 0 else NOT_STORED_EXIT
    return StepVerdict(code, False, report.error or f"the command exited {report.exit_code}")


class ExternalStep:
    """One external run's hand-off between its `TaskRun` and the step that claims it."""

    def __init__(self, key: RunKey, registry: TaskSteps) -> None:
        self.key = key
        self._registry = registry
        loop = asyncio.get_running_loop()
        self._grant: asyncio.Future[StepGranted] = loop.create_future()
        self._exited: asyncio.Future[StepExited] = loop.create_future()
        self._verdict: asyncio.Future[StepVerdict] = loop.create_future()
        self._stop: asyncio.Future[str] = loop.create_future()  # its result: why
        self.claimed_by = ""  # who claimed it ("" while unclaimed)
        self.connection_closed = asyncio.Event()
        for future in (self._grant, self._exited):  # unobserved when no step claims it
            future.add_done_callback(_observe)

    @property
    def name(self) -> str:
        job, task, attempt = self.key
        return f"run {task!r} attempt {attempt} of job {job}"

    # the TaskRun's side

    def offer(self, grant: StepGranted) -> None:
        """The inputs are staged: a claim is granted this."""
        if not self._grant.done():
            self._grant.set_result(grant)

    async def exited(self) -> StepExited:
        """How the claimed command exited; StepEnded if it was stopped or its step died."""
        return await asyncio.shield(self._exited)

    def settle(self, report: TaskDone) -> None:
        """The run was reported to the coordinator: the step may exit now."""
        if not self._verdict.done():
            self._verdict.set_result(verdict_for(report))

    def stop(self, reason: str) -> None:
        """The worker stops the run: a claiming step is told to stop its command."""
        if not self._stop.done():
            self._stop.set_result(reason)
        self.end(f"stopped: {reason}")

    def end(self, why: str) -> None:
        """The run ended (or failed before its command): no claim is granted any more."""
        for future in (self._grant, self._exited):
            if not future.done():
                future.set_exception(StepEnded(f"{self.name} ended ({why})"))
        self._registry.ended(self.key, why)

    # the connection's side

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Grant the claim once staged, relay the command's exit, then the verdict or a stop."""
        try:
            grant = await asyncio.shield(self._grant)
        except StepEnded as err:
            await send_step(writer, StepRefused(str(err)))
            return
        await send_step(writer, grant)
        log.info("%s claimed by %s", self.name, self.claimed_by)
        exited = asyncio.ensure_future(recv_step(reader))
        try:
            await _first([exited, self._stop])
            if not exited.done():
                await send_step(writer, StepStop(self._stop.result()))
                return
            try:
                message = exited.result()
            except (ProtocolError, OSError) as err:
                message = None
                log.warning("%s: its step sent garbage: %s", self.name, err)
            if not isinstance(message, StepExited):
                self._lose("the batch job's step died before it said how its command exited")
                return
            if not self._exited.done():
                self._exited.set_result(message)
            await _first([self._verdict, self._stop])
            if self._verdict.done():
                await send_step(writer, self._verdict.result())
            else:
                await send_step(writer, StepStop(self._stop.result()))
        finally:
            exited.cancel()

    def _lose(self, why: str) -> None:
        if not self._exited.done():
            self._exited.set_exception(StepEnded(why))


async def _first(futures: list[asyncio.Future[Any]]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


def _observe(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a run nobody claimed is no error to log


class TaskSteps:
    """The daemon's external runs awaiting (or under) a claim, and the sockets claims come in."""

    def __init__(self) -> None:
        self.staged: dict[RunKey, ExternalStep] = {}
        self._ended: OrderedDict[RunKey, str] = OrderedDict()
        self._servers: dict[Path, asyncio.Server] = {}  # by socket path
        self._connections: set[asyncio.Task[None]] = set()
        self._arrival = asyncio.Event()  # set (and replaced) as each run is expected

    def expect(self, job: str, task: str, attempt: int) -> ExternalStep:
        """An external run starts staging: register it for a claim."""
        key = (job, task, attempt)
        step = ExternalStep(key, self)
        self.staged[key] = step
        self._ended.pop(key, None)
        self._arrival.set()
        self._arrival = asyncio.Event()
        return step

    def ended(self, key: RunKey, why: str) -> None:
        if self.staged.pop(key, None) is not None:
            self._ended[key] = why
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)

    async def open(self, job: str, directory: Path) -> None:
        """Listen for claims of `job`'s runs at `directory/task-step.sock` (0600), and write
        `directory/task-step`, the command that makes one. OSError when it cannot."""
        path = directory / SOCKET
        name, fd = unix_path(path)
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._accept(job, r, w), path=name
            )
        finally:
            if fd is not None:
                os.close(fd)
        self._servers[path] = server
        os.chmod(path, 0o600)  # in a 0700 directory: nobody else reached it meanwhile
        script = directory / SCRIPT
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(script, flags, 0o700), "w") as f:
            f.write(script_text(path))
        os.chmod(script, 0o700)

    async def close(self, directory: Path) -> None:
        """No more claims through `directory`'s socket (runs already claimed go on)."""
        path = directory / SOCKET
        server = self._servers.pop(path, None)
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                (directory / SCRIPT).unlink()

    async def close_all(self) -> None:
        """The daemon stops: every socket and every claim's connection."""
        for path in list(self._servers):
            await self.close(path.parent)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _accept(self, job: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._connection(job, reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(
        self, job: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        step: ExternalStep | None = None
        try:
            try:
                claim = await asyncio.wait_for(recv_step(reader), CLAIM_READ_S)
            except (ProtocolError, TimeoutError) as err:
                await send_step(writer, StepRefused(f"expected a step_claim: {err}"))
                return
            if not isinstance(claim, StepClaim):
                what = "nothing" if claim is None else f"a {claim.TYPE!r}"
                await send_step(writer, StepRefused(f"expected a step_claim, got {what}"))
                return
            if claim.job == job:
                await self._arrived((claim.job, claim.task, claim.attempt))
            refusal = self._refusal(job, claim)
            if refusal:
                log.warning("task-step claim refused: %s", refusal)
                await send_step(writer, StepRefused(refusal))
                return
            step = self.staged[(claim.job, claim.task, claim.attempt)]
            step.claimed_by = _peer_of(writer)
            await step._serve(reader, writer)
        except (ConnectionError, OSError) as err:
            log.info("task-step connection: %s", err)
            if step is not None:
                step._lose(f"the batch job's step died before it reported: {err}")
        finally:
            if step is not None:
                step._lose("the batch job's step died before it said how its command exited")
                step.connection_closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _arrived(self, key: RunKey) -> None:
        """Until the run is known here (staged or ended), for UNSTAGED_WAIT_S at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNSTAGED_WAIT_S
        while key not in self.staged and key not in self._ended:
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), left)

    def _refusal(self, job: str, claim: StepClaim) -> str:
        """Why `claim` cannot have its run ("" when it can)."""
        what = f"run {claim.task!r} attempt {claim.attempt} of job {claim.job}"
        if claim.job != job:
            return f"this socket serves job {job}'s runs, not {what}"
        key = (claim.job, claim.task, claim.attempt)
        step = self.staged.get(key)
        if step is None:
            if key in self._ended:
                return f"{what} can no longer be claimed: it ended ({self._ended[key]})"
            return (
                f"no {what} was staged on this peer (the coordinator sends it with "
                "launch=external before it submits the batch job)"
            )
        if step.claimed_by:
            return f"{what} is already claimed, by {step.claimed_by}"
        return ""


def _peer_of(writer: asyncio.StreamWriter) -> str:
    """Who is at the other end of a unix socket connection: its pid (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError, struct.error):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _, _ = struct.unpack("3i", creds)
        return f"the step of pid {pid}"
    return "a step"
