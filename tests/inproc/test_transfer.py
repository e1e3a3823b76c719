"""File transfers over real CURVE sockets on 127.0.0.1: data servers, a fetcher, failover."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from bonjourgrid import wire
from bonjourgrid.cache import same_host, transfer
from bonjourgrid.cache.store import FileIndex, FileRef, hash_file
from bonjourgrid.cache.transfer import DataServer, Fetcher, Source
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.keys import Keypair
from bonjourgrid.protocol import Located
from tests.waiting import async_wait_until

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("quick_timing")]

CHUNK = wire.CHUNK_SIZE


class Servers:
    """Data servers on 127.0.0.1, in one context (one process), all behind one key policy."""

    def __init__(self, ctx: zmq.asyncio.Context, secure: bool) -> None:
        self.ctx = ctx
        self.keypair = Keypair.generate() if secure else None
        self.policy = wire.KeyPolicy()
        self.auth: AsyncioAuthenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._socks: list[zmq.asyncio.Socket] = []

    def start(
        self, locate: Callable[[str], Path | None], label: str, same_host: bool = False
    ) -> tuple[DataServer, Source]:
        """A data server; unless `same_host`, it gives no path to a `locate` (as a server on
        another host): the bytes then come over the wire, which most tests are about."""
        if self.keypair is not None and self.auth is None:
            self.auth = wire.start_authenticator(self.ctx, {"data": self.policy})
        sock = wire.server_socket(self.ctx, self.keypair, "data", 4096)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        server = DataServer(sock, locate, host=None if same_host else "")
        self._socks.append(sock)
        self._tasks.append(asyncio.create_task(server.serve_forever()))
        key = self.keypair.public.decode() if self.keypair else ""
        return server, Source(f"tcp://127.0.0.1:{port}", key, label)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        # A server that died on its own (not cancelled) is a bug the test must show.
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        for sock in self._socks:
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


@pytest_asyncio.fixture
async def server_ctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest_asyncio.fixture
async def servers(server_ctx: zmq.asyncio.Context) -> AsyncIterator[Servers]:
    s = Servers(server_ctx, secure=True)
    yield s
    await s.close()


@pytest.fixture
def client() -> Keypair:
    return Keypair.generate()


@pytest_asyncio.fixture
async def fetcher(
    zctx: zmq.asyncio.Context, servers: Servers, client: Keypair
) -> AsyncIterator[Fetcher]:
    servers.policy.allowed.add(client.public)
    f = Fetcher(zctx, client)
    yield f
    f.close()


def make_file(directory: Path, size: int, name: str | None = None) -> tuple[Path, FileRef]:
    data = os.urandom(size)
    path = directory / (name or f"file-{size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, FileRef(hashlib.sha256(data).hexdigest(), size)


def index_of(*paths: Path) -> FileIndex:
    index = FileIndex()
    for path in paths:
        index.add(path)
    return index


def dead_endpoint() -> str:
    """A loopback port with nothing listening (free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


# -- files arrive whole and verified ----------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + CHUNK // 2, 9 * CHUNK + 3],
    ids=["empty", "1B", "chunk-1", "1-chunk", "chunk+1", "3.5MiB", "window+1-chunks"],
)
async def test_a_file_arrives_whole_and_verified(
    tmp_path: Path, servers: Servers, fetcher: Fetcher, size: int
) -> None:
    path, ref = make_file(tmp_path / "submit", size)
    server, source = servers.start(index_of(path).locate, "coordinator")
    partial = tmp_path / "worker" / "incoming" / "x.part"
    assert await fetcher.fetch(ref, [source], partial) == source
    assert partial.read_bytes() == path.read_bytes()
    assert hash_file(partial) == ref
    assert fetcher.bytes_from["coordinator"] == size
    assert server.bytes_served == size


async def test_a_fetch_without_sources_says_so(tmp_path: Path, fetcher: Fetcher) -> None:
    _, ref = make_file(tmp_path, 10)
    with pytest.raises(TransferError, match="no source given"):
        await fetcher.fetch(ref, [], tmp_path / "x.part")


async def test_several_fetches_share_one_fetcher(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    files = [make_file(tmp_path / "submit", size) for size in (5, CHUNK, 2 * CHUNK + 9, 777)]
    _, source = servers.start(index_of(*(p for p, _ in files)).locate, "coordinator")
    partials = [tmp_path / "in" / f"{i}.part" for i in range(len(files))]
    await asyncio.gather(
        *(
            fetcher.fetch(ref, [source], part)
            for (_, ref), part in zip(files, partials, strict=True)
        )
    )
    for (path, _), part in zip(files, partials, strict=True):
        assert part.read_bytes() == path.read_bytes()
    # A second round reuses the idle connections.
    path, ref = files[2]
    await fetcher.fetch(ref, [source], tmp_path / "again.part")
    assert (tmp_path / "again.part").read_bytes() == path.read_bytes()
    assert fetcher.bytes_from["coordinator"] == sum(r.size for _, r in files) + ref.size


async def test_a_disk_that_refuses_writes_fails_the_fetch_and_leaves_nothing(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    """Chunks are written on a writer thread: its error still ends the fetch, with the OS's
    reason, and no partial file is left. /dev/full refuses every write with ENOSPC."""
    path, ref = make_file(tmp_path / "submit", 3 * CHUNK + 7)
    _, source = servers.start(index_of(path).locate, "coordinator")
    partial = tmp_path / "x.part"
    partial.symlink_to("/dev/full")
    with pytest.raises(OSError) as failed:
        await fetcher.fetch(ref, [source], partial)
    assert failed.value.errno == errno.ENOSPC
    assert not partial.is_symlink()
    # The fetcher goes on serving the next fetch.
    assert await fetcher.fetch(ref, [source], tmp_path / "y.part") == source
    assert (tmp_path / "y.part").read_bytes() == path.read_bytes()


async def test_a_cancelled_fetch_leaves_nothing_behind(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", 12 * CHUNK)
    server, source = servers.start(index_of(path).locate, "coordinator")
    partial = tmp_path / "x.part"
    fetch = asyncio.create_task(fetcher.fetch(ref, [source], partial))
    await async_wait_until(lambda: server.bytes_served > 0, 10.0, "the first chunk served")
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert not partial.exists()


# -- failover ----------------------------------------------------------------------------------


async def test_a_source_without_the_file_hands_over_to_the_next(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", 2 * CHUNK + 5)
    _, empty = servers.start(FileIndex().locate, "peer-a")
    _, holder = servers.start(index_of(path).locate, "coordinator")
    partial = tmp_path / "x.part"
    assert await fetcher.fetch(ref, [empty, holder], partial) == holder
    assert partial.read_bytes() == path.read_bytes()
    assert fetcher.bytes_from["coordinator"] == ref.size
    assert fetcher.bytes_from["peer-a"] == 0


async def test_a_corrupt_source_is_detected_and_the_next_one_used(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", 2 * CHUNK + 123)
    impostor, _ = make_file(tmp_path / "rot", ref.size)  # same size, other bytes
    _, corrupt = servers.start(lambda digest: impostor, "peer-a")
    _, good = servers.start(index_of(path).locate, "coordinator")
    partial = tmp_path / "x.part"
    assert await fetcher.fetch(ref, [corrupt, good], partial) == good
    assert hash_file(partial) == ref
    assert fetcher.bytes_from["peer-a"] == 0


async def test_only_corrupt_sources_leave_nothing_behind(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    _, ref = make_file(tmp_path / "submit", CHUNK + 1)
    impostor, _ = make_file(tmp_path / "rot", ref.size)
    _, corrupt = servers.start(lambda digest: impostor, "peer-a")
    partial = tmp_path / "x.part"
    with pytest.raises(TransferError, match="does not match its digest"):
        await fetcher.fetch(ref, [corrupt], partial)
    assert not partial.exists()


async def test_a_dead_source_is_given_up_after_the_chunk_timeout(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", CHUNK + 10)
    _, live = servers.start(index_of(path).locate, "coordinator")
    dead = Source(dead_endpoint(), live.server_key, "gone")
    timeout = transfer._CHUNK_TIMEOUT_S  # shrunk by quick_timing
    started = time.monotonic()
    assert await fetcher.fetch(ref, [dead, live], tmp_path / "x.part") == live
    assert timeout <= time.monotonic() - started < timeout + 2.0
    assert (tmp_path / "x.part").read_bytes() == path.read_bytes()


async def test_a_truncated_source_is_given_up_at_once(
    tmp_path: Path, servers: Servers, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "_CHUNK_TIMEOUT_S", 0.8)
    path, ref = make_file(tmp_path / "submit", 2 * CHUNK + CHUNK // 2)
    short = tmp_path / "short"
    short.write_bytes(path.read_bytes()[:-10])  # e.g. edited while the job runs
    _, truncated = servers.start(lambda digest: short, "peer-a")
    _, good = servers.start(index_of(path).locate, "coordinator")
    started = time.monotonic()
    assert await fetcher.fetch(ref, [truncated, good], tmp_path / "x.part") == good
    assert time.monotonic() - started < 0.4


# -- same host: a kernel copy from the holder's path, verified ----------------------------------


@pytest.mark.parametrize("size", [transfer._LOCAL_MIN, 3 * CHUNK + 5], ids=["small", "3MiB"])
async def test_a_holder_on_this_host_hands_over_its_path_and_no_chunk_moves(
    tmp_path: Path,
    servers: Servers,
    fetcher: Fetcher,
    size: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transfer, "_LOCAL_STEP", CHUNK)  # several steps, a short last one
    path, ref = make_file(tmp_path / "submit", size)
    server, source = servers.start(index_of(path).locate, "coordinator", same_host=True)
    partial = tmp_path / "worker" / "x.part"
    assert await fetcher.fetch(ref, [source], partial) == source
    assert hash_file(partial) == ref
    # Handed over by path, no chunk: counted as served all the same (the job's report).
    assert (fetcher.bytes_copied, server.bytes_served, server.bytes_located) == (size,) * 3
    assert partial.stat().st_ino != path.stat().st_ino  # a copy of its own, not a link


async def test_a_same_host_copy_cancelled_midway_leaves_nothing_behind(
    tmp_path: Path, servers: Servers, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "_LOCAL_STEP", CHUNK)
    # The second step's hash holds until the test has cancelled the fetch.
    midway, release = threading.Event(), threading.Event()
    hash_copy = transfer._Sink._hash_copy

    def held(sink: transfer._Sink, offset: int, size: int) -> None:
        if offset > 0:
            midway.set()
            release.wait(10.0)
        hash_copy(sink, offset, size)

    monkeypatch.setattr(transfer._Sink, "_hash_copy", held)
    path, ref = make_file(tmp_path / "submit", 8 * CHUNK)
    _, source = servers.start(index_of(path).locate, "coordinator", same_host=True)
    partial = tmp_path / "x.part"
    fetch = asyncio.create_task(fetcher.fetch(ref, [source], partial))
    await async_wait_until(midway.is_set, 10.0, "the copy's second step")
    fetch.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert not partial.exists()
    assert fetcher.bytes_copied == 0


async def test_a_small_file_comes_over_the_wire_even_from_this_host(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", transfer._LOCAL_MIN - 1)
    server, source = servers.start(index_of(path).locate, "coordinator", same_host=True)
    assert await fetcher.fetch(ref, [source], tmp_path / "x.part") == source
    assert (fetcher.bytes_copied, server.bytes_served) == (0, ref.size)


async def test_a_local_file_with_other_bytes_is_refused_and_the_wire_used(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    """The holder's path names a file of the right size with other bytes (changed since it
    was hashed, or a lie): the copy is hashed, refused, and the same source's wire serves."""
    path, ref = make_file(tmp_path / "submit", 2 * CHUNK + 3)
    impostor, _ = make_file(tmp_path / "rot", ref.size)
    answers = iter([impostor])  # the `locate` is asked first, then every `get`
    server, source = servers.start(lambda d: next(answers, path), "coordinator", same_host=True)
    partial = tmp_path / "x.part"
    assert await fetcher.fetch(ref, [source], partial) == source
    assert hash_file(partial) == ref
    assert fetcher.bytes_copied == 0
    assert server.bytes_served - server.bytes_located == ref.size  # all in chunks


@pytest.mark.parametrize("named", ["/dev/zero", "fifo", "other-size", "missing"])
async def test_a_path_that_is_no_file_of_the_size_is_never_read(
    tmp_path: Path, servers: Servers, fetcher: Fetcher, named: str
) -> None:
    """A hostile holder names a device, a FIFO (an open would block), a file of another
    size, or nothing: the fetcher does not read it, and takes the bytes from the wire."""
    path, ref = make_file(tmp_path / "submit", 2 * CHUNK)
    claims = {
        "/dev/zero": Path("/dev/zero"),
        "fifo": tmp_path / "fifo",
        "other-size": make_file(tmp_path / "other", ref.size + 1)[0],
        "missing": tmp_path / "nothing-here",
    }
    if named == "fifo":
        os.mkfifo(claims["fifo"])
    answers = iter([claims[named]])
    server, source = servers.start(lambda d: next(answers, path), "coordinator", same_host=True)
    partial = tmp_path / "x.part"
    assert await fetcher.fetch(ref, [source], partial) == source
    assert hash_file(partial) == ref
    assert fetcher.bytes_copied == 0
    assert server.bytes_served - server.bytes_located == ref.size  # all in chunks


def test_a_path_is_taken_only_if_the_holder_may_read_the_file(tmp_path: Path) -> None:
    """The holder's uid comes from the kernel's socket table, the file's mode decides."""
    private, _ = make_file(tmp_path, 10, "private")
    private.chmod(0o600)
    shared, _ = make_file(tmp_path, 10, "shared")
    shared.chmod(0o644)
    owner = private.stat().st_uid
    stranger = owner + 4242
    assert same_host.holder_may_read(private.stat(), owner)
    assert not same_host.holder_may_read(private.stat(), stranger)
    assert same_host.holder_may_read(shared.stat(), stranger)
    assert same_host.open_for_copy(str(private), 10, stranger) is None
    fd = same_host.open_for_copy(str(shared), 10, stranger)
    assert fd is not None
    os.close(fd)


async def test_the_holder_uid_is_that_of_the_process_listening_on_the_endpoint(
    servers: Servers,
) -> None:
    _, source = servers.start(FileIndex().locate, "coordinator")
    assert same_host.listener_uid(source.endpoint) == os.getuid()
    assert same_host.listener_uid(dead_endpoint()) is None
    assert same_host.listener_uid("ipc:///tmp/x") is None


def test_a_located_path_must_be_absolute() -> None:
    digest = "ab" * 32
    assert wire.decode(wire.pack_raw("located", digest=digest, path="/a/b")) == Located(
        digest, "/a/b"
    )
    for bad in ("relative/path", "/a\x00b", 7):
        with pytest.raises(ProtocolError):
            wire.decode(wire.pack_raw("located", digest=digest, path=bad))


# -- security ----------------------------------------------------------------------------------


async def test_a_client_whose_key_is_not_allowed_gets_nothing(
    tmp_path: Path, zctx: zmq.asyncio.Context, servers: Servers
) -> None:
    path, ref = make_file(tmp_path / "submit", 1000)
    server, source = servers.start(index_of(path).locate, "coordinator")
    stranger = Fetcher(zctx, Keypair.generate())  # a key nobody allowed
    try:
        with pytest.raises(TransferError, match="no data"):
            await stranger.fetch(ref, [source], tmp_path / "x.part")
    finally:
        stranger.close()
    assert server.bytes_served == 0
    assert not (tmp_path / "x.part").exists()


async def test_a_client_that_expects_another_server_key_gets_nothing(
    tmp_path: Path, servers: Servers, fetcher: Fetcher
) -> None:
    path, ref = make_file(tmp_path / "submit", 1000)
    server, source = servers.start(index_of(path).locate, "coordinator")
    impostor_key = Source(source.endpoint, Keypair.generate().public.decode(), "coordinator")
    with pytest.raises(TransferError):
        await fetcher.fetch(ref, [impostor_key], tmp_path / "x.part")
    assert server.bytes_served == 0


async def test_insecure_mode_moves_files_without_keys(
    tmp_path: Path, server_ctx: zmq.asyncio.Context, zctx: zmq.asyncio.Context
) -> None:
    plain = Servers(server_ctx, secure=False)
    fetcher = Fetcher(zctx, None)
    try:
        path, ref = make_file(tmp_path / "submit", CHUNK + 77)
        _, source = plain.start(index_of(path).locate, "coordinator")
        assert source.server_key == ""
        await fetcher.fetch(ref, [source], tmp_path / "x.part")
        assert (tmp_path / "x.part").read_bytes() == path.read_bytes()
    finally:
        fetcher.close()
        await plain.close()


# -- the server side of the boundary -----------------------------------------------------------


async def test_a_data_server_answers_nonsense_with_errors_and_keeps_serving(
    tmp_path: Path, zctx: zmq.asyncio.Context, servers: Servers, client: Keypair
) -> None:
    path, ref = make_file(tmp_path / "submit", 100)
    server, source = servers.start(index_of(path).locate, "coordinator")
    servers.policy.allowed.add(client.public)
    sock = wire.client_socket(zctx, client, source.server_key, wire.MAX_DATA_FRAME)
    sock.connect(source.endpoint)  # closed with zctx

    async def ask(frame: bytes) -> dict[str, object]:
        await sock.send(frame)
        assert await sock.poll(5000), "the data server did not answer"
        return wire.as_map(wire.decode(await sock.recv(), limit=wire.MAX_DATA_FRAME))

    nonsense = [
        b"\xc1 not msgpack",
        wire.pack_raw("reserve", job="j", lease_s=1.0, coordinator="h"),  # control, not data
        wire.pack_raw("get", digest=ref.digest, offset=-1, size=10),
        wire.pack_raw("get", digest=ref.digest, offset=0, size=0),
        wire.pack_raw("get", digest=ref.digest, offset=0, size=CHUNK + 1),
    ]
    for frame in nonsense:
        assert (await ask(frame))["t"] == "error"
    assert await ask(wire.pack_raw("get", digest="ab" * 32, offset=0, size=10)) == {
        "v": 1,
        "t": "missing",
        "digest": "ab" * 32,
    }
    reply = await ask(wire.pack_raw("get", digest=ref.digest, offset=10, size=50))
    assert reply["t"] == "chunk" and reply["data"] == path.read_bytes()[10:60]
    assert server.bytes_served == 50
