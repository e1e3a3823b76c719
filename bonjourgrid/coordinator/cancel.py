"""`bgrid cancel JOB`: stop a running job from any terminal of the grid.

The coordinator binds a job-control ROUTER: a CURVE server with the coordinator's own
keypair whose ZAP domain `jobctl` admits only the grid key, so only grid members can stop
a job (plain in `--insecure` mode). It advertises that socket's port, and its public key as
the `key` TXT entry, in the job's mDNS record. `bgrid cancel` finds the job with a one-shot
query, connects with the grid keypair and sends `cancel_job`; the coordinator answers
`cancelling` (or `error`) and stops the job, which releases every peer.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import socket
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.discovery.advertise import InterfacesType
from bonjourgrid.discovery.browse import snapshot_jobs
from bonjourgrid.discovery.txt import JobRecord
from bonjourgrid.errors import BonjourGridError, ProtocolError
from bonjourgrid.keys import load_grid_key
from bonjourgrid.protocol import CancelJob, Cancelling, Error, Message

log = logging.getLogger(__name__)

JOBCTL_DOMAIN = "jobctl"  # ZAP domain of the job-control socket
REPLY_TIMEOUT_S = 5.0  # how long `bgrid cancel` waits for the coordinator's answer
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


def find_job(jobs: Sequence[JobRecord], name: str) -> JobRecord:
    """The job called `name`, or the only running job of the workflow called `name`."""
    exact = [j for j in jobs if j.job == name]
    if exact:
        return next((j for j in exact if j.state == "running"), exact[0])
    of_workflow = [j for j in jobs if j.job.rsplit("-", 1)[0] == name and j.state == "running"]
    if len(of_workflow) == 1:
        return of_workflow[0]
    if of_workflow:
        names = ", ".join(sorted(j.job for j in of_workflow))
        raise JobNotFound(f"{name!r} names {len(of_workflow)} running jobs ({names}): pick one")
    raise JobNotFound(
        f"no job named {name!r} answered on the LAN: `bgrid status` lists the running jobs "
        "(check --interface, or listen longer with --wait)"
    )


async def cancel_job(
    name: str, interfaces: InterfacesType, wait: float = 1.0, timeout: float = REPLY_TIMEOUT_S
) -> str:
    """Ask the coordinator of job `name` to stop it; what happened, for the user."""
    record = find_job(await snapshot_jobs(interfaces, wait=wait), name)
    if record.state != "running":
        raise CancelFailed(f"job {record.job} has already ended ({record.state})")
    # A secure job's coordinator only listens to holders of the grid's secret key.
    keypair = load_grid_key(need_secret=True).keypair() if record.key else None
    ctx = zmq.asyncio.Context()
    try:
        sock = wire.client_socket(ctx, keypair, record.key, wire.MAX_CONTROL_FRAME)
        sock.connect(record.endpoint())
        await sock.send(wire.encode(CancelJob(record.job, _who())))
        reply = None
        if await sock.poll(timeout * 1000):
            with contextlib.suppress(ProtocolError):
                reply = wire.decode(await sock.recv())
    finally:
        ctx.destroy(linger=0)
    where = record.endpoint().removeprefix("tcp://")
    if reply is None:
        raise CancelFailed(
            f"the coordinator of job {record.job} ({where}) did not answer within {timeout:g} s: "
            "it may have just ended, or it serves another grid than this desktop's key (a job "
            "on an embedded --local grid stops only with Ctrl-C in its terminal)"
        )
    if isinstance(reply, Cancelling) and reply.job == record.job:
        return f"job {record.job}: cancelling; its coordinator ({where}) releases every peer"
    reason = reply.reason if isinstance(reply, Error) else f"unexpected {reply.TYPE!r} reply"
    raise CancelFailed(f"the coordinator of job {record.job} refused: {reason}")


def _who() -> str:
    user = "someone"
    with contextlib.suppress(Exception):
        user = getpass.getuser()
    return f"{user}@{socket.gethostname()}"
