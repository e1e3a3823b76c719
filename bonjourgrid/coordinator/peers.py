"""The coordinator's peers: recruiting them, keeping them, losing them, handing them back.

`PeerPool` is a part the `Coordinator` (`shell.py`) builds and holds. It owns the control
links to the held peers and their timeouts, and is handed callbacks: an event sink for the
core, a spawn function, the job's cancel, and a router for what peers send that is not its
own business (task messages go to the backend's `WorkerChannel`, prefetch reports to the
coordinator's data plane). A first recruitment starts from a one-shot query of the LAN that
ends once the answers stop (`SNAPSHOT_QUIET_S`), then follows the long-lived browser.
Recruitment asks the LAN's idle peers that fit the job (`recruit.py` filters and ranks
them), first what their caches hold of the job's inputs (`probe`), then for a leased
reservation (`reserve`, which hands over the job's CURVE key), each step asked of every
candidate at once (joins are still announced in rank order);
heartbeats renew the leases, report what each peer runs (PeerRunning) and notice a peer gone
silent; `release` hands a peer back. Every change reaches the scheduler core as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.backends.worker_events import Unreadable
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.journal import ResumePlan
from bonjourgrid.coordinator.model import PeerJoined
from bonjourgrid.coordinator.recruit import JobNeeds, explain_shortage, rank, select_candidates
from bonjourgrid.discovery.advertise import resolve_interfaces
from bonjourgrid.discovery.browse import PeerBrowser, snapshot_peers
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.errors import ConfigError, ProtocolError, RecruitError
from bonjourgrid.keys import Keypair
from bonjourgrid.protocol import (
    Denied,
    Error,
    Heartbeat,
    HeartbeatAck,
    Holding,
    Message,
    Probe,
    Release,
    Reserve,
    Reserved,
    Source,
    attempt_of,
)

log = logging.getLogger(__name__)

# Module constants with their unit; tests shrink them.
HEARTBEAT_S = 1.0  # how often a coordinator renews its leases
LEASE_S = 10.0  # a peer whose coordinator is silent this long returns to idle
PEER_TIMEOUT_S = 5.0  # a peer silent this long is lost: its tasks go elsewhere
RUN_ACK_TIMEOUT_S = 5.0  # a run its peer has not acknowledged (`started`) by then failed
DISCOVERY_S = 2.0  # how long to browse before recruiting with the peers seen so far
_FRAMES_IN_A_ROW = 64  # frames a link's reader takes before it lets the loop run others
SNAPSHOT_S = 0.5  # how long a new coordinator listens for peers before recruiting
RESERVE_TIMEOUT_S = 2.0  # a peer that does not answer a reservation by then is skipped
PROBE_TIMEOUT_S = 0.3  # a candidate that does not say what it caches by then caches nothing
# A new coordinator asks the LAN once for its peers and recruits as soon as the answers stop
# coming: SNAPSHOT_QUIET_S after the last one, at most SNAPSHOT_S after the question.
# Responders answer a one-shot question at once, so on a LAN every idle peer has answered
# within a round trip; one that answers later is found by the long-lived browser, and
# recruited when the job wants more peers (`recruit` again).
SNAPSHOT_QUIET_S = 0.1
# A peer that denied a reservation (held by another job, its owner back) is asked again this
# long after, while the first recruitment still waits for peers: its TXT may have said idle
# before it was reserved, or it may be free again at once (a dead coordinator's lease ran out).
DENIED_RETRY_S = 0.5
# Probes and reservations in flight at once: a LAN full of peers that never answer (fakes, a
# host gone without a goodbye) costs a few timeouts, not one timeout each in turn (2,000
# silent candidates: 4 probe timeouts). Each ask holds a zmq socket (the context allows 1023)
# and two descriptors: `_asks_at_once` keeps to a quarter of the open-file limit.
RECRUIT_CONCURRENCY = 512
STALL_S = 10.0  # ready tasks with no peer able to run them for this long fail the job
MAX_LEASE_S = 3600.0  # workers refuse longer leases
RELEASE_LINGER_MS = 300  # how long a release of an unwanted grant may take to leave


@dataclass(frozen=True)
class Timeouts:
    """How fast a dead peer is noticed and a dead coordinator's peers are freed."""

    peer_timeout_s: float = PEER_TIMEOUT_S  # a peer silent this long is lost
    lease_s: float = LEASE_S  # a peer whose coordinator is silent this long is idle again

    def __post_init__(self) -> None:
        if not 0 < self.peer_timeout_s <= MAX_LEASE_S:
            raise ConfigError(f"--peer-timeout {self.peer_timeout_s:g}: give 0 < S <= 3600")
        if not 2 * self.heartbeat_s <= self.lease_s <= MAX_LEASE_S:
            raise ConfigError(
                f"--lease {self.lease_s:g}: give {2 * self.heartbeat_s:g} <= S <= 3600 (a lease "
                f"must outlive two heartbeats, sent every {self.heartbeat_s:g} s)"
            )

    @property
    def heartbeat_s(self) -> float:
        """How often leases are renewed and peers checked: a few times per peer timeout."""
        return min(HEARTBEAT_S, self.peer_timeout_s / 4)

    @property
    def run_ack_s(self) -> float:
        """How long a peer has to acknowledge a run (`started`) before the attempt fails."""
        return min(self.peer_timeout_s, RUN_ACK_TIMEOUT_S)


@dataclass
class PeerLink:
    """One recruited peer: its control connection and what we know of it.

    Frames come in through `sock.recv`, then `received` while more are waiting: a
    synchronous shadow of the socket takes a frame already there with no future and no loop
    turn (pyzmq's asyncio wrapper costs several times the receive itself, and a tiny task's
    `started` and `task_done` often arrive together). Only receives take that way, and only
    while no asyncio receive waits: zmq's socket descriptor is edge-triggered, and a
    synchronous send could consume the edge a waiting asyncio receive needs (pyzmq's own
    sends check for that; a shadow's would not).
    """

    record: PeerRecord
    sock: zmq.asyncio.Socket
    data_source: Source | None = None
    our_address: str = "127.0.0.1"  # our address on the route to this peer
    last_heard: float = field(default_factory=time.monotonic)
    reader: asyncio.Task[None] | None = None
    _direct: zmq.Socket[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._direct = zmq.Socket.shadow(self.sock.underlying)

    async def send(self, frame: bytes) -> None:
        """Send `frame` to the peer."""
        await self.sock.send(frame)

    def received(self) -> bytes | None:
        """The next frame if one has already arrived, else None (then await `sock.recv`)."""
        try:
            return self._direct.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None


class PeerPool:
    """The peers the job holds: recruiting them, their control links, heartbeats, losing
    and releasing them.

    Handed what it needs: `sink` takes the core events it makes (PeerJoined, PeerLost,
    PeerRunning), `spawn` runs a background task of the job, `cancel` stops the job, and
    `route` takes every other message a peer sends (task messages, prefetch reports), or an
    `Unreadable` one that names its run; `route` returns False once the peer is gone with it
    (it lost the peer, or a `PeerGone` will): its link is read no more.
    """

    def __init__(
        self,
        *,
        job: str,
        needs: JobNeeds,
        timeouts: Timeouts,
        ctx: zmq.asyncio.Context,
        client_keys: Keypair | None,
        job_keys: Keypair | None,
        sink: Callable[[core.Event], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        cancel: Callable[[str], None],
        route: Callable[[str, Message | Unreadable], bool],
        interface: str | None = None,
        expected_peers: int | None = None,
        resume: ResumePlan | None = None,
    ) -> None:
        self.job = job
        self.needs = needs
        self.timeouts = timeouts
        self.ctx = ctx
        self.client_keys = client_keys
        self.job_keys = job_keys
        self._sink = sink
        self._spawn = spawn
        self.cancel = cancel
        self._route = route
        self.interface = interface
        self.expected_peers = expected_peers  # --local: stop browsing once these are seen
        self.resume = resume
        self.links: dict[str, PeerLink] = {}
        self.used: dict[str, PeerRecord] = {}  # every peer the job held, for the report
        # The job's input contents (digest -> size) whose holders recruitment prefers
        # (`seek`): the staged sources, and what a resumed job hopes to find in caches.
        self._sources: dict[str, int] = {}
        self._from_caches: dict[str, int] = {}
        # What candidates said their caches hold of the job's inputs (`probe`), by identity.
        self._cached: dict[tuple[str, str, str], frozenset[str]] = {}
        self._silent: set[tuple[str, str, str]] = set()  # candidates that never answered
        self._denied: dict[tuple[str, str, str], float] = {}  # candidates that said no, when

    def seek(self, sources: Mapping[str, int], from_caches: Mapping[str, int]) -> None:
        """The job's inputs (digest -> size) and the contents a resumed job hopes to find
        in peers' caches: candidates holding them are recruited first."""
        self._sources = dict(sources)
        self._from_caches = dict(from_caches)

    async def recruit(self, browser: PeerBrowser, wanted: int, initial: bool = False) -> int:
        return await self._recruit(browser, wanted, initial)

    async def _recruit(self, browser: PeerBrowser, wanted: int, initial: bool = False) -> int:
        """Reserve up to `wanted` more peers, best first; at the start, at least workers_min."""
        deadline = time.monotonic() + (DISCOVERY_S if self.expected_peers is None else 15.0)
        seed: list[PeerRecord] = []
        expected = self.expected_peers
        if initial and expected is not None:
            # Local workers are starting with us: wait until all of them are up.
            await browser.wait_until(
                lambda peers: len(select_candidates(peers, self.needs).candidates) >= expected,
                max(0.0, deadline - time.monotonic()),
            )
        elif initial:
            # A one-shot query hears every peer within a round trip, while the long-lived
            # browser's first answers may be paced by responders for up to a second.
            seed = await snapshot_peers(
                resolve_interfaces(self.interface), wait=SNAPSHOT_S, quiet=SNAPSHOT_QUIET_S
            )

        def known() -> list[PeerRecord]:
            # The browser's view is the newer, but a name may be claimed by two services
            # (an impostor, a restarted peer): keep every distinct endpoint and key.
            fresh = browser.peers()
            seen = {_identity(p) for p in fresh}
            return [*fresh, *(p for p in seed if _identity(p) not in seen)]

        tried: set[tuple[str, str, str]] = set()
        granted = 0

        def untried(peers: list[PeerRecord]) -> list[PeerRecord]:
            fitting = select_candidates(peers, self.needs).candidates
            retry_from = time.monotonic() - DENIED_RETRY_S
            return [
                p
                for p in fitting
                if p.name not in self.links
                and (
                    _identity(p) not in tried or self._denied.get(_identity(p), 1e18) <= retry_from
                )
            ]

        # A resumed job's peers may still be held by the coordinator that died: they are
        # idle again when its lease runs out, so they are worth waiting for that long.
        previous = self.resume.journal if self.resume else None
        held_until = deadline + (previous.lease_s if previous else 0.0)

        def held_by_previous() -> bool:
            return previous is not None and any(
                p.state == "reserved" and p.job == previous.job for p in known()
            )

        sizes = dict(self._sources)
        sizes.update(self._from_caches)

        def cached_bytes(peer: PeerRecord) -> int:
            return sum(sizes[d] for d in self._cached.get(_identity(peer), ()))

        # Sticky: a held peer turns idle when the dead job's lease runs out, maybe just before
        # the deadline is checked; it is then worth the next retry, not a RecruitError.
        previous_held = False
        while True:
            previous_held = previous_held or held_by_previous()
            candidates = untried(known())
            await self._probe(candidates)
            # Best first, but a peer that stayed silent once is asked after every other one.
            ranked = sorted(
                rank(candidates, self.needs, cached_bytes),
                key=lambda p: _identity(p) in self._silent,
            )
            silent = sum(_identity(p) in self._silent for p in ranked)
            log.info("recruiting from %d candidate(s), %d of them silent", len(ranked), silent)
            granted += await self._reserve_in_rounds(ranked, wanted - granted, tried, deadline)
            short = len(self.links) < self.needs.workers_min
            remaining = deadline - time.monotonic()
            if remaining <= 0 and initial and short and (previous_held or held_by_previous()):
                remaining = held_until - time.monotonic()
            # Lost a race for a peer, or not all peers seen yet: wait for other candidates.
            if not initial or not short or remaining <= 0:
                break
            # A denial may be lifted without any change on mDNS: look again now and then.
            wait = min(remaining, DENIED_RETRY_S) if self._denied else remaining
            await browser.wait_until(lambda peers: bool(untried(peers)), wait)
        if initial and len(self.links) < self.needs.workers_min:
            seen = known()
            await self.release_all()
            raise RecruitError(
                explain_shortage(seen, select_candidates(seen, self.needs), self.needs, granted)
            )
        return granted

    async def _reserve_in_rounds(
        self,
        ranked: list[PeerRecord],
        wanted: int,
        tried: set[tuple[str, str, str]],
        deadline: float,
    ) -> int:
        """Reserve up to `wanted` of `ranked` (best first); how many granted.

        Each round asks at once the best untried candidates for what is still missing, so the
        best peers are asked first and no more are reserved than wanted; a round of peers
        known to be silent is as wide as RECRUIT_CONCURRENCY (they seldom grant; one that
        does beyond the need is released at once). Rounds stop at `deadline` (after the
        first): N silent peers cost about N / RECRUIT_CONCURRENCY timeouts, not N.
        """
        granted = 0
        queue = list(ranked)
        first = True
        while queue and (first or time.monotonic() < deadline):
            need = min(wanted - granted, self.needs.workers_max - len(self.links))
            if need <= 0:
                break
            width = _asks_at_once() if _identity(queue[0]) in self._silent else need
            batch, queue = queue[:width], queue[width:]
            tried.update(_identity(r) for r in batch)
            quota = _Quota(need)

            def keep(quota: _Quota = quota) -> bool:
                return len(self.links) < self.needs.workers_max and quota.take()

            joined = await asyncio.gather(*(self._reserve(r, keep) for r in batch))
            # Announced in rank order, not in the order the grants came back: the core
            # offers work to the peers it knows in the order they joined (cheapest first).
            for event in joined:
                if event is not None:
                    self._sink(event)
                    granted += 1
            first = False
        return granted

    async def _probe(self, records: list[PeerRecord]) -> None:
        """Ask candidates which of the job's input contents their caches hold: recruitment
        ranks on it and placement starts from it. One that does not answer is remembered as
        silent. At most RECRUIT_CONCURRENCY at once, best ranked first."""
        digests = sorted(
            {digest for digest, size in self._sources.items() if size > 0} | set(self._from_caches)
        )
        todo = [r for r in records if _identity(r) not in self._cached]
        if not todo:
            return
        wanted = set(digests)
        gate = asyncio.Semaphore(_asks_at_once())  # FIFO: asked in rank order

        async def ask(record: PeerRecord) -> None:
            async with gate:
                sock = wire.client_socket(
                    self.ctx, self.client_keys, record.key, wire.MAX_CONTROL_FRAME
                )
                held: frozenset[str] = frozenset()
                try:
                    sock.connect(record.endpoint())
                    await sock.send(wire.encode(Probe(tuple(digests[: wire.MAX_LIST]))))
                    if await sock.poll(PROBE_TIMEOUT_S * 1000):
                        msg = wire.decode(await sock.recv())
                        if isinstance(msg, Holding):
                            held = frozenset(d for d in msg.digests if d in wanted)
                    else:
                        self._silent.add(_identity(record))
                except (ProtocolError, TypeError, zmq.ZMQError) as err:
                    log.info("peer %s did not say what it caches: %s", record.name, err)
                finally:
                    sock.close(linger=0)
                self._cached[_identity(record)] = held

        await asyncio.gather(*(ask(r) for r in todo))

    async def _reserve(
        self, record: PeerRecord, keep: Callable[[], bool] = lambda: True
    ) -> PeerJoined | None:
        """Ask one peer for a leased reservation: the event announcing it if it is ours now,
        else None. A grant that `keep()` refuses (the job has enough peers by then) is handed
        back at once."""
        sock = wire.client_socket(self.ctx, self.client_keys, record.key, wire.MAX_CONTROL_FRAME)
        sock.routing_id = control_routing_id(self.job)
        sock.connect(record.endpoint())
        job_keys = self.job_keys
        reply = None
        try:
            await sock.send(
                wire.encode(
                    Reserve(
                        self.job,
                        self.timeouts.lease_s,
                        socket.gethostname(),
                        job_keys.public.decode() if job_keys else "",
                        job_keys.secret.decode() if job_keys and job_keys.secret else "",
                    )
                )
            )
            if await sock.poll(RESERVE_TIMEOUT_S * 1000):
                with contextlib.suppress(ProtocolError):
                    reply = wire.decode(await sock.recv())
        except asyncio.CancelledError:
            # Stopped while waiting (Ctrl-C): the peer may grant all the same, and its lease
            # would hold it for nothing. The release goes out on the same connection.
            _release_and_close(sock, self.job)
            raise
        if not isinstance(reply, Reserved) or reply.job != self.job:
            why = reply.reason if isinstance(reply, Denied) else "no answer"
            if isinstance(reply, Denied):
                self._denied[_identity(record)] = time.monotonic()
            if reply is None:
                self._silent.add(_identity(record))
            log.info("peer %s not recruited: %s", record.name, why)
            sock.close(linger=0)
            return None
        if not keep():
            log.info("peer %s granted beyond what the job needs: released at once", record.name)
            _release_and_close(sock, self.job)
            return None
        address = record.addresses[0]
        link = PeerLink(record, sock, our_address=address_towards(address))
        link.data_source = Source(f"tcp://{address}:{reply.data_port}", record.key, record.name)
        self.adopt(link)
        cached = self._cached.get(_identity(record), frozenset())
        log.info("recruited %s (%d cpus)", record.name, reply.cpus)
        return PeerJoined(record.name, reply.cpus, record.attrs(), cached)

    def adopt(self, link: PeerLink) -> None:
        """Hold the peer behind `link` (reserved for the job) and read what it sends."""
        self.links[link.record.name] = link
        self.used[link.record.name] = link.record
        link.reader = self._spawn(self._read(link))

    async def send(self, peer: str, message: Message) -> bool:
        """Send `message` to `peer`; False if the job holds no link to it."""
        link = self.links.get(peer)
        if link is None:
            return False
        await link.send(wire.encode(message))
        return True

    async def _read(self, link: PeerLink) -> None:
        name = link.record.name
        sink = self._sink
        route = self._route
        in_a_row = 0  # frames taken without yielding to the loop
        while True:
            try:
                frame = link.received() if in_a_row < _FRAMES_IN_A_ROW else None
                if frame is None:
                    in_a_row = 0
                    frame = await link.sock.recv()
            except zmq.ZMQError as err:  # closed under us: the link was dropped meanwhile
                self.lose(name, f"its connection failed: {err}")
                return
            in_a_row += 1
            link.last_heard = time.monotonic()
            try:
                match wire.decode(frame):
                    case HeartbeatAck(running=running):
                        sink(core.PeerRunning(name, frozenset(running)))
                    case Error(reason=reason):
                        log.warning("peer %s: %s", name, reason)
                    case msg:
                        if not route(name, msg):
                            return
            except Exception as err:  # one peer's message must never hang or stop the job
                if not isinstance(err, ProtocolError):
                    log.exception("peer %s: could not handle its message", name)
                why = f"peer {name} sent a bad message: {err}"
                about = attempt_of(frame)
                if about is None:
                    self.lose(name, why)
                    return
                if not route(name, Unreadable(about[2], about[3], why)):
                    return

    async def heartbeats(self) -> None:
        """Renew the leases of the held peers; a peer silent too long is lost."""
        timeouts = self.timeouts
        while True:
            await asyncio.sleep(timeouts.heartbeat_s)
            now = time.monotonic()
            for name, link in list(self.links.items()):
                if now - link.last_heard > timeouts.peer_timeout_s:
                    self.lose(name, f"silent for {timeouts.peer_timeout_s:g} s")
                else:
                    await link.send(wire.encode(Heartbeat(self.job, timeouts.lease_s)))

    def lose(self, name: str, reason: str) -> None:
        """Drop the link to `name` (gone, silent, or misbehaving): the core hears PeerLost."""
        link = self.links.pop(name, None)
        if link is None:
            return
        log.warning("lost peer %s: %s", name, reason)
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()
        link.sock.close(linger=0)
        self._sink(core.PeerLost(name, reason))

    async def release(self, name: str) -> None:
        """Hand `name` back (the core no longer needs it)."""
        link = self.links.pop(name, None)
        if link is None:
            return
        if link.reader is not None:
            link.reader.cancel()
        # Fire and forget: the lease expires anyway if this message is lost.
        await link.send(wire.encode(Release(self.job)))
        self._spawn(_close_after_reply(link.sock))

    async def release_all(self) -> None:
        for name in list(self.links):
            await self.release(name)


def _asks_at_once() -> int:
    """RECRUIT_CONCURRENCY, or less if this process may not open that many descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return RECRUIT_CONCURRENCY
    return max(16, min(RECRUIT_CONCURRENCY, soft // 4))


class _Quota:
    """How many more grants one reservation round keeps."""

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _release_and_close(sock: zmq.asyncio.Socket, job: str) -> None:
    """Hand back a reservation we will not use, without waiting: the message leaves within
    RELEASE_LINGER_MS (or the lease frees the peer)."""
    with contextlib.suppress(zmq.ZMQError):
        sock.send(wire.encode(Release(job)), flags=zmq.NOBLOCK)
    sock.close(linger=RELEASE_LINGER_MS)


async def _close_after_reply(sock: zmq.asyncio.Socket, wait_s: float = 1.0) -> None:
    with contextlib.suppress(Exception):
        await sock.poll(wait_s * 1000)
    sock.close(linger=0)


def control_routing_id(job: str) -> bytes:
    """How a coordinator names itself to a peer: unguessable. The job name is public (TXT)
    and ROUTER_HANDOVER gives an identity to whoever claims it last, so a name alone would
    let another grid member take over the reservation."""
    return f"{job}-{secrets.token_hex(16)}".encode()


def _identity(peer: PeerRecord) -> tuple[str, str, str]:
    """What tells two services claiming one name apart."""
    return (peer.name, peer.endpoint(), peer.key)


def address_towards(peer_ip: str) -> str:
    """Our own address on the route to `peer_ip` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_ip, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
