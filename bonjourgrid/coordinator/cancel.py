"""`bgrid cancel JOB`: stop a running job from any terminal of the grid.

The coordinator binds a job-control ROUTER: a CURVE server with the *grid's* keypair whose
ZAP domain `jobctl` admits only the grid key. Both ends thus prove the grid's secret: only
grid members can stop a job, and `bgrid cancel` talks only to a real coordinator of its grid
(plain in `--insecure` mode). The job's mDNS record gives the socket's port (a hint: anyone
can advertise a record). `bgrid cancel` finds the records claiming the job with a one-shot
query, connects to each with the grid's public key pinned and sends `cancel_job`, which zmq
releases only after the handshake; the coordinator answers `cancelling` (or `error`) and
stops the job, which releases every peer. A spoofed record gets a clear error, and nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from bonjourgrid import wire
from bonjourgrid.discovery.advertise import InterfacesType
from bonjourgrid.discovery.browse import snapshot_jobs
from bonjourgrid.discovery.txt import JobRecord
from bonjourgrid.errors import BonjourGridError, ProtocolError
from bonjourgrid.keys import GridKey, key_dir, load_grid_key
from bonjourgrid.protocol import CancelJob, Cancelling, Error, Message

log = logging.getLogger(__name__)

JOBCTL_DOMAIN = "jobctl"  # ZAP domain of the job-control socket
REPLY_TIMEOUT_S = 5.0  # how long `bgrid cancel` waits for the coordinator's answer
VERIFY_TIMEOUT_S = 1.0  # how long `bgrid status` waits for a coordinator's handshake
_MAX_BY = 100  # characters of the canceller's name kept in the job's reason


class JobNotFound(BonjourGridError):
    """No running job of that name answered on the LAN (exit 2)."""

    exit_code = 2


class CancelFailed(BonjourGridError):
    """The job was found but did not confirm the cancel (exit 1)."""


# -- the coordinator's side -------------------------------------------------------------------


async def serve_job_control(
    sock: zmq.asyncio.Socket, job: str, cancel: Callable[[str], None]
) -> None:
    """Answer `cancel_job` requests for `job` on `sock` until cancelled."""

    async def answer(client: bytes, msg: Message) -> bytes:
        if not isinstance(msg, CancelJob):
            raise ProtocolError(f"a coordinator does not take {msg.TYPE!r} messages")
        if msg.job != job:
            raise ProtocolError(f"this coordinator runs job {job}, not {msg.job[:80]!r}")
        by = _printable(msg.by) or "an unnamed client"
        log.warning("job %s: cancel requested by %s", job, by)
        cancel(f"cancelled from {by}")  # queues an event: the reply still goes out first
        return wire.encode(Cancelling(job))

    await wire.serve(sock, "job control", answer)


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:_MAX_BY].strip()


# -- `bgrid cancel` ---------------------------------------------------------------------------


def find_job(jobs: Sequence[JobRecord], name: str) -> list[JobRecord]:
    """The records claiming the job called `name` (or the only running job of the workflow
    called `name`), running ones first. Several records may claim one job: all but one are
    spoofed, and only the coordinator's handshake tells which."""
    exact = [j for j in jobs if j.job == name]
    if exact:
        return sorted(exact, key=lambda j: j.state != "running")
    running = [j for j in jobs if j.job.rsplit("-", 1)[0] == name and j.state == "running"]
    names = sorted({j.job for j in running})
    if len(names) == 1:
        return running
    if names:
        raise JobNotFound(
            f"{name!r} names {len(names)} running jobs ({', '.join(names)}): pick one"
        )
    raise JobNotFound(
        f"no job named {name!r} answered on the LAN: `bgrid status` lists the running jobs "
        "(check --interface, or listen longer with --wait)"
    )


@dataclass(frozen=True)
class _Answer:
    record: JobRecord
    authenticated: bool  # the CURVE handshake proved the grid's key (always True if plain)
    reply: Message | None


async def cancel_job(
    name: str, interfaces: InterfacesType, wait: float = 1.0, timeout: float = REPLY_TIMEOUT_S
) -> str:
    """Ask the coordinator of job `name` to stop it; what happened, for the user."""
    records = find_job(await snapshot_jobs(interfaces, wait=wait), name)
    job = records[0].job
    running = [r for r in records if r.state == "running"]
    if not running:
        raise CancelFailed(f"job {job} has already ended ({records[0].state})")
    grid: GridKey | None = None
    if (key_dir() / "grid.key").exists() or any(r.key for r in running):
        grid = load_grid_key(need_secret=True)  # only grid members may stop a job
    # A coordinator of our grid proves the grid's key itself: a record's `key` is a claim,
    # never trusted. Without a grid key, only --insecure jobs can be asked (in plain text).
    candidates = [r for r in running if bool(r.key) == (grid is not None)]
    if not candidates:
        raise CancelFailed(
            f"job {job} runs {'--insecure, not on your grid' if grid else 'on a secured grid'}: "
            "it can only be stopped from its own grid (or with Ctrl-C in its terminal)"
        )
    ctx = zmq.asyncio.Context()
    try:
        answers = await asyncio.gather(*(_ask(ctx, r, grid, timeout) for r in candidates))
    finally:
        ctx.destroy(linger=0)
    for answer in answers:
        reply, where = answer.reply, answer.record.endpoint().removeprefix("tcp://")
        if isinstance(reply, Cancelling) and reply.job == job:
            return f"job {job}: cancelling; its coordinator ({where}) releases every peer"
    for answer in answers:
        if answer.reply is not None:
            reply = answer.reply
            reason = (
                reply.reason if isinstance(reply, Error) else f"unexpected {reply.TYPE!r} reply"
            )
            raise CancelFailed(f"the coordinator of job {job} refused: {reason}")
    wheres = ", ".join(a.record.endpoint().removeprefix("tcp://") for a in answers)
    if grid is not None and not any(a.authenticated for a in answers):
        raise CancelFailed(
            f"no coordinator of grid {grid.fingerprint} answered for job {job}: the service at "
            f"{wheres} did not prove the grid's key within {timeout:g} s, so nothing was sent "
            "to it. The job's record is spoofed, the job belongs to another grid, or it has "
            "just ended (a job on an embedded --local grid stops only with Ctrl-C)"
        )
    raise CancelFailed(
        f"the coordinator of job {job} ({wheres}) did not answer within {timeout:g} s: it may "
        "have just ended (a job on an embedded --local grid stops only with Ctrl-C)"
    )


# The handshake's outcome, from the socket monitor: a failure ends the wait at once.
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


async def _ask(
    ctx: zmq.asyncio.Context, record: JobRecord, grid: GridKey | None, timeout: float
) -> _Answer:
    """Send `cancel_job` to `record`'s address, pinned to the grid's key; what came back.

    zmq sends the message only once the handshake has proved the server key, so a service
    that cannot prove it never reads who asks, nor that anyone asked."""
    keypair = grid.keypair() if grid is not None else None
    server_key = grid.public.decode() if grid is not None else ""
    sock = wire.client_socket(ctx, keypair, server_key, wire.MAX_CONTROL_FRAME)
    monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS) if grid is not None else None
    authenticated = grid is None
    reply = None
    try:
        sock.connect(record.endpoint())
        await sock.send(wire.encode(CancelJob(record.job, _who())))
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while reply is None and (left := deadline - time.monotonic()) > 0:
            ready = dict(await poller.poll(left * 1000))
            if monitor is not None and monitor in ready:
                event = (await recv_monitor_message(monitor))["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    authenticated = True
                else:
                    log.info("job %s at %s: handshake failed", record.job, record.endpoint())
                    break
            if sock in ready:
                with contextlib.suppress(ProtocolError):
                    reply = wire.decode(await sock.recv())
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
    return _Answer(record, authenticated, reply)


async def verify_jobs(
    records: Sequence[JobRecord], grid: GridKey, timeout: float = VERIFY_TIMEOUT_S
) -> list[bool]:
    """For each record, whether the service it points at proves the grid's key in a
    CurveZMQ handshake (`bgrid status`). Nothing is sent: a handshake alone tells."""
    ctx = zmq.asyncio.Context()
    try:
        return list(await asyncio.gather(*(_proves(ctx, r, grid, timeout) for r in records)))
    finally:
        ctx.destroy(linger=0)


async def _proves(
    ctx: zmq.asyncio.Context, record: JobRecord, grid: GridKey, timeout: float
) -> bool:
    if not record.key:
        return False  # an --insecure job: no key to prove
    sock = wire.client_socket(ctx, grid.keypair(), grid.public.decode(), wire.MAX_CONTROL_FRAME)
    monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    try:
        sock.connect(record.endpoint())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not await monitor.poll(left * 1000):
                break
            event = (await recv_monitor_message(monitor))["event"]
            # Only success proves anything: a service without the key may still answer
            # a HELLO with an ERROR command, which reads as an authentication failure.
            return bool(event == zmq.EVENT_HANDSHAKE_SUCCEEDED)
        return False
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def _who() -> str:
    user = "someone"
    with contextlib.suppress(Exception):
        user = getpass.getuser()
    return f"{user}@{socket.gethostname()}"
