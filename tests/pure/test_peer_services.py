"""The coordinator's ServiceControl without a network: what it sends, and what it makes of
the replies, of silence and of a lost peer. (The same class against a real worker daemon:
tests/inproc/test_service_runs.py.)"""

from __future__ import annotations

import asyncio

import pytest

from bonjourgrid.backends.base import ServiceSpec
from bonjourgrid.coordinator.services import PeerServices, ServiceError
from bonjourgrid.protocol import (
    Message,
    ServiceExited,
    ServiceFailed,
    ServiceStart,
    ServiceStop,
    ServiceUp,
)

SPEC = ServiceSpec("slurmd", ("slurmd", "-D", "-p", "{port:slurmd}"), ports=("slurmd",))


class Link:
    """What PeerServices sends; `answer` replies as the peer would, if set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.services: PeerServices | None = None
        self.answer: Message | None = None

    async def send(self, peer: str, message: Message) -> None:
        self.sent.append((peer, message))
        if self.answer is not None and self.services is not None:
            # The reply arrives on the shell's reader, later.
            asyncio.get_running_loop().call_soon(self.services.deliver, peer, self.answer)


def services(link: Link, **kw: float) -> PeerServices:
    link.services = PeerServices("job-1", link.send, **kw)
    return link.services


async def test_a_started_service_reports_its_ports_and_directory() -> None:
    link = Link()
    control = services(link)
    link.answer = ServiceUp("job-1", "slurmd", {"slurmd": 6818}, "/c/sandboxes/service-1/s")
    started = await control.start_service("p1", SPEC)
    assert (started.peer, started.ports, started.directory) == (
        "p1",
        {"slurmd": 6818},
        "/c/sandboxes/service-1/s",
    )
    ((peer, sent),) = link.sent
    assert peer == "p1" and isinstance(sent, ServiceStart) and sent.argv == SPEC.argv


async def test_a_failed_start_is_a_clear_error() -> None:
    link = Link()
    control = services(link)
    link.answer = ServiceFailed("job-1", "slurmd", "'slurmd' exited (1) before it wrote 'up'")
    with pytest.raises(ServiceError, match="service 'slurmd' on peer p1 did not start: 'slurmd'"):
        await control.start_service("p1", SPEC)


async def test_a_bad_spec_is_refused_before_anything_is_sent() -> None:
    link = Link()
    bad = ServiceSpec("slurmd", ("slurmd", "{port:other}"))
    with pytest.raises(ServiceError, match=r"cannot be sent: .*asks for no port 'other'"):
        await services(link).start_service("p1", bad)
    assert link.sent == []


async def test_a_silent_peer_fails_the_start_and_is_told_to_stop_it() -> None:
    link = Link()
    with pytest.raises(ServiceError, match="peer p1 did not answer the start of service 'slurmd'"):
        await services(link, start_timeout_s=0.05).start_service("p1", SPEC)
    assert [type(m) for _, m in link.sent] == [ServiceStart, ServiceStop]


async def test_a_lost_peer_ends_the_wait() -> None:
    link = Link()
    control = services(link)
    waiting = asyncio.create_task(control.start_service("p1", SPEC))
    await asyncio.sleep(0)
    control.peer_lost("p1", "preempted: its owner came back")
    with pytest.raises(ServiceError, match="peer p1 was lost: preempted"):
        await waiting


async def test_stop_waits_for_the_exit_and_a_service_dying_alone_is_told() -> None:
    link = Link()
    exits: list[tuple[str, ServiceExited]] = []
    control = PeerServices("job-1", link.send, on_exit=lambda p, m: exits.append((p, m)))
    link.services = control
    link.answer = ServiceUp("job-1", "slurmd", {"slurmd": 6818}, "/d")
    await control.start_service("p1", SPEC)
    link.answer = ServiceExited("job-1", "slurmd", -15, True, "")
    await control.stop_service("p1", "slurmd")
    assert isinstance(link.sent[-1][1], ServiceStop) and control.running == {}
    await control.stop_service("p1", "slurmd")  # not running: nothing to send
    assert len(link.sent) == 2

    link.answer = ServiceUp("job-1", "slurmd", {"slurmd": 6818}, "/d")
    await control.start_service("p1", SPEC)
    died = ServiceExited("job-1", "slurmd", 1, False, "fatal: ...")
    assert control.deliver("p1", died) is True
    assert exits == [("p1", died)] and control.running == {}
    assert control.deliver("p1", ServiceStop("job-1", "x")) is False  # not a service reply
