"""Live tables of the peers and jobs on the LAN, kept current from mDNS.

python-zeroconf tells us a service was added, updated or removed; the records themselves
are in its cache by then, so most changes are applied in the callback, without waiting.
Two things zeroconf does not do for us: it keeps a PTR for at least 1125 s, so a peer that
died without a goodbye would linger for ~19 minutes; and nothing refreshes SRV/A records.
A periodic sweep re-reads every service from the cache and asks the network again for
those whose records expired (120 s TTL): a dead peer is dropped about two minutes after
its last word, a live one answers and stays.

A snapshot (`snapshot_peers`, `snapshot_jobs`) is a one-shot query (RFC 6762 §5.1): one
question from an ephemeral port, answered straight back by unicast. Nothing says when every
responder has answered, so it listens either for a fixed time (`bgrid peers --wait`), or
until the answers stop coming (`quiet`): a given time after the last new service or record,
with no record still being asked for, bounded by the fixed time. On a LAN, responders answer
a one-shot question at once (no pacing, §6.7), so the answers arrive together within a round
trip and the quiet period is all a coordinator waits past them; a flood of services that
keeps answering is bounded by the fixed time, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    IPVersion,
    ServiceStateChange,
    Zeroconf,
)

# For one question sent at once (`ask_now`): python-zeroconf does not export these.
from zeroconf._dns import DNSQuestion
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_PTR

from bonjourgrid.discovery.advertise import InterfacesType, open_zeroconf
from bonjourgrid.discovery.txt import (
    JOB_SERVICE,
    PEER_SERVICE,
    JobRecord,
    PeerRecord,
    decode_job,
    decode_peer,
)
from bonjourgrid.errors import ProtocolError

log = logging.getLogger(__name__)

_MAX_SERVICES = 10_000  # a flood of fake services cannot grow the table past this
_REQUEST_MS = 1000  # how long a service's records may take before it is left out
_SWEEP_S = 10.0  # how often the cache is re-read (zeroconf expires records this often)
# QM for a browser on port 5353: a unicast answer to a QU question goes to port 5353, which
# several processes on one host share, and the kernel hands it to only one of them.
# QU for a one-shot querier (its own ephemeral port): answers come straight back, without
# the pacing responders apply to multicast (RFC 6762 §14), so a snapshot is quick and whole.
_QUESTION = DNSQuestionType.QM


def _question_for(zc: AsyncZeroconf) -> DNSQuestionType:
    return DNSQuestionType.QU if zc.zeroconf.unicast else _QUESTION


T = TypeVar("T")
Decoder = Callable[[str, Sequence[str], int, Mapping[bytes, bytes | None]], T]


class _ServiceTable(Generic[T]):
    """The valid records of one service type, keyed by lowercased full service name."""

    def __init__(self, zc: AsyncZeroconf, service_type: str, decode: Decoder[T], kind: str):
        self._zc = zc
        self._type = service_type
        self._decode = decode
        self._kind = kind
        self._names: dict[str, str] = {}  # every service zeroconf reports present
        self._records: dict[str, T] = {}  # those that decoded cleanly
        self._decoded: dict[str, tuple[bytes, tuple[str, ...], int]] = {}  # what they said
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        self._browser: AsyncServiceBrowser | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._full = False
        # When the table last heard something new (`settle`), and a wake-up for it.
        self._last_heard = time.monotonic()
        self._heard_now = asyncio.Event()

    async def start(self) -> None:
        """Start browsing; the table fills as answers arrive."""
        if self._browser is not None:
            raise RuntimeError(f"the {self._kind} browser is already running")
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf,
            [self._type],
            handlers=[self._on_change],
            question_type=_question_for(self._zc),
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Stop browsing; the table keeps what it last knew."""
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = [*self._fetches.values(), *([self._sweeper] if self._sweeper else [])]
        self._fetches.clear()
        self._sweeper = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def records(self) -> list[T]:
        """The current valid records, sorted by instance name."""
        return [self._records[key] for key in sorted(self._records)]

    def get(self, name: str) -> T | None:
        """The record of one instance name, if it is present and valid."""
        return self._records.get(f"{name}.{self._type}".lower())

    async def wait_until(self, predicate: Callable[[list[T]], bool], timeout: float) -> bool:
        """Wait until predicate(records) holds; False if it still does not after timeout s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.records()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate(self.records())
        return True

    def ask_now(self) -> None:
        """Send the browse question at once. The browser's own first question waits 20-120 ms
        (RFC 6762 §5.2, so that hosts booting together do not ask together); a one-shot
        query (§5.1) need not."""
        question = DNSQuestion(self._type, _TYPE_PTR, _CLASS_IN)
        question.unicast = _question_for(self._zc) is DNSQuestionType.QU
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(question)
        self._last_heard = time.monotonic()  # the quiet period starts with the question
        self._zc.zeroconf.async_send(out)

    async def settle(self, quiet: float, timeout: float) -> None:
        """Wait until the answers stop coming: `quiet` s without a new service or record and
        with no service's records still being asked for; at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            # A service named but not yet resolved is an answer still on its way.
            wake = deadline if self._fetches else min(deadline, self._last_heard + quiet)
            if now >= wake:
                return
            self._heard_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heard_now.wait(), wake - now)

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        self._heard_now.set()

    def _notify(self) -> None:
        self._heard()
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs inside zeroconf's packet processing: raising here would lose the rest of
        # the packet, other services included, so a hostile name is dropped, not raised.
        key = name.lower()
        self._heard()
        if state_change is ServiceStateChange.Removed:
            self._forget(key)
            return
        if key not in self._names:
            if not self._valid_name(name):
                return
            if len(self._names) >= _MAX_SERVICES:
                if not self._full:
                    log.warning(
                        "more than %d %s services on the LAN: ignoring the rest",
                        _MAX_SERVICES,
                        self._kind,
                    )
                    self._full = True
                return
            self._names[key] = name
        self._refresh(key, ask_network=True)

    def _valid_name(self, name: str) -> bool:
        if name.lower().endswith(f".{self._type.lower()}"):
            try:
                AsyncServiceInfo(self._type, name)
                return True
            except BadTypeInNameException:
                pass
        log.debug("ignoring %s service with a malformed name %r", self._kind, name[:300])
        return False

    def _refresh(self, key: str, ask_network: bool) -> None:
        info = AsyncServiceInfo(self._type, self._names[key])
        if info.load_from_cache(self._zc.zeroconf):
            self._apply(key, info)
        elif ask_network and key not in self._fetches:
            self._fetches[key] = asyncio.create_task(self._fetch(key))

    async def _fetch(self, key: str) -> None:
        info = AsyncServiceInfo(self._type, self._names[key])
        try:
            found = await info.async_request(
                self._zc.zeroconf, _REQUEST_MS, question_type=_question_for(self._zc)
            )
        finally:
            if self._fetches.get(key) is asyncio.current_task():
                del self._fetches[key]
            self._heard()  # answered or not, it is no longer awaited
        if key not in self._names:
            return  # removed while we asked
        if found:
            self._apply(key, info)
        else:
            log.debug("%s %s did not answer within %d ms", self._kind, key, _REQUEST_MS)
            self._drop(key)

    def _apply(self, key: str, info: AsyncServiceInfo) -> None:
        addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
        port = info.port or 0
        said = (info.text, addresses, port)
        if self._decoded.get(key) == said:
            return  # nothing new: no need to decode, or to warn again
        self._decoded[key] = said
        name = self._names[key][: -len(self._type) - 1]  # the browser matched the type
        try:
            record = self._decode(name, addresses, port, info.properties)
        except ProtocolError as err:
            log.warning("ignoring %s %r: %s", self._kind, name, err)
            if self._records.pop(key, None) is not None:
                self._notify()
            return
        if self._records.get(key) != record:
            self._records[key] = record
            self._notify()

    def _drop(self, key: str) -> None:
        self._decoded.pop(key, None)
        if self._records.pop(key, None) is not None:
            self._notify()

    def _forget(self, key: str) -> None:
        self._names.pop(key, None)
        fetch = self._fetches.pop(key, None)
        if fetch is not None:
            fetch.cancel()
        self._drop(key)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            for key in list(self._names):
                if key in self._names:
                    # Only services we hold a record for are worth a question on the air.
                    self._refresh(key, ask_network=key in self._records)


class PeerBrowser(_ServiceTable[PeerRecord]):
    """A live table of the peers on the LAN, kept current from mDNS."""

    def __init__(self, zc: AsyncZeroconf) -> None:
        super().__init__(zc, PEER_SERVICE, decode_peer, "peer")

    def peers(self) -> list[PeerRecord]:
        """The current valid peers, sorted by name."""
        return self.records()


class JobBrowser(_ServiceTable[JobRecord]):
    """A live table of the jobs coordinators advertise on the LAN."""

    def __init__(self, zc: AsyncZeroconf) -> None:
        super().__init__(zc, JOB_SERVICE, decode_job, "job")

    def jobs(self) -> list[JobRecord]:
        """The current valid jobs, sorted by name."""
        return self.records()


async def _snapshot(
    table: Callable[[AsyncZeroconf], _ServiceTable[T]],
    interfaces: InterfacesType,
    wait: float,
    quiet: float | None,
) -> list[T]:
    # A one-shot querier (RFC 6762 §5.1): asking from an ephemeral port gets direct unicast
    # answers, which responders never hold back the way they pace multicast ones (§14).
    async with open_zeroconf(interfaces, one_shot=True) as zc:
        browser = table(zc)
        await browser.start()
        try:
            await zc.zeroconf.async_wait_for_start()  # its sockets: a question needs them
            browser.ask_now()
            if quiet is None:
                await asyncio.sleep(wait)  # listen for the whole time
            else:
                await browser.settle(quiet, wait)
        finally:
            await browser.stop()
        return browser.records()


async def snapshot_peers(
    interfaces: InterfacesType, wait: float = 1.5, quiet: float | None = None
) -> list[PeerRecord]:
    """The peers that answer within `wait` seconds (for `bgrid peers`); with `quiet`, those
    that answered before the answers stopped for `quiet` seconds (for a new coordinator)."""
    return await _snapshot(PeerBrowser, interfaces, wait, quiet)


async def snapshot_jobs(
    interfaces: InterfacesType, wait: float = 1.5, quiet: float | None = None
) -> list[JobRecord]:
    """The jobs advertised within `wait` seconds (for `bgrid status`); `quiet` as for peers."""
    return await _snapshot(JobBrowser, interfaces, wait, quiet)
