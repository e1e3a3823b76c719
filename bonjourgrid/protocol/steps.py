"""The task-step messages: `bgrid task-step` and the worker on the same peer, over a unix socket.

A middleware's job (a Slurm batch job) runs `bgrid task-step`, which claims an external run
the worker staged (`Run.launch == "external"`) and runs its command itself:

    task-step                          worker
    step_claim(job, task, attempt) ->
                                   <-  step_granted(sandbox, command, env, logs, limits)
                                       | step_refused(reason)
    (runs the command)                 (may send step_stop(reason) at any time: cancelled,
    step_exited(exit_code, run_s)  ->   the lease ended, the owner came back)
                                   <-  step_verdict(exit_code, stored, reason)

Each message is one frame of the wire's kind (msgpack map, checked by `decode`), prefixed
on the stream by its length in 4 bytes, big-endian. The socket is local and 0600, but what
comes over it is still checked: a claim names a run, never a path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bonjourgrid.errors import ProtocolError
from bonjourgrid.protocol.fields import (
    ATTEMPT,
    JOB,
    MAX_CONTROL_FRAME,
    SECONDS,
    TASK,
    TEXT,
    _command,
    _directory,
    _env,
    _f,
    _flag,
    _int,
    _limits,
)
from bonjourgrid.protocol.messages import Message, _message, decode, encode

_LENGTH = 4  # bytes of the length prefix
EXIT_CODE = _f(lambda v, w: _int(v, w, -(2**31), 2**31))
PATH = _f(_directory)


@_message
@dataclass(frozen=True)
class StepClaim(Message):
    """task-step -> worker: the run this step will run."""

    TYPE = "step_claim"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)


@_message
@dataclass(frozen=True)
class StepGranted(Message):
    """worker -> task-step: the run's inputs are in `sandbox`; run `command` there under
    /bin/sh with `env`, stdout and stderr to those files, under `limits` (worker/limits.py)."""

    TYPE = "step_granted"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)
    sandbox: str = field(metadata=PATH)
    command: str = field(metadata=_f(_command))
    env: dict[str, str] = field(metadata=_f(_env))
    stdout: str = field(metadata=PATH)
    stderr: str = field(metadata=PATH)
    limits: dict[str, int] = field(metadata=_f(_limits))


@_message
@dataclass(frozen=True)
class StepRefused(Message):
    """worker -> task-step: no such run to claim here; `reason` says why."""

    TYPE = "step_refused"
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class StepExited(Message):
    """task-step -> worker: the command ended (`exit_code` as Popen's: -N for signal N)."""

    TYPE = "step_exited"
    exit_code: int = field(metadata=EXIT_CODE)
    run_s: float = field(metadata=SECONDS)
    out_of_time: bool = field(metadata=_f(_flag))  # killed at its wall-clock limit


@_message
@dataclass(frozen=True)
class StepVerdict(Message):
    """worker -> task-step: the run was reported to the coordinator; exit with `exit_code`
    (0 only when the command exited 0 and its outputs are stored)."""

    TYPE = "step_verdict"
    exit_code: int = field(metadata=EXIT_CODE)
    stored: bool = field(metadata=_f(_flag))
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class StepStop(Message):
    """worker -> task-step: stop the command now (the run was cancelled or the peer left the
    job); no verdict follows."""

    TYPE = "step_stop"
    reason: str = field(metadata=TEXT)


StepMessage = StepClaim | StepGranted | StepRefused | StepExited | StepVerdict | StepStop


async def send_step(writer: asyncio.StreamWriter, message: StepMessage) -> None:
    frame = encode(message)
    writer.write(len(frame).to_bytes(_LENGTH, "big") + frame)
    await writer.drain()


async def recv_step(reader: asyncio.StreamReader) -> StepMessage | None:
    """The next message, or None at the end of the stream; ProtocolError on a bad frame."""
    try:
        head = await reader.readexactly(_LENGTH)
    except asyncio.IncompleteReadError as err:
        if err.partial:
            raise ProtocolError("the stream ended inside a length prefix") from None
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_CONTROL_FRAME:
        raise ProtocolError(f"a frame of {size} bytes is over the {MAX_CONTROL_FRAME}-byte limit")
    try:
        frame = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the stream ended inside a frame") from None
    message = decode(frame)
    if not isinstance(message, StepMessage):
        raise ProtocolError(f"a {message.TYPE!r} message is not a task-step message")
    return message
