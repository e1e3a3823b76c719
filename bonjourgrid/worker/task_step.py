"""`bgrid task-step`: run, inside a middleware's job, a run the worker on this peer staged.

A Slurm batch job of the slurm backend runs `{dir}/task-step --job J --task T --attempt N`
(the script the worker wrote in its slurmd's directory: worker/task_steps.py). This claims
the run over the worker's socket, runs its command as the worker would have (under /bin/sh
in the sandbox, a session of its own, the task's environment and limits, stdout and stderr
into the files the worker reports from), so that Slurm runs and accounts the process; then
says how it exited and waits for the worker's verdict: the worker stores the outputs and
reports the run to the coordinator. The exit status is the command's, or non-zero when the
outputs could not be stored, so Slurm's afterok follows stored outputs only.

SIGTERM and SIGINT (scancel, a time limit) go to the command's process group. If the worker
stops the run (`step_stop`) or goes away, the command is stopped and the step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from bonjourgrid.errors import ConfigError, ProtocolError
from bonjourgrid.protocol import (
    StepClaim,
    StepExited,
    StepGranted,
    StepRefused,
    StepStop,
    StepVerdict,
    recv_step,
    send_step,
)
from bonjourgrid.worker import reaper
from bonjourgrid.worker.limits import limits_from_wire, task_preexec
from bonjourgrid.worker.sandbox import STOP_GRACE_S
from bonjourgrid.worker.task_steps import unix_path

REFUSED_EXIT = 2  # the worker refused the claim: nothing ran
LOST_EXIT = 1  # the worker went away, or answered nonsense
# What the middleware put in the step's environment that the command may use (the node's
# name, the job's id): passed on, under the task's own environment.
_MIDDLEWARE_ENV = ("SLURM_", "SLURMD_")


def exit_status(code: int) -> int:
    """A process's exit status for a Popen returncode (-N: killed by signal N, as sh says)."""
    return 128 - code if code < 0 else code & 0xFF


def _say(text: str) -> None:
    print(f"bgrid task-step: {text}", file=sys.stderr, flush=True)


async def task_step(socket_path: Path, job: str, task: str, attempt: int) -> int:
    """Claim run `task` attempt `attempt` of `job` and run it; the exit status to exit with."""
    name, fd = unix_path(socket_path)
    try:
        reader, writer = await asyncio.open_unix_connection(name)
    except OSError as err:
        raise ConfigError(
            f"cannot reach the bgrid worker at {socket_path}: {err.strerror or err} "
            "(is the job's service still running on this peer?)"
        ) from None
    finally:
        if fd is not None:
            os.close(fd)
    try:
        await send_step(writer, StepClaim(job, task, attempt))
        reply = await recv_step(reader)
        if isinstance(reply, StepRefused):
            _say(f"the worker refused the claim: {reply.reason}")
            return REFUSED_EXIT
        if not isinstance(reply, StepGranted):
            _say(f"the worker answered {reply.TYPE if reply else 'nothing'} to the claim")
            return LOST_EXIT
        return await _run(reply, reader, writer)
    except (ProtocolError, OSError) as err:
        _say(f"lost the worker: {err}")
        return LOST_EXIT
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _run(
    grant: StepGranted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int:
    limits = limits_from_wire(grant.limits)
    env = {k: v for k, v in os.environ.items() if k.startswith(_MIDDLEWARE_ENV)}
    env.update(grant.env)  # the marker among them, last: the worker finds its processes
    with open(grant.stdout, "wb") as out, open(grant.stderr, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            grant.command,
            cwd=grant.sandbox,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=task_preexec(limits),
        )
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    forwarded = (signal.SIGTERM, signal.SIGINT)
    for sig in forwarded:  # scancel: to the command's whole group
        loop.add_signal_handler(sig, _signal_group, proc.pid, sig)
    word = asyncio.ensure_future(recv_step(reader))  # a stop, or the worker gone
    ended = asyncio.ensure_future(asyncio.wait_for(proc.wait(), limits.wall_s))
    out_of_time = False
    try:
        await asyncio.wait([word, ended], return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            message = None if word.exception() else word.result()
            why = message.reason if isinstance(message, StepStop) else "the worker went away"
            ended.cancel()
            await _end(proc, grace=True)
            _say(f"the run was stopped: {why}")
            return exit_status(-signal.SIGTERM)
        try:
            code = ended.result()
        except TimeoutError:
            out_of_time = True
            await _end(proc, grace=True)
            code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        await _end(proc, grace=False)  # what the shell left in its group
        await send_step(writer, StepExited(code, time.monotonic() - started, out_of_time))
        verdict = await word
    finally:
        for sig in forwarded:
            loop.remove_signal_handler(sig)
        word.cancel()
        ended.cancel()
    if isinstance(verdict, StepStop):
        _say(f"the run was stopped: {verdict.reason}")
        return exit_status(-signal.SIGTERM)
    if not isinstance(verdict, StepVerdict):
        _say("the worker went away before it stored the outputs")
        return LOST_EXIT
    if not verdict.stored:
        _say(verdict.reason)
    return exit_status(verdict.exit_code)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _end(proc: asyncio.subprocess.Process, grace: bool) -> None:
    """End the command's process group: SIGTERM and a grace period first if `grace`."""
    if grace and proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()
    reaper.reap_group(proc.pid)
