"""Moving content-addressed files between processes: a data server and a fetcher.

The protocol is pull-only. A fetcher asks a server for byte ranges (`get`) and keeps at most
`window` requests in flight per transfer; the server answers each with one `chunk`. So the
server never pushes more than was asked for (back-pressure), a slow disk or link only slows
its own transfer, and a fetcher can move on to the next source the moment one fails.
Every file is verified against its SHA-256 before it is committed anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.keys import Keypair

log = logging.getLogger(__name__)

_MAX_OFFSET = 2**63 - 1  # what pread takes: a bigger offset is a ProtocolError, not a crash
_WINDOW = 8  # chunks in flight per transfer
_CHUNK_TIMEOUT_S = 10.0  # no chunk for this long: the source is dead or stuck, try the next


@dataclass(frozen=True)
class Source:
    """A data server that may hold a file: its endpoint and CURVE public key (Z85)."""

    endpoint: str
    server_key: str
    label: str  # who it is, for accounting: "coordinator" or a peer name


class DataServer:
    """Serves byte ranges of the files `locate(digest)` finds, on a ROUTER socket."""

    def __init__(self, sock: zmq.asyncio.Socket, locate: Callable[[str], Path | None]) -> None:
        self._sock = sock
        self._locate = locate
        self.bytes_served = 0

    async def serve_forever(self) -> None:
        await wire.serve(self._sock, "data server", self._handle, limit=4096)

    async def _handle(self, client: bytes, msg: dict[str, Any]) -> bytes:
        try:
            return self._answer(msg)
        except OSError as err:
            log.warning("data server: cannot read: %s", err)
            return wire.encode("error", reason="read failed")

    def _answer(self, msg: dict[str, object]) -> bytes:
        if msg["t"] != "get":
            raise ProtocolError(f"a data server only answers 'get', not {msg['t']!r}")
        digest, offset, size = str(msg["digest"]), int(msg["offset"]), int(msg["size"])  # type: ignore[call-overload]
        if not 0 <= offset < _MAX_OFFSET or not 0 < size <= wire.CHUNK_SIZE:
            raise ProtocolError(f"bad range offset={offset} size={size}")
        path = self._locate(digest)
        if path is None:
            return wire.encode("missing", digest=digest)
        # A chunk is at most 1 MiB from the page cache: reading it inline costs less than a
        # thread hop, and keeps chunks of one transfer in order.
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        self.bytes_served += len(data)
        return wire.encode("chunk", digest=digest, offset=offset, data=data)


class Fetcher:
    """Pulls files from data servers, trying sources in order, verifying every byte."""

    def __init__(self, ctx: zmq.asyncio.Context, keypair: Keypair | None) -> None:
        self._ctx = ctx
        self._keypair = keypair
        self._idle: dict[tuple[str, str], list[zmq.asyncio.Socket]] = defaultdict(list)
        self.bytes_from: dict[str, int] = defaultdict(int)

    def close(self) -> None:
        for socks in self._idle.values():
            for sock in socks:
                sock.close(linger=0)
        self._idle.clear()

    async def fetch(self, ref: FileRef, sources: Sequence[Source], partial: Path) -> Source:
        """Write the verified file to `partial`; return the source it came from."""
        problems = []
        for source in sources:
            try:
                await self._fetch_from(ref, source, partial)
                return source
            except TransferError as err:
                problems.append(f"{source.label}: {err}")
                partial.unlink(missing_ok=True)
            except BaseException:  # a full disk, a cancellation: leave no half file behind
                partial.unlink(missing_ok=True)
                raise
        raise TransferError(
            f"could not fetch {ref.digest[:12]} ({ref.size} bytes) from any source: "
            + ("; ".join(problems) or "no source given")
        )

    async def _fetch_from(self, ref: FileRef, source: Source, partial: Path) -> None:
        sock = self._checkout(source)
        healthy = False
        try:
            await self._pull(sock, ref, partial)
            healthy = True
        finally:
            if healthy:
                self._idle[(source.endpoint, source.server_key)].append(sock)
            else:
                sock.close(linger=0)  # it may still have replies in flight: never reuse it
        self.bytes_from[source.label] += ref.size

    def _checkout(self, source: Source) -> zmq.asyncio.Socket:
        idle = self._idle[(source.endpoint, source.server_key)]
        if idle:
            return idle.pop()
        sock = wire.client_socket(self._ctx, self._keypair, source.server_key, wire.MAX_DATA_FRAME)
        sock.connect(source.endpoint)
        return sock

    async def _pull(self, sock: zmq.asyncio.Socket, ref: FileRef, partial: Path) -> None:
        sha = hashlib.sha256()
        next_offset = 0
        received = 0
        in_flight = 0
        partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while received < ref.size:
                while in_flight < _WINDOW and next_offset < ref.size:
                    size = min(wire.CHUNK_SIZE, ref.size - next_offset)
                    await sock.send(
                        wire.encode("get", digest=ref.digest, offset=next_offset, size=size)
                    )
                    next_offset += size
                    in_flight += 1
                if not await sock.poll(_CHUNK_TIMEOUT_S * 1000):
                    raise TransferError(f"no data for {_CHUNK_TIMEOUT_S:g} s")
                try:
                    msg = wire.decode(await sock.recv(), limit=wire.MAX_DATA_FRAME)
                except ProtocolError as err:
                    raise TransferError(f"bad reply: {err}") from err
                in_flight -= 1
                if msg["t"] == "missing":
                    raise TransferError("source does not hold the file")
                if msg["t"] != "chunk" or msg["digest"] != ref.digest or msg["offset"] != received:
                    raise TransferError(f"unexpected reply {msg['t']!r}")
                data: bytes = msg["data"]
                if len(data) != min(wire.CHUNK_SIZE, ref.size - received):
                    raise TransferError("chunk of the wrong size (truncated source?)")
                os.pwrite(fd, data, received)
                sha.update(data)
                received += len(data)
        finally:
            os.close(fd)
        if sha.hexdigest() != ref.digest:
            raise TransferError("content does not match its digest (corrupt source): discarded")
