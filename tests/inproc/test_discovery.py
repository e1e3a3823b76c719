"""Discovery with real python-zeroconf, confined to 127.0.0.1 (multicast works on loopback).

Other test runs may share loopback at the same time, so every test names its services
uniquely and looks them up by name instead of expecting an exact table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf import InterfaceChoice
from zeroconf._dns import DNSPointer
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from bonjourgrid.discovery import (
    JOB_SERVICE,
    PEER_SERVICE,
    Advertiser,
    JobBrowser,
    JobRecord,
    PeerBrowser,
    PeerRecord,
    browse,
    job_txt,
    open_zeroconf,
    peer_txt,
    resolve_interfaces,
    snapshot_peers,
)
from bonjourgrid.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

LOOPBACK = ["127.0.0.1"]
KEY = "rq:rA]Xh#5LE=3e^s*dK^Nj1ewBRcp<]R6o{<Q!+"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def peer(name: str, **changes: object) -> PeerRecord:
    record = PeerRecord(
        name=name,
        addresses=("127.0.0.1",),
        port=5555,
        state="idle",
        job=None,
        cpus=4,
        ram=8192,
        disk=10240,
        cost=0.5,
        arch="x86_64",
        os="linux",
        mw=("native",),
        key=KEY,
        grid="3f9a1c2b7d",
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


class Loopback:
    """Zeroconf instances and advertisers on 127.0.0.1, all torn down at the end."""

    def __init__(self) -> None:
        self.zeroconfs: list[AsyncZeroconf] = []
        self.advertisers: list[Advertiser] = []

    def zeroconf(self) -> AsyncZeroconf:
        zc = open_zeroconf(LOOPBACK)
        self.zeroconfs.append(zc)
        return zc

    async def advertise(
        self, name: str, port: int, txt: dict[str, str], service_type: str = PEER_SERVICE
    ) -> Advertiser:
        advertiser = Advertiser(self.zeroconf(), service_type, name, port, txt)
        self.advertisers.append(advertiser)
        await advertiser.start()
        return advertiser

    async def close(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.advertisers), return_exceptions=True)
        await asyncio.gather(*(zc.async_close() for zc in self.zeroconfs), return_exceptions=True)


@pytest.fixture
async def lan() -> AsyncIterator[Loopback]:
    loopback = Loopback()
    try:
        yield loopback
    finally:
        await loopback.close()


@pytest.fixture
async def peers(lan: Loopback) -> AsyncIterator[PeerBrowser]:
    browser = PeerBrowser(lan.zeroconf())
    await browser.start()
    try:
        yield browser
    finally:
        await browser.stop()


async def timed(
    browser: PeerBrowser, predicate: Callable[[list[PeerRecord]], bool], timeout: float
) -> float | None:
    """Seconds until predicate(peers) held, or None if it did not within timeout."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    if await browser.wait_until(predicate, timeout):
        return loop.time() - started
    return None


async def test_browser_sees_two_peers_with_their_fields(lan: Loopback, peers: PeerBrowser) -> None:
    a, b = unique("lab-a"), unique("lab-b")
    await lan.advertise(a, 5555, peer_txt(peer(a)))
    await lan.advertise(b, 5556, peer_txt(peer(b, cpus=16, ram=32768, mw=("native", "condor"))))

    seen = await timed(peers, lambda _: None not in (peers.get(a), peers.get(b)), timeout=2.0)
    assert seen is not None, f"peers not seen within 2 s: {peers.peers()}"
    first, second = peers.get(a), peers.get(b)
    assert first == peer(a)
    assert first is not None and first.endpoint() == "tcp://127.0.0.1:5555"
    assert second == peer(b, port=5556, cpus=16, ram=32768, mw=("native", "condor"))
    names = [p.name for p in peers.peers()]
    assert names == sorted(names)


async def test_state_change_shows_within_a_second(lan: Loopback, peers: PeerBrowser) -> None:
    name = unique("lab")
    advertiser = await lan.advertise(name, 5555, peer_txt(peer(name)))
    assert await peers.wait_until(lambda _: peers.get(name) is not None, timeout=2.0)

    await advertiser.update(peer_txt(peer(name, state="reserved", job="montage-1")))
    took = await timed(
        peers, lambda _: getattr(peers.get(name), "job", None) == "montage-1", timeout=1.0
    )
    assert took is not None, f"still {peers.get(name)} after 1 s"
    print(f"\nidle -> reserved seen after {took * 1000:.1f} ms")

    # Back to idle at once, as when a coordinator lets a peer go right after reserving it:
    # zeroconf would keep showing the reservation without the advertiser's sequence number.
    await advertiser.update(peer_txt(peer(name, state="busy")))
    await advertiser.update(peer_txt(peer(name)))
    took = await timed(peers, lambda _: peers.get(name) == peer(name), timeout=1.0)
    assert took is not None, f"still {peers.get(name)} after 1 s"
    print(f"reserved -> busy -> idle seen after {took * 1000:.1f} ms")


async def test_stopped_peer_disappears(lan: Loopback, peers: PeerBrowser) -> None:
    name, other = unique("lab"), unique("lab")
    advertiser = await lan.advertise(name, 5555, peer_txt(peer(name)))
    await lan.advertise(other, 5556, peer_txt(peer(other)))
    assert await peers.wait_until(
        lambda _: None not in (peers.get(name), peers.get(other)), timeout=2.0
    )

    await advertiser.stop()
    assert await peers.wait_until(lambda _: peers.get(name) is None, timeout=2.0)
    assert peers.get(other) is not None


async def test_garbage_txt_is_ignored_while_good_peers_show(
    lan: Loopback, peers: PeerBrowser, caplog: pytest.LogCaptureFixture
) -> None:
    garbage, good = unique("garbage"), unique("lab")
    raw = AsyncServiceInfo(
        PEER_SERVICE,
        f"{garbage}.{PEER_SERVICE}",
        port=5555,
        properties={b"v": b"1", b"state": b"idle", b"cpus": b"\xff\xfe", b"cost": b"nan"},
        parsed_addresses=["127.0.0.1"],
    )
    with caplog.at_level(logging.WARNING, logger="bonjourgrid.discovery"):
        await lan.zeroconf().async_register_service(raw)
        await lan.advertise(good, 5556, peer_txt(peer(good)))
        assert await peers.wait_until(lambda _: peers.get(good) is not None, timeout=3.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while garbage not in caplog.text and loop.time() < deadline:
            await asyncio.sleep(0.02)  # polling the log: there is no event for "ignored"
    assert f"ignoring peer {garbage!r}" in caplog.text
    assert garbage not in [p.name for p in peers.peers()]


async def test_hostile_service_names_do_not_break_the_browser(
    lan: Loopback, peers: PeerBrowser
) -> None:
    sender = lan.zeroconf().zeroconf
    await sender.async_wait_for_start()
    good = unique("lab")
    for alias in ["evil.local.", f"bell\x07{good}.{PEER_SERVICE}", f"{'x' * 63}.{PEER_SERVICE}"]:
        answer = DNSOutgoing(0x8400)  # a response, authoritative
        answer.add_answer_at_time(DNSPointer(PEER_SERVICE, 12, 1, 4500, alias), 0)  # PTR, IN
        sender.async_send(answer)
    await lan.advertise(good, 5555, peer_txt(peer(good)))
    assert await peers.wait_until(lambda _: peers.get(good) is not None, timeout=2.0)
    assert [p.name for p in peers.peers() if "evil" in p.name or "bell" in p.name] == []


async def test_table_size_is_bounded(
    lan: Loopback, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(browse, "_MAX_SERVICES", 1)
    small = PeerBrowser(lan.zeroconf())
    await small.start()
    try:
        names = [unique("lab"), unique("lab")]
        await asyncio.gather(*(lan.advertise(n, 5555, peer_txt(peer(n))) for n in names))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while "ignoring the rest" not in caplog.text and loop.time() < deadline:
            await asyncio.sleep(0.02)  # polling the log: there is no event for "ignored"
        assert "ignoring the rest" in caplog.text
        assert len(small.peers()) <= 1
    finally:
        await small.stop()


async def test_same_name_twice_gets_a_second_name(lan: Loopback, peers: PeerBrowser) -> None:
    name = unique("lab")
    first = await lan.advertise(name, 5555, peer_txt(peer(name)))
    second = await lan.advertise(name, 5556, peer_txt(peer(name)))
    assert (first.name, second.name) == (name, f"{name}-2")
    assert await peers.wait_until(
        lambda _: peers.get(name) is not None and peers.get(f"{name}-2") is not None, timeout=2.0
    )


async def test_job_browser_sees_a_job_and_its_progress(lan: Loopback) -> None:
    job = unique("montage")
    record = JobRecord(
        name=job,
        addresses=("127.0.0.1",),
        port=6000,
        job=job,
        state="running",
        tasks=10,
        done=0,
        failed=0,
        running=2,
        peers=2,
        user="alice",
        started=1_732_630_000.0,
    )
    browser = JobBrowser(lan.zeroconf())
    await browser.start()
    try:
        advertiser = await lan.advertise(job, 6000, job_txt(record), service_type=JOB_SERVICE)
        assert await browser.wait_until(lambda _: browser.get(job) == record, timeout=2.0)
        finished = dataclasses.replace(record, state="succeeded", done=10, running=0)
        await advertiser.update(job_txt(finished))
        assert await browser.wait_until(lambda _: browser.get(job) == finished, timeout=1.0)
        assert finished in browser.jobs()
    finally:
        await browser.stop()


async def test_snapshot_lists_the_peers_that_answer(lan: Loopback) -> None:
    name = unique("lab")
    await lan.advertise(name, 5555, peer_txt(peer(name)))
    found = await snapshot_peers(LOOPBACK, wait=1.0)
    assert peer(name) in found


async def test_a_coordinators_snapshot_ends_when_the_answers_stop(lan: Loopback) -> None:
    """A new coordinator's snapshot does not listen for its whole bound (an hour here) once
    every peer has answered: it returns, with each of them."""
    a, b = unique("lab-a"), unique("lab-b")
    await lan.advertise(a, 5555, peer_txt(peer(a)))
    await lan.advertise(b, 5556, peer_txt(peer(b, port=5556)))
    found = await snapshot_peers(LOOPBACK, wait=3600.0, quiet=0.2)
    assert peer(a) in found
    assert peer(b, port=5556) in found


def test_interfaces_come_from_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BGRID_INTERFACES", raising=False)
    assert resolve_interfaces() is InterfaceChoice.All
    assert resolve_interfaces("127.0.0.1") == ["127.0.0.1"]
    monkeypatch.setenv("BGRID_INTERFACES", "127.0.0.1, 127.0.0.1")
    assert resolve_interfaces() == ["127.0.0.1"]
    assert resolve_interfaces("all") is InterfaceChoice.All


@pytest.mark.parametrize("bad", ["eth0", "::1", "192.0.2.77"])
def test_bad_interface_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        resolve_interfaces(bad)


@pytest.mark.parametrize("bad", ["lab.example.org", " lab", "lab\t", "", "x" * 64])
async def test_name_that_cannot_be_advertised_is_a_config_error(lan: Loopback, bad: str) -> None:
    with pytest.raises(ConfigError, match="cannot be advertised"):
        Advertiser(lan.zeroconf(), PEER_SERVICE, bad, 5555, peer_txt(peer("lab")))
