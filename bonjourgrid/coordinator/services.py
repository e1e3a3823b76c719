"""Service runs, the coordinator's side: `ServiceControl` (backends/base.py) over peer links.

A backend's deployment starts middleware daemons on the peers it holds
(`start_service(peer, spec)`) and stops them (`stop_service`). This turns each call into a
`service_start` or `service_stop` on the peer's control link (over the job's CURVE channel:
the only one secrets travel on), and waits, with a deadline, for the reply that the
coordinator's shell hands over with `deliver`. It owns no socket: the shell gives it `send`
(a message to a named peer) and routes `service_up`, `service_failed` and `service_exited`
here. A service that dies on its own is logged and told to `on_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bonjourgrid import wire
from bonjourgrid.backends.base import ServiceSpec, ServiceStarted
from bonjourgrid.errors import BonjourGridError, ProtocolError
from bonjourgrid.protocol import (
    SERVICE_READY_S,
    Message,
    ServiceExited,
    ServiceFailed,
    ServiceStart,
    ServiceStop,
    ServiceUp,
)

log = logging.getLogger(__name__)

# A peer gives a daemon SERVICE_READY_S to be ready, then says so; this covers the reply's way.
START_TIMEOUT_S = SERVICE_READY_S + 10.0
STOP_TIMEOUT_S = 15.0  # a stop takes the worker's grace period and a SIGKILL: seconds at most

SendToPeer = Callable[[str, Message], Awaitable[None]]


class ServiceError(BonjourGridError):
    """A service run could not be started or stopped on a peer; the message says why."""


_Reply = ServiceUp | ServiceFailed | ServiceExited


class PeerServices:
    """`ServiceControl` for one job: starts and stops service runs on the peers it holds."""

    def __init__(
        self,
        job: str,
        send: SendToPeer,
        on_exit: Callable[[str, ServiceExited], None] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.job = job
        self._send = send
        self._on_exit = on_exit
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._waiting: dict[tuple[str, str], asyncio.Future[_Reply]] = {}
        self.running: dict[tuple[str, str], ServiceStarted] = {}  # (peer, name) -> as it began

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted:
        """Start `spec` on `peer`; the ports it got. ServiceError when it does not come up."""
        where = f"service {spec.name!r} on peer {peer}"
        try:
            # Checked here as the peer will check it: a bad spec is the backend's bug, told now.
            message = ServiceStart(
                self.job,
                spec.name,
                tuple(spec.argv),
                dict(spec.files),
                dict(spec.secrets),
                tuple(spec.ports),
                dict(spec.env),
                spec.ready_file,
                task_steps=spec.task_steps,
            )
            wire.decode(wire.encode(message))
        except ProtocolError as err:
            raise ServiceError(f"{where} cannot be sent: {err}") from None
        reply = await self._ask(peer, spec.name, message, self.start_timeout_s, "start")
        if isinstance(reply, ServiceFailed):
            raise ServiceError(f"{where} did not start: {reply.reason}")
        if isinstance(reply, ServiceExited):  # cannot come before `service_up`; a bug if so
            raise ServiceError(f"{where} exited ({reply.exit_code}) as it started")
        missing = set(spec.ports) - set(reply.ports)
        if missing:
            raise ServiceError(f"{where} came up without the ports {sorted(missing)}")
        started = ServiceStarted(peer, spec.name, dict(reply.ports), reply.directory)
        self.running[(peer, spec.name)] = started
        return started

    async def stop_service(self, peer: str, name: str) -> None:
        """Stop service `name` on `peer` with its process group; returns once it is gone.
        A service that is not running (it exited, or never started) is stopped already."""
        if (peer, name) not in self.running:
            return
        reply = await self._ask(
            peer, name, ServiceStop(self.job, name), self.stop_timeout_s, "stop"
        )
        self.running.pop((peer, name), None)
        if isinstance(reply, ServiceFailed):  # it was not running there any more
            log.info("service %s on peer %s: %s", name, peer, reply.reason)

    def deliver(self, peer: str, message: Message) -> bool:
        """A message from `peer`: True when it was a service reply (then it is handled)."""
        if not isinstance(message, ServiceUp | ServiceFailed | ServiceExited):
            return False
        if message.job != self.job:
            return True
        key = (peer, message.name)
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif isinstance(message, ServiceExited) and not message.stopped:
            self.running.pop(key, None)
            log.warning(
                "service %s on peer %s exited on its own (%d): %s",
                message.name,
                peer,
                message.exit_code,
                message.log_tail[-500:],
            )
            if self._on_exit is not None:
                self._on_exit(peer, message)
        else:
            log.info("peer %s: unexpected %s for service %s", peer, message.TYPE, message.name)
        return True

    def peer_lost(self, peer: str, reason: str) -> None:
        """`peer` is gone (its services with it): waits on it end with a ServiceError."""
        for key in [k for k in self._waiting if k[0] == peer]:
            waiter = self._waiting.pop(key)
            if not waiter.done():
                waiter.set_exception(ServiceError(f"peer {peer} was lost: {reason}"))
        for key in [k for k in self.running if k[0] == peer]:
            del self.running[key]

    async def _ask(
        self, peer: str, name: str, message: Message, timeout_s: float, what: str
    ) -> _Reply:
        key = (peer, name)
        if key in self._waiting:
            raise ServiceError(f"service {name!r} on peer {peer}: a {what} is already under way")
        waiter: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        try:
            await self._send(peer, message)
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            if isinstance(message, ServiceStart):  # it may come up later: it must not linger
                with contextlib.suppress(Exception):
                    await self._send(peer, ServiceStop(self.job, name))
            raise ServiceError(
                f"peer {peer} did not answer the {what} of service {name!r} within {timeout_s:g} s"
            ) from None
        finally:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]
