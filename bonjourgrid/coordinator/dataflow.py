"""The coordinator's data plane: the job's files between the submit directory and the peers.

A part the `Coordinator` (`shell.py`) builds and holds, for every backend whose data goes
through bgrid's caches (`Capabilities.data`): the scheduler core decides what moves where
(`Prefetch`, `Collect`, the holders of each content); `DataMover` carries it out. It turns
the holders the core names into wire sources (the coordinator's data server, or a peer's),
sends prefetch orders on the peers' control links, reads their prefetch reports, and brings
collected outputs into the submit directory through a partial file (a `kill -9` leaves only
`.bgrid/partial/*.part`, which the next submit removes). It reads the pool's links and is
handed an event sink for the core; it counts the bytes it moves in the job's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from bonjourgrid import wire
from bonjourgrid.cache.store import FileIndex, FileRef, hash_file
from bonjourgrid.cache.transfer import Fetcher
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.files import COORDINATOR
from bonjourgrid.coordinator.peers import PeerLink
from bonjourgrid.errors import TransferError
from bonjourgrid.keys import Keypair
from bonjourgrid.protocol import Prefetch, Prefetched, PrefetchFile, Source

log = logging.getLogger(__name__)


class DataMover:
    """Sources, prefetches and collection of one job's files."""

    def __init__(
        self,
        *,
        job: str,
        root: Path,
        index: FileIndex,
        fetcher: Fetcher,
        keypair: Keypair | None,
        links: Mapping[str, PeerLink],
        at_coordinator: set[str],
        bytes_moved: dict[str, int],
        sink: Callable[[core.Event], None],
    ) -> None:
        self.job = job
        self.root = root  # the submit directory
        self.partial_dir = root / ".bgrid" / "partial"
        self.index = index  # what the coordinator's data server serves
        self.fetcher = fetcher
        self.keypair = keypair
        self.links = links  # the pool's links to the held peers
        self.at_coordinator = at_coordinator  # contents the coordinator serves (core.files)
        self.bytes = bytes_moved  # the job's byte counters, for the report
        self._sink = sink
        self.port = 0  # the data server's port, once bound

    def prefetched(self, peer: str, msg: Prefetched) -> core.Event:
        """A peer's report of a prefetch, as the core's event."""
        if msg.source and msg.source != COORDINATOR:
            self.bytes["peer_to_peer"] += msg.bytes
        if msg.error:
            log.info("prefetch of %s to %s failed: %s", msg.digest[:12], peer, msg.error[:200])
            return core.PrefetchFailed(peer, msg.digest, msg.error)
        return core.FileArrived(peer, msg.digest)

    def sources(self, peer: str, digest: str, names: Sequence[str]) -> tuple[Source, ...]:
        """Where `peer` fetches `digest` from (the data servers named by the core), for the
        wire; none if the job no longer holds `peer`."""
        link = self.links.get(peer)
        return () if link is None else self._wire_sources(digest, names, link)

    def _wire_sources(
        self, digest: str, names: Sequence[str], link: PeerLink
    ) -> tuple[Source, ...]:
        """The data servers named by the core, for the wire."""
        out = []
        links = self.links
        for name in names:
            if name == COORDINATOR:
                key = self.keypair.public.decode() if self.keypair else ""
                endpoint = f"tcp://{link.our_address}:{self.port}"
                out.append(Source(endpoint, key, COORDINATOR))
            elif (holder := links.get(name)) is not None and holder.data_source is not None:
                out.append(holder.data_source)
        if not out and digest in self.at_coordinator:
            return self._wire_sources(digest, [COORDINATOR], link)
        return tuple(out)

    async def prefetch(
        self, peer: str, files: tuple[tuple[FileRef, tuple[str, ...]], ...], why: str
    ) -> None:
        link = self.links.get(peer)
        if link is None:
            return
        items = tuple(
            PrefetchFile(ref, self._wire_sources(ref.digest, names, link)) for ref, names in files
        )
        log.debug("prefetch to %s (%s): %d file(s)", peer, why, len(items))
        await link.send(wire.encode(Prefetch(self.job, items)))

    async def collect(
        self, task: str, peer: str, attempt: int, outputs: tuple[tuple[str, FileRef], ...]
    ) -> None:
        """Bring a task's outputs into the submit directory, then tell the core.

        Whatever goes wrong is a CollectFailed (the attempt fails, the job goes on): nothing
        may leave the core waiting for an answer. The paths and digests were checked by
        `decode`, and the paths against the task's declared outputs (`WorkerEvents`).
        """
        link = self.links.get(peer)
        try:
            if link is None or link.data_source is None:
                raise TransferError(f"peer {peer} is gone")
            for path, ref in outputs:
                dest = self.root / path
                if await asyncio.to_thread(_holds, dest, ref):
                    self.index.add(dest, ref)  # a rerun made the same bytes: nothing to move
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.partial_dir.mkdir(parents=True, exist_ok=True)
                # The pid says whose it is: a later submit removes it only once we are gone.
                partial = self.partial_dir / (
                    f"{ref.digest}.{os.getpid()}.{secrets.token_hex(4)}.part"
                )
                twin = self.index.locate(ref.digest)
                if twin is not None and twin.is_file():
                    shutil.copyfile(twin, partial)  # same bytes already here: not fetched again
                else:
                    await self.fetcher.fetch(ref, [link.data_source], partial)
                    self.bytes["to_submitter"] += ref.size
                os.replace(partial, dest)
                self.index.add(dest, ref)
        except asyncio.CancelledError:
            raise
        except (TransferError, OSError) as err:
            self._sink(core.CollectFailed(task, attempt, str(err)))
            return
        except Exception as err:
            log.exception("collecting the outputs of %s failed", task)
            self._sink(core.CollectFailed(task, attempt, f"{type(err).__name__}: {err}"))
            return
        self._sink(core.OutputsCollected(task, attempt))


def remove_stale_partials(directory: Path) -> int:
    """Remove the partial downloads that dead coordinators left (`kill -9` mid-collection);
    those of a live one (another submit in this directory) stay. How many went."""
    removed = 0
    try:
        entries = list(directory.glob("*.part"))
    except OSError:
        return 0
    for path in entries:
        parts = path.name.split(".")
        owner = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d partial file(s) a dead coordinator left in %s", removed, directory)
    return removed


def _holds(path: Path, ref: FileRef) -> bool:
    """Whether `path` is a regular file with exactly these bytes (hashing reads it once)."""
    try:
        return (
            path.is_file()
            and not path.is_symlink()
            and path.stat().st_size == ref.size
            and (hash_file(path) == ref)
        )
    except OSError:
        return False
