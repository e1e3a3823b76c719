"""The backend's deployment side, driven by what the peer pool does.

The pool recruits, holds and loses peers; the core places tasks on the peers it has heard
of. Between the two sits the deployment: a peer reaches the core (`PeerJoined`) only once
the backend can run tasks on it.

- The peers of the first recruitment are held back until `deploy` has run over all of them
  at once (a middleware's controller is configured with its first nodes); then they join
  the core together. For `native`, `deploy` does nothing: the core saw those peers at the
  same moment before, as the loop only starts driving the core after that recruitment.
- A peer recruited later joins once `add_peer` has run; if that fails, it is handed back
  and the core never hears of it.
- A peer the core releases is removed from the backend first (a middleware stops its
  daemons while the link to the worker is still there), then handed back.
- A lost peer is told to the core at once, and removed from the backend on the side; its
  service calls in flight end with an error.
- `teardown` runs before the pool hands the remaining peers back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from bonjourgrid.backends.base import Backend, HeldPeer
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.services import PeerServices
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.errors import RecruitError

log = logging.getLogger(__name__)


def held_peer(record: PeerRecord) -> HeldPeer:
    """A recruited peer as a backend sees it, from its TXT record."""
    return HeldPeer(
        name=record.name,
        address=record.addresses[0] if record.addresses else "",
        cpus=record.cpus,
        ram=record.ram,
        middleware=frozenset(record.mw),
    )


class DeploymentError(RecruitError):
    """The backend could not deploy over the first peers: the job cannot start."""


class Deployment:
    def __init__(
        self,
        backend: Backend,
        services: PeerServices,
        records: Mapping[str, PeerRecord],
        sink: Callable[[core.Event], None],
        spawn: Callable[[Awaitable[None]], asyncio.Task[None]],
        hand_back: Callable[[str], Awaitable[None]],
    ) -> None:
        self.backend = backend
        self.services = services
        self._records = records  # the pool's records of the peers it holds or held
        self._sink = sink
        self._spawn = spawn
        self._hand_back = hand_back
        self._held_back: list[core.PeerJoined] | None = []  # None once deployed
        self._in_backend: set[str] = set()
        self._removals: set[asyncio.Task[None]] = set()  # remove_peer calls under way
        self._torn_down: asyncio.Event | None = None  # set once teardown has begun

    @property
    def name(self) -> str:
        return self.backend.name

    def from_pool(self, event: core.Event) -> None:
        """The pool's sink: peers join the core through the backend."""
        match event:
            case core.PeerJoined() if self._held_back is not None:
                self._held_back.append(event)
            case core.PeerJoined():
                self._spawn(self._add(event))
            case core.PeerLost(peer=peer) if self._held_back is not None and any(
                joined.peer == peer for joined in self._held_back
            ):
                # Lost before the core ever heard of it: it simply never joins.
                self._held_back = [j for j in self._held_back if j.peer != peer]
                self.services.peer_lost(peer, event.reason)
            case core.PeerLost(peer=peer, reason=reason):
                self.services.peer_lost(peer, reason)
                if peer in self._in_backend:
                    self._spawn(self._remove(peer, f"lost: {reason}"))
                self._sink(event)
            case _:
                self._sink(event)

    async def deploy(self) -> None:
        """Deploy over the peers of the first recruitment, then let them join the core."""
        joining, self._held_back = self._held_back or [], None
        peers = [held_peer(self._records[j.peer]) for j in joining if j.peer in self._records]
        began = time.monotonic()
        try:
            await self.backend.deploy(peers)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise DeploymentError(
                f"the {self.name} backend could not deploy over "
                f"{', '.join(p.name for p in peers) or 'no peer'}: {err}"
            ) from err
        if self.backend.capabilities.services:
            log.info("%s deployed over %d peer(s) in %.1f s", self.name, len(peers),
                     time.monotonic() - began)  # fmt: skip
        self._in_backend.update(p.name for p in peers)
        for joined in joining:
            self._sink(joined)

    def deployed(self) -> tuple[HeldPeer, ...]:
        """The peers the backend runs on now."""
        return tuple(
            held_peer(self._records[name])
            for name in sorted(self._in_backend)
            if name in self._records
        )

    async def _add(self, joined: core.PeerJoined) -> None:
        record = self._records.get(joined.peer)
        try:
            if record is None:
                raise LookupError("the pool holds no record of it")
            await self.backend.add_peer(held_peer(record))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("peer %s could not join the %s backend: %s", joined.peer, self.name, err)
            await self._hand_back(joined.peer)
            return
        self._in_backend.add(joined.peer)
        self._sink(joined)

    async def _remove(self, peer: str, reason: str) -> None:
        self._in_backend.discard(peer)
        log.debug("removing peer %s from the %s backend: %s", peer, self.name, reason)
        try:
            await self.backend.remove_peer(peer, reason)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the peer goes anyway: its lease ends what is left
            log.warning("removing peer %s from the %s backend: %s", peer, self.name, err)

    async def release(self, peer: str) -> None:
        """The core no longer needs `peer`: out of the backend, then handed back. Once the
        teardown has begun, handed back only after it (the middleware's daemons on the
        peer stop first, with the jobs they still finish)."""
        if peer in self._in_backend and self._torn_down is None:
            removal = asyncio.ensure_future(self._remove(peer, "released"))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)
            await removal
        if self._torn_down is not None:
            await self._torn_down.wait()
        await self._hand_back(peer)

    async def teardown(self) -> None:
        """Stop what the backend started; every peer goes back to idle after this. Removals
        under way finish first (they stop their peer's daemons)."""
        self._torn_down = asyncio.Event()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        self._in_backend.clear()
        began = time.monotonic()
        try:
            await self.backend.teardown()
        except Exception as err:  # the peers' leases end whatever is left
            log.warning("tearing the %s backend down: %s", self.name, err)
        self._torn_down.set()
        if self.backend.capabilities.services:
            log.info("%s torn down in %.1f s", self.name, time.monotonic() - began)
