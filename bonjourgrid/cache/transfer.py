"""Moving content-addressed files between processes: a data server and a fetcher.

The protocol is pull-only. A fetcher asks a server for byte ranges (`get`) and keeps at most
`window` requests in flight per transfer; the server answers each with one `chunk`. So the
server never pushes more than was asked for (back-pressure), a slow disk or link only slows
its own transfer, and a fetcher can move on to the next source the moment one fails,
carrying on from the offset it had reached.
Every file is verified against its SHA-256 before it is committed anywhere.

Where the time goes: a chunk is received (and decrypted, in libzmq's I/O thread), then
written and hashed. Writing and hashing a 1 MiB chunk costs about as much as receiving it,
and both release the GIL, so a fetch hands each chunk to a writer thread (`_Sink`) and
receives the next one meanwhile: one chunk behind, in order, so the running SHA-256 is the
file's. The event loop never writes or hashes, and other transfers on it are not held up.

Same host: before the first chunk of a file worth it (`_LOCAL_MIN` bytes), a fetcher asks
the server where the file is (`locate`); a server on the same host and file system answers
with its path, and the fetcher copies it in the kernel and hashes its copy instead of
pulling chunks (`cache/same_host.py` says when a path is taken, and why that is safe).

Who may read: a server admits the CURVE keys of its `wire.KeyPolicy` (a peer: the grid's
coordinators and the job that holds its reservation), and a fetch proves the key it is given
(a peer fetching for a job proves that job's keypair).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import itertools
import logging
import mmap
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from bonjourgrid import wire
from bonjourgrid.cache import same_host
from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.keys import Keypair
from bonjourgrid.protocol import Chunk, Error, Get, Locate, Located, Message, Missing, Source

__all__ = ["DataServer", "Fetcher", "Source"]

log = logging.getLogger(__name__)

_MAX_OFFSET = 2**63 - 1  # what pread takes: a bigger offset is a ProtocolError, not a crash
_WINDOW = 8  # chunks in flight per transfer
_CHUNK_TIMEOUT_S = 10.0  # no chunk for this long: the source is dead or stuck, try the next
_MAX_REQUEST = 4096  # bytes: a `get` is tiny; the server's socket drops bigger frames
_WRITER_THREADS = 4  # fetches writing at once; more wait a chunk's time for a thread
_LOCAL_MIN = 256 * 1024  # bytes: a smaller file comes over the wire (a locate costs a trip)
_LOCAL_STEP = 64 * 1024 * 1024  # bytes copied and hashed per turn of a same-host copy
# A refused handshake is silent on the socket itself (libzmq just never delivers a message):
# only its monitor tells, and then at once.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class DataServer:
    """Serves byte ranges of the files `locate(digest)` finds, on a ROUTER socket.

    With a `policy`, each request's CURVE key (the ZAP User-Id) is checked against it again:
    the handshake alone would let a connection opened with a key that is no longer admitted
    (a job's, after its reservation ended) go on reading.
    """

    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        locate: Callable[[str], Path | None],
        policy: wire.KeyPolicy | None = None,
        host: str | None = None,
    ) -> None:
        self._sock = sock
        self._locate = locate
        self._policy = policy
        # This host's identity: a `locate` from the same host gets the file's path.
        self._host = same_host.host_identity() if host is None else host
        # Bytes handed out: sent in chunks, or as files whose path went to a fetcher on this
        # host (it copies them; one that refuses its copy takes the chunks too: counted twice).
        self.bytes_served = 0
        self.bytes_located = 0  # of those, bytes of files handed over by path

    async def serve_forever(self) -> None:
        """Answer requests until cancelled; whatever a client sends, the loop goes on."""
        admit = self._admitted if self._policy is not None else None
        await wire.serve(self._sock, "data server", self._handle, _MAX_REQUEST, admit)

    def _admitted(self, frame: zmq.Frame) -> bool:
        assert self._policy is not None
        try:
            key = frame.get("User-Id")
        except zmq.ZMQError:  # no ZAP handshake on this connection: nobody vouched for it
            return False
        return isinstance(key, str) and self._policy.callback("data", key.encode())

    async def _handle(self, client: bytes, msg: Message) -> bytes:
        try:
            return self._answer(msg)
        except OSError as err:
            log.warning("data server: cannot read: %s", err)
            return wire.encode(Error("read failed"))

    def _answer(self, msg: Message) -> bytes:
        if isinstance(msg, Locate):
            path = self._locate(msg.digest) if self._host and msg.host == self._host else None
            if path is None:
                return wire.encode(Located(msg.digest, ""))
            size = path.stat().st_size
            self.bytes_served += size
            self.bytes_located += size
            return wire.encode(Located(msg.digest, str(path.absolute())))
        if not isinstance(msg, Get):
            raise ProtocolError(f"a data server only answers 'get', not {msg.TYPE!r}")
        digest, offset, size = msg.digest, msg.offset, msg.size
        if not 0 <= offset < _MAX_OFFSET or not 0 < size <= wire.CHUNK_SIZE:
            raise ProtocolError(f"bad range offset={offset} size={size}")
        path = self._locate(digest)
        if path is None:
            return wire.encode(Missing(digest))
        # A chunk is at most 1 MiB from the page cache: reading it inline costs less than a
        # thread hop, and keeps chunks of one transfer in order.
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        self.bytes_served += len(data)
        return wire.encode(Chunk(digest, offset, data))


class _Corrupt(TransferError):
    """The whole file arrived and its digest does not match."""


_monitor_ids = itertools.count()


class _Connection:
    """A DEALER to one data server; until the server first answers, its handshake is watched."""

    def __init__(self, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        self.sock = sock
        self.monitor: zmq.asyncio.Socket | None = None
        try:
            # A name of our own, not pyzmq's default (from the socket's fd): a closed socket's
            # monitor is reaped asynchronously, and a new socket may get the same fd meanwhile.
            address = f"inproc://bonjourgrid-fetch-monitor-{next(_monitor_ids)}"
            # Attached before connect(), so no handshake event can be missed.
            self.monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED, address)
            sock.connect(endpoint)
        except BaseException:
            self.close()
            raise

    async def wait(self, timeout_s: float) -> bool:
        """Whether a reply arrived within `timeout_s`; a refused handshake raises at once."""
        if self.monitor is None:  # the handshake is long done: only the data socket matters
            return bool(await self.sock.poll(timeout_s * 1000))
        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(await poller.poll(left * 1000))
            if self.sock in ready:
                self.settled()
                return True
            if self.monitor in ready:
                event = await recv_monitor_message(self.monitor)
                raise TransferError(_handshake_failure(int(event["event"]), int(event["value"])))
        return False

    def settled(self) -> None:
        """The server answered, so the handshake is over: stop watching it."""
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self) -> None:
        self.settled()
        self.sock.close(linger=0)


def _handshake_failure(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # the server's ZAP handler said no
        return (
            f"no data: the source refused our key (ZAP status {value}; "
            "its reservation for this job may have ended)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"no data: handshake failed (protocol error {value:#x}; not a data server?)"
    # A CURVE server that cannot open our hello just hangs up: most often a wrong server key.
    return (
        f"no data: handshake failed ({os.strerror(value)}; "
        "is the source's server key the right one?)"
    )


class _Sink:
    """The partial file of one fetch and its running SHA-256: bytes 0..received.

    Each chunk is written and hashed on a thread while the event loop receives the next
    one; at most one chunk is in the thread at a time, so the chunks go in in order and
    the fd is never closed under a write (`settle` before closing it).
    """

    def __init__(self, fd: int, writers: concurrent.futures.Executor) -> None:
        self.fd = fd
        self.received = 0  # bytes accepted (some may still be in the writer thread)
        self._writers = writers
        self._sha: Any = hashlib.sha256()
        self._pending: concurrent.futures.Future[None] | None = None

    async def put(self, data: bytes) -> None:
        """Append `data`: waits for the previous chunk's write, then hands this one over."""
        await self.drain()
        self._pending = self._writers.submit(self._write, data, self.received)
        self.received += len(data)

    def _write(self, data: bytes, offset: int) -> None:  # on the writer thread
        view = memoryview(data)
        while view:  # a regular file takes it whole, unless the disk fills (then ENOSPC)
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written
        self._sha.update(data)

    async def copy_from(self, src_fd: int, size: int) -> None:
        """Append the first `size` bytes of the file `src_fd` (a holder's, on this host), a
        step at a time: the kernel copies step n+1 while step n of the copy is hashed."""
        steps = [(at, min(_LOCAL_STEP, size - at)) for at in range(0, size, _LOCAL_STEP)]
        copies = [self._writers.submit(self._copy, src_fd, *steps[0])] if steps else []
        try:
            for i, (offset, step) in enumerate(steps):
                await asyncio.wrap_future(copies[i])
                if i + 1 < len(steps):
                    copies.append(self._writers.submit(self._copy, src_fd, *steps[i + 1]))
                await self.drain()  # the hashes go in order
                self._pending = self._writers.submit(self._hash_copy, offset, step)
                self.received = offset + step
            await self.drain()
        finally:  # on a failure or a cancel, every kernel copy is over before src_fd closes
            concurrent.futures.wait(copies)

    def _copy(self, src_fd: int, offset: int, size: int) -> None:  # on a writer thread
        done = 0
        while done < size:
            at = offset + done
            try:
                copied = os.copy_file_range(src_fd, self.fd, size - done, at, at)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                block = os.pread(src_fd, min(size - done, wire.CHUNK_SIZE), at)
                copied = os.pwrite(self.fd, block, at) if block else 0
            if copied == 0:
                raise TransferError("the holder's file ended early (it is being changed)")
            done += copied

    def _hash_copy(self, offset: int, size: int) -> None:  # on a writer thread
        # The copy is hashed, not the original: the bytes kept are the bytes verified.
        with mmap.mmap(self.fd, size, access=mmap.ACCESS_READ, offset=offset) as copy:
            self._sha.update(copy)

    async def drain(self) -> None:
        """Every chunk put so far is written and hashed (a write error is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await asyncio.wrap_future(pending)

    async def digest(self) -> str:
        await self.drain()
        return str(self._sha.hexdigest())

    def restart(self) -> None:
        """Drop everything received (a corrupt file): the next source starts from byte 0."""
        self.settle()
        os.ftruncate(self.fd, 0)
        self.received = 0
        self._sha = hashlib.sha256()

    def settle(self) -> None:
        """Wait (blocking, one chunk's write at most) until the writer thread is done with
        the fd: also after a cancel, so the fd is closed only when nothing writes to it.
        A failed write needs no report here: its bytes are dropped with the partial file."""
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending])


class Fetcher:
    """Pulls files from data servers, trying sources in order, verifying every byte.

    A fetch proves a client keypair to the servers: the one it is given (a job's), else the
    fetcher's own (None: plain sockets, --insecure). Idle connections are kept for reuse per
    (endpoint, server key, client key), so a connection never serves another key's fetches.
    """

    def __init__(self, ctx: zmq.asyncio.Context, keypair: Keypair | None = None) -> None:
        self._ctx = ctx
        self._keypair = keypair
        self._idle: dict[tuple[str, str, bytes], list[_Connection]] = defaultdict(list)
        self.bytes_from: dict[str, int] = defaultdict(int)  # file bytes per completing source
        self.bytes_copied = 0  # of those, bytes taken from a holder's path on this host
        self._host = same_host.host_identity()  # "": never asks for a path
        # Threads that write and hash received chunks; one per fetch at a time at most.
        self._writers = concurrent.futures.ThreadPoolExecutor(
            _WRITER_THREADS, thread_name_prefix="bgrid-fetch-write"
        )

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._writers.shutdown(wait=False)

    def forget(self, keypair: Keypair | None) -> None:
        """Close the idle connections that prove `keypair` (a job's, once its reservation ended)."""
        client = keypair.public if keypair is not None else b""
        for pool_key in [k for k in self._idle if k[2] == client]:
            for conn in self._idle.pop(pool_key):
                conn.close()

    async def fetch(
        self,
        ref: FileRef,
        sources: Sequence[Source],
        partial: Path,
        keypair: Keypair | None = None,
    ) -> Source:
        """Write the verified file to `partial`, proving `keypair` (default: the fetcher's own);
        return the source that completed it.

        A source that fails mid-file (dead, stuck, truncated, without the file) hands over to
        the next one, which carries on from the same offset. A file whose digest does not
        match is discarded whole and fetched again from the next source. A source that refuses
        the key at the handshake is passed over at once, not after the chunk timeout.
        """
        client = keypair if keypair is not None else self._keypair
        queue = list(sources)
        problems = []
        partial.parent.mkdir(parents=True, exist_ok=True)
        # Read-write: a same-host copy is hashed from this file (`_Sink._copy`).
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        complete = False
        sink = _Sink(fd, self._writers)
        try:
            i = 0
            while i < len(queue):
                source = queue[i]
                i += 1
                resumed = sink.received > 0
                try:
                    await self._fetch_from(ref, source, client, sink)
                except _Corrupt as err:
                    problems.append(f"{source.label}: {err}")
                    sink.restart()
                    if resumed:  # the bad bytes may be the previous source's: once more, alone
                        queue.insert(i, source)
                    continue
                except TransferError as err:
                    problems.append(f"{source.label}: {err}")
                    continue
                self.bytes_from[source.label] += ref.size
                complete = True
                return source
        finally:  # a failure, a full disk, a cancellation: leave no half file behind
            try:
                sink.settle()
            finally:
                os.close(fd)
            if not complete:
                partial.unlink(missing_ok=True)
        raise TransferError(
            f"could not fetch {ref.digest[:12]} ({ref.size} bytes) from any source: "
            + ("; ".join(problems) or "no source given")
        )

    async def _fetch_from(
        self, ref: FileRef, source: Source, client: Keypair | None, sink: _Sink
    ) -> None:
        pool_key = (source.endpoint, source.server_key, client.public if client else b"")
        idle = self._idle[pool_key]
        if idle:
            conn = idle.pop()
        else:
            sock = wire.client_socket(self._ctx, client, source.server_key, wire.MAX_DATA_FRAME)
            conn = _Connection(sock, source.endpoint)
        healthy = False
        try:
            if sink.received == 0 and ref.size >= _LOCAL_MIN and self._host:
                await self._copy_if_local(conn, ref, source, sink)
            await self._pull(conn, ref, sink)
            # Only a connection the server has answered is kept: a pooled one has no monitor.
            healthy = conn.monitor is None
        finally:
            if healthy:
                self._idle[pool_key].append(conn)
            else:
                conn.close()  # it may still have replies in flight: never reuse it

    async def _copy_if_local(
        self, conn: _Connection, ref: FileRef, source: Source, sink: _Sink
    ) -> None:
        """Take the file from the holder's path if it is on this host and passes the checks
        of `cache/same_host.py`; else, or if the copy is not the file, leave `sink` empty
        (the wire goes on from byte 0)."""
        # Who listens there, if it is on this host: a server elsewhere is not even asked.
        holder = await asyncio.to_thread(same_host.listener_uid, source.endpoint)
        if holder is None:
            return
        await conn.sock.send(wire.encode(Locate(ref.digest, self._host)))
        if not await conn.wait(_CHUNK_TIMEOUT_S):
            raise TransferError(f"no answer for {_CHUNK_TIMEOUT_S:g} s")
        try:
            msg = wire.decode(await conn.sock.recv(), limit=wire.MAX_CONTROL_FRAME)
        except ProtocolError as err:
            raise TransferError(f"bad reply: {err}") from err
        if isinstance(msg, Missing):
            raise TransferError("source does not hold the file")
        if not isinstance(msg, Located) or msg.digest != ref.digest or not msg.path:
            return  # elsewhere, or a server of an earlier release (an `error`): the wire
        src_fd = same_host.open_for_copy(msg.path, ref.size, holder)
        if src_fd is None:
            log.info(
                "not copying %s from %s: not a file of %d bytes its holder may read",
                msg.path,
                source.label,
                ref.size,
            )
            return
        try:
            await sink.copy_from(src_fd, ref.size)
            if await sink.digest() == ref.digest:
                self.bytes_copied += ref.size
                return
            log.warning("%s on this host is not %s: fetching it", msg.path, ref.digest[:12])
        except (TransferError, OSError) as err:  # a full disk fails the wire too, and says so
            log.warning("cannot copy %s: %s; fetching it", msg.path, err)
        finally:
            sink.settle()  # the writer is done with src_fd before it is closed
            os.close(src_fd)
        sink.restart()

    async def _pull(self, conn: _Connection, ref: FileRef, sink: _Sink) -> None:
        sock = conn.sock
        next_offset = sink.received
        in_flight = 0
        while sink.received < ref.size:
            while in_flight < _WINDOW and next_offset < ref.size:
                size = min(wire.CHUNK_SIZE, ref.size - next_offset)
                await sock.send(wire.encode(Get(ref.digest, next_offset, size)))
                next_offset += size
                in_flight += 1
            if not await conn.wait(_CHUNK_TIMEOUT_S):
                raise TransferError(f"no data for {_CHUNK_TIMEOUT_S:g} s")
            try:
                frame = await sock.recv(copy=False)  # decoded from libzmq's buffer: one copy
                msg = wire.decode(frame.buffer, limit=wire.MAX_DATA_FRAME)
            except ProtocolError as err:
                raise TransferError(f"bad reply: {err}") from err
            in_flight -= 1
            if isinstance(msg, Missing):
                raise TransferError("source does not hold the file")
            if isinstance(msg, Error):
                raise TransferError(f"refused: {msg.reason[:200]}")
            if (
                not isinstance(msg, Chunk)
                or msg.digest != ref.digest
                or msg.offset != sink.received
            ):
                raise TransferError(f"unexpected reply {msg.TYPE!r}")
            data = msg.data
            if len(data) != min(wire.CHUNK_SIZE, ref.size - sink.received):
                raise TransferError("chunk of the wrong size (truncated source?)")
            await sink.put(data)
        if await sink.digest() != ref.digest:
            raise _Corrupt("content does not match its digest (corrupt source): discarded")
