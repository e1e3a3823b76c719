"""Data between peers: job keys, peer-to-peer fetches, prefetch, probe and job pins.

Real worker daemons on 127.0.0.1; this test plays the coordinator with real CURVE sockets:
one keypair per job, handed to the peers in `reserve`, which its peers' fetches prove.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from bonjourgrid import keys, wire
from bonjourgrid.cache import transfer
from bonjourgrid.cache.store import FileIndex, FileRef
from bonjourgrid.cache.transfer import DataServer, Fetcher, Source
from bonjourgrid.errors import TransferError
from bonjourgrid.keys import GridKey, Keypair
from bonjourgrid.worker.core import PeerState
from bonjourgrid.worker.daemon import WorkerConfig, WorkerDaemon
from tests.inproc.test_worker_daemon import REPLY_S, SILENCE_S, digest, wait_until

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("quick_timing")]

KIB = 1024


@dataclass
class LivePeer:
    daemon: WorkerDaemon
    name: str
    control: str
    key: str  # its CURVE public key (Z85); "" under --insecure

    @property
    def data(self) -> str:
        assert self.daemon.core is not None
        return f"tcp://127.0.0.1:{self.daemon.core.data_port}"

    def source(self) -> Source:
        """This peer as a data source for a file it holds."""
        return Source(self.data, self.key, self.name)

    @property
    def served(self) -> int:
        assert self.daemon.data_server is not None
        return self.daemon.data_server.bytes_served


@asynccontextmanager
async def live_peer(
    cache_dir: Path, grid: GridKey | None, cache_size: int | None = None
) -> AsyncIterator[LivePeer]:
    """A worker daemon of `grid` on 127.0.0.1, stopped (and checked) on exit."""
    name = f"peer-{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(
        name=name,
        cpus=2,
        ram_mib=512,
        cost=0.0,
        cache_dir=cache_dir,
        grid=grid,
        interface="127.0.0.1",
        cache_size=cache_size,
    )
    daemon = WorkerDaemon(config)
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), REPLY_S)
        key = daemon.keypair.public.decode() if daemon.keypair else ""
        yield LivePeer(daemon, name, f"tcp://127.0.0.1:{daemon._control_port}", key)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert daemon.core is not None
    daemon.core.validate_state()


class Coordinators:
    """The data-server key policy of this test's coordinators (one authenticator per context)."""

    def __init__(self, ctx: zmq.asyncio.Context, grid: GridKey | None) -> None:
        self.ctx = ctx
        self.grid = grid
        self.policy = wire.KeyPolicy()
        self._auth: AsyncioAuthenticator | None = None
        if grid is not None:
            self._auth = wire.start_authenticator(ctx, {"data": self.policy})

    def job(self, name: str, submit_dir: Path) -> Job:
        return Job(self, name, submit_dir)

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()


class Job:
    """This test as one job's coordinator: its keypair, control connections, a data server."""

    def __init__(self, coordinators: Coordinators, name: str, submit_dir: Path) -> None:
        self.ctx = coordinators.ctx
        self.grid = coordinators.grid
        self.name = name
        self.submit_dir = submit_dir
        self.keys = Keypair.generate() if self.grid is not None else None
        if self.keys is not None:
            # Only the job's key may fetch: not the grid's, not any peer's own key.
            coordinators.policy.allowed.add(self.keys.public)
        self.index = FileIndex()
        self.server_keys = Keypair.generate() if self.grid is not None else None
        self.server: DataServer | None = None
        self.serving: asyncio.Task[None] | None = None
        self._sock: zmq.asyncio.Socket | None = None

    def reserve_fields(self) -> dict[str, Any]:
        public = self.keys.public.decode() if self.keys else ""
        secret = self.keys.secret.decode() if self.keys and self.keys.secret else ""
        return {
            "job": self.name,
            "lease_s": 30.0,
            "coordinator": "test",
            "job_public": public,
            "job_secret": secret,
        }

    def connect(self, peer: LivePeer) -> zmq.asyncio.Socket:
        pair = self.grid.keypair() if self.grid is not None else None
        sock = wire.client_socket(self.ctx, pair, peer.key, wire.MAX_CONTROL_FRAME)
        sock.connect(peer.control)
        return sock

    async def reserve(self, peer: LivePeer) -> zmq.asyncio.Socket:
        sock = self.connect(peer)
        reply = await ask(sock, "reserve", **self.reserve_fields())
        assert reply["t"] == "reserved", reply
        return sock

    def stage(self, name: str, data: bytes, start: bool = True) -> FileRef:
        """Put an input file in the submit directory; served to the job's key from now on."""
        path = self.submit_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        ref = self.index.add(path)
        if self._sock is None:
            self._sock = wire.server_socket(self.ctx, self.server_keys, "data", 4096)
            port = self._sock.bind_to_random_port("tcp://127.0.0.1")
            key = self.server_keys.public.decode() if self.server_keys else ""
            self.source = Source(f"tcp://127.0.0.1:{port}", key, "coordinator")
            # As a coordinator on another host: the bytes served are the bytes fetched.
            self.server = DataServer(self._sock, self.index.locate, host="")
        if start:
            self.start_serving()
        return ref

    def start_serving(self) -> None:
        """Answer `get`s (requests sent meanwhile wait in the socket)."""
        assert self.server is not None
        if self.serving is None:
            self.serving = asyncio.create_task(self.server.serve_forever())

    def run_fields(
        self,
        task: str,
        command: str,
        inputs: dict[str, tuple[FileRef, list[Source]]] | None = None,
        outputs: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        return {
            "job": self.name,
            "task": task,
            "attempt": 1,
            "command": command,
            "inputs": [
                [path, ref.digest, ref.size, [list(s.__dict__.values()) for s in sources]]
                for path, (ref, sources) in (inputs or {}).items()
            ],
            "outputs": list(outputs),
            "env": {},
            "limits": {},
        }

    def prefetch_fields(self, *files: tuple[FileRef, list[Source]]) -> dict[str, Any]:
        return {
            "job": self.name,
            "files": [
                [ref.digest, ref.size, [list(s.__dict__.values()) for s in sources]]
                for ref, sources in files
            ],
        }

    async def close(self) -> None:
        if self.serving is not None:
            self.serving.cancel()
            await asyncio.gather(self.serving, return_exceptions=True)


async def recv(sock: zmq.asyncio.Socket, timeout: float = REPLY_S) -> dict[str, Any]:
    """The next message other than a run's acknowledgement (`started`)."""
    while True:
        assert await sock.poll(timeout * 1000), f"no reply within {timeout} s"
        msg = wire.as_map(wire.decode(await sock.recv()))
        if msg["t"] != "started":
            return msg


async def ask(sock: zmq.asyncio.Socket, msg_type: str, **fields: Any) -> dict[str, Any]:
    await sock.send(wire.pack_raw(msg_type, **fields))
    return await recv(sock)


async def run_task(sock: zmq.asyncio.Socket, fields: dict[str, Any]) -> dict[str, Any]:
    done = await ask(sock, "run", **fields)
    assert done["t"] == "task_done", done
    return done


@pytest.fixture
def grid() -> GridKey:
    return keys.ephemeral_grid_key()


@pytest.fixture
def coordinators(zctx: zmq.asyncio.Context, grid: GridKey) -> Iterator[Coordinators]:
    c = Coordinators(zctx, grid)
    yield c
    c.close()


@pytest.fixture
async def job(coordinators: Coordinators, tmp_path: Path) -> AsyncIterator[Job]:
    j = coordinators.job("job-1", tmp_path / "submit")
    yield j
    await j.close()


async def fetch(
    ctx: zmq.asyncio.Context, keypair: Keypair | None, ref: FileRef, source: Source, dest: Path
) -> bytes:
    fetcher = Fetcher(ctx, keypair)
    try:
        await fetcher.fetch(ref, [source], dest)
    finally:
        fetcher.close()
    return dest.read_bytes()


PRODUCE = "head -c 50000 /dev/urandom > mid.dat"  # an intermediate of 50,000 random bytes


# -- peer to peer, with the job's key --------------------------------------------------------


async def test_a_consumer_fetches_an_intermediate_from_the_peer_that_made_it(
    tmp_path: Path, grid: GridKey, job: Job, zctx: zmq.asyncio.Context
) -> None:
    async with (
        live_peer(tmp_path / "a", grid) as a,
        live_peer(tmp_path / "b", grid) as b,
    ):
        on_a, on_b = await job.reserve(a), await job.reserve(b)
        made = await run_task(on_a, job.run_fields("produce", PRODUCE, outputs=("mid.dat",)))
        assert made["exit_code"] == 0, made
        [[_, mid_digest, mid_size]] = made["outputs"]
        mid = FileRef(mid_digest, mid_size)
        assert mid_digest in a.daemon.store.pinned()  # the job keeps it where it was made

        fields = job.run_fields(
            "consume", "cat mid.dat > copy.dat", {"mid.dat": (mid, [a.source()])}, ("copy.dat",)
        )
        done = await run_task(on_b, fields)
        assert (done["exit_code"], done["error"]) == (0, ""), done
        assert done["outputs"] == [["copy.dat", mid_digest, mid_size]]
        assert done["fetched"] == [[mid_digest, a.name, mid_size]]
        assert (done["bytes_fetched"], done["hit_bytes"]) == (mid_size, 0)
        assert a.served == mid_size  # straight from the producer
        assert job.server is None  # the coordinator never served a byte

        # Nobody else reads it: neither a stranger nor a peer of the grid without the job's key.
        for outsider in (Keypair.generate(), b.daemon.keypair):
            with pytest.raises(TransferError, match="refused our key"):
                await fetch(zctx, outsider, mid, a.source(), tmp_path / "stolen")
        assert a.served == mid_size
        # The grid's coordinators (to collect outputs) and the job's peers do.
        copy = await fetch(zctx, grid.keypair(), mid, a.source(), tmp_path / "collected")
        assert digest(copy) == mid_digest
        # One fetcher proves the key each fetch is given: a connection the job's key opened
        # is never lent to a fetch with another key.
        fetcher = Fetcher(zctx)
        try:
            await fetcher.fetch(mid, [a.source()], tmp_path / "again", job.keys)
            with pytest.raises(TransferError, match="refused our key"):
                await fetcher.fetch(mid, [a.source()], tmp_path / "other", Keypair.generate())
        finally:
            fetcher.close()


async def test_after_its_reservation_the_job_key_no_longer_opens_the_peer(
    tmp_path: Path, grid: GridKey, job: Job, zctx: zmq.asyncio.Context
) -> None:
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        made = await run_task(sock, job.run_fields("produce", PRODUCE, outputs=("mid.dat",)))
        [[_, mid_digest, mid_size]] = made["outputs"]
        mid = FileRef(mid_digest, mid_size)
        lingering = Fetcher(zctx, job.keys)  # a job's peer, keeping its connection open
        try:
            await lingering.fetch(mid, [a.source()], tmp_path / "first")
            assert (await ask(sock, "release", job=job.name))["t"] == "released"
            assert a.daemon.store.pinned() == {}

            # Its open connection is refused at once, request by request...
            with pytest.raises(TransferError, match="no longer admitted"):
                await lingering.fetch(mid, [a.source()], tmp_path / "second")
        finally:
            lingering.close()
        # ...and a new one never gets through the handshake.
        with pytest.raises(TransferError, match="refused our key"):
            await fetch(zctx, job.keys, mid, a.source(), tmp_path / "third")
        assert a.served == mid_size
        # The grid's coordinators still collect what the peer holds.
        collected = await fetch(zctx, grid.keypair(), mid, a.source(), tmp_path / "collected")
        assert digest(collected) == mid_digest


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_peer_whose_reservation_ended_is_passed_over_at_once(
    tmp_path: Path,
    grid: GridKey,
    job: Job,
    zctx: zmq.asyncio.Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real chunk timeout: a refusal that went unnoticed would cost this much per source.
    monkeypatch.setattr(transfer, "_CHUNK_TIMEOUT_S", 10.0)
    produce = "yes bonjour | head -c 50000 > mid.dat"
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        made = await run_task(sock, job.run_fields("produce", produce, outputs=("mid.dat",)))
        [[_, mid_digest, mid_size]] = made["outputs"]
        mid = FileRef(mid_digest, mid_size)
        assert (await ask(sock, "release", job=job.name))["t"] == "released"
        assert job.stage("mid.dat", (b"bonjour\n" * 6250)[:50000]) == mid  # a replica elsewhere

        fetcher = Fetcher(zctx, job.keys)  # a consumer of the job that still lists the peer
        try:
            started = time.monotonic()
            with pytest.raises(TransferError, match=rf"{a.name}: .*refused our key"):
                await fetcher.fetch(mid, [a.source()], tmp_path / "alone")
            got = await fetcher.fetch(mid, [a.source(), job.source], tmp_path / "copy")
            elapsed = time.monotonic() - started
            assert got == job.source
            assert elapsed < 5.0, f"two refusals took {elapsed:.1f} s: waited out a timeout"
            assert digest((tmp_path / "copy").read_bytes()) == mid_digest
            assert a.served == 0

            # Refused connections are closed with their handshake monitors: no fd piles up.
            before = open_fds()
            for i in range(40):
                with pytest.raises(TransferError, match="refused our key"):
                    await fetcher.fetch(mid, [a.source()], tmp_path / f"again{i}")
            await wait_until(lambda: open_fds() <= before + 4, REPLY_S, "the sockets' release")
        finally:
            fetcher.close()


async def test_insecure_peers_move_files_without_keys(
    tmp_path: Path, zctx: zmq.asyncio.Context
) -> None:
    coordinators = Coordinators(zctx, None)
    job = coordinators.job("job-1", tmp_path / "submit")
    try:
        async with (
            live_peer(tmp_path / "a", None) as a,
            live_peer(tmp_path / "b", None) as b,
        ):
            assert job.reserve_fields()["job_public"] == ""
            on_a, on_b = await job.reserve(a), await job.reserve(b)
            made = await run_task(on_a, job.run_fields("produce", PRODUCE, outputs=("mid.dat",)))
            [[_, mid_digest, mid_size]] = made["outputs"]
            mid = FileRef(mid_digest, mid_size)
            fields = job.run_fields("consume", "test -s mid.dat", {"mid.dat": (mid, [a.source()])})
            done = await run_task(on_b, fields)
            assert (done["exit_code"], done["fetched"]) == (0, [[mid_digest, a.name, mid_size]])
    finally:
        await job.close()
        coordinators.close()


# -- prefetch --------------------------------------------------------------------------------


async def test_a_prefetched_file_is_reported_by_its_prefetch_and_then_is_a_hit(
    tmp_path: Path, grid: GridKey, job: Job
) -> None:
    data = os.urandom(3 * wire.CHUNK_SIZE + 5)
    ref = job.stage("ref.bin", data)
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        await sock.send(wire.pack_raw("prefetch", **job.prefetch_fields((ref, [job.source]))))
        got = await recv(sock)
        assert got["t"] == "prefetched", got
        assert {k: got[k] for k in ("job", "digest", "source", "bytes", "error")} == {
            "job": job.name,
            "digest": ref.digest,
            "source": "coordinator",
            "bytes": ref.size,
            "error": "",
        }
        assert got["seconds"] >= 0
        assert ref.digest in a.daemon.store.pinned()

        inputs = {"ref.bin": (ref, [job.source])}
        first = await run_task(sock, job.run_fields("t1", "test -s ref.bin", inputs))
        assert (first["exit_code"], first["fetched"], first["hit_bytes"]) == (0, [], 0)
        assert first["bytes_fetched"] == 0
        second = await run_task(sock, job.run_fields("t2", "test -s ref.bin", inputs))
        assert (second["fetched"], second["hit_bytes"]) == ([], ref.size)

        # Prefetching what the peer holds moves nothing.
        again = await ask(sock, "prefetch", **job.prefetch_fields((ref, [job.source])))
        assert (again["t"], again["source"], again["bytes"], again["error"]) == (
            "prefetched",
            "",
            0,
            "",
        )
        assert job.server is not None and job.server.bytes_served == ref.size


@pytest.mark.parametrize("first", ["prefetch", "run"])
async def test_a_prefetch_and_a_run_of_one_file_share_one_fetch(
    tmp_path: Path, grid: GridKey, job: Job, first: str
) -> None:
    ref = job.stage("big.bin", os.urandom(2 * wire.CHUNK_SIZE), start=False)
    inputs = {"big.bin": (ref, [job.source])}
    messages = {
        "prefetch": wire.pack_raw("prefetch", **job.prefetch_fields((ref, [job.source]))),
        "run": wire.pack_raw("run", **job.run_fields("t", "test -s big.bin", inputs)),
    }
    second = "run" if first == "prefetch" else "prefetch"
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        inflight = a.daemon.staging.inflight
        # The coordinator does not answer yet: the first fetch is in flight when the other
        # request comes, and joins it.
        await sock.send(messages[first])
        await wait_until(lambda: ref.digest in inflight, REPLY_S, f"the {first}'s fetch")
        await sock.send(messages[second])
        await wait_until(lambda: inflight[ref.digest].waiters == 2, REPLY_S, f"the {second}")
        job.start_serving()

        replies = {m["t"]: m for m in [await recv(sock), await recv(sock)]}
        prefetched, done = replies["prefetched"], replies["task_done"]
        assert (done["exit_code"], done["hit_bytes"]) == (0, 0)
        if first == "prefetch":  # reported by the prefetch; the run counts it nowhere
            assert (prefetched["source"], prefetched["bytes"]) == ("coordinator", ref.size)
            assert done["fetched"] == []
        else:  # reported by the run; the prefetch moved nothing
            assert (prefetched["source"], prefetched["bytes"]) == ("", 0)
            assert done["fetched"] == [[ref.digest, "coordinator", ref.size]]
        assert job.server is not None and job.server.bytes_served == ref.size


async def test_a_prefetch_from_a_job_that_does_not_hold_the_peer_is_refused(
    tmp_path: Path, grid: GridKey, job: Job, coordinators: Coordinators
) -> None:
    other = coordinators.job("job-2", tmp_path / "other")
    try:
        ref = other.stage("x.bin", b"not for you\n" * 100)
        async with live_peer(tmp_path / "a", grid) as a:
            await job.reserve(a)
            stranger = other.connect(a)
            reply = await ask(stranger, "prefetch", **other.prefetch_fields((ref, [other.source])))
            assert reply["t"] == "denied" and job.name in reply["reason"]
            # Nor may the holding job, through a connection that does not hold the peer.
            sneaky = job.connect(a)
            fields = {**other.prefetch_fields((ref, [other.source])), "job": job.name}
            assert (await ask(sneaky, "prefetch", **fields))["t"] == "denied"
            # And a malformed prefetch is an error, whoever sends it.
            bad = {"job": job.name, "files": [["not-a-digest", 3, []]]}
            assert (await ask(sneaky, "prefetch", **bad))["t"] == "error"
            assert a.daemon.staging.inflight == {} and a.daemon.store.pinned() == {}
            assert other.server is not None and other.server.bytes_served == 0
    finally:
        await other.close()


async def test_the_end_of_a_reservation_cancels_its_fetches(
    tmp_path: Path, grid: GridKey, job: Job
) -> None:
    # The coordinator never answers: both fetches are in flight when the job lets go.
    ref = job.stage("never.bin", os.urandom(wire.CHUNK_SIZE), start=False)
    other = job.stage("input.bin", os.urandom(wire.CHUNK_SIZE), start=False)
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        await sock.send(wire.pack_raw("prefetch", **job.prefetch_fields((ref, [job.source]))))
        inputs = {"input.bin": (other, [job.source])}
        await sock.send(wire.pack_raw("run", **job.run_fields("t", "true", inputs)))
        inflight = a.daemon.staging.inflight
        await wait_until(lambda: len(inflight) == 2, REPLY_S, "the fetches")
        assert ref.digest in a.daemon.store.pinned()
        assert (await ask(sock, "release", job=job.name))["t"] == "released"
        await wait_until(lambda: not inflight, REPLY_S, "the fetches' cancellation")
        await wait_until(lambda: not a.daemon._tasks, REPLY_S, "the run's and prefetch's end")
        assert a.daemon.store.pinned() == {}
        assert list((a.daemon.store.root / "incoming").iterdir()) == []  # no half file left
        assert not await sock.poll(SILENCE_S * 1000)  # no report for a job gone


async def test_a_prefetch_that_finds_no_source_says_why(
    tmp_path: Path, grid: GridKey, job: Job
) -> None:
    ref = job.stage("gone.bin", b"x" * 100)
    missing = FileRef("ab" * 32, 100)  # the coordinator does not hold it
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        got = await ask(sock, "prefetch", **job.prefetch_fields((missing, [job.source])))
        assert got["t"] == "prefetched" and got["digest"] == missing.digest
        assert (got["source"], got["bytes"]) == ("", 0)
        assert "does not hold the file" in got["error"]
        assert a.daemon.store.pinned() == {}  # nothing to keep
        del ref


# -- probe -----------------------------------------------------------------------------------


async def test_a_probe_returns_exactly_the_files_the_peer_holds_in_any_state(
    tmp_path: Path, grid: GridKey, job: Job, coordinators: Coordinators
) -> None:
    held = job.stage("held.bin", b"held\n" * 1000)
    absent = FileRef(digest(b"never seen"), 10)
    async with live_peer(tmp_path / "a", grid) as a:
        sock = await job.reserve(a)
        await ask(sock, "prefetch", **job.prefetch_fields((held, [job.source])))
        # Another coordinator of the grid, which does not hold the peer, may ask.
        other = coordinators.job("job-2", tmp_path / "other").connect(a)
        probe = [absent.digest, held.digest, held.digest]
        assert await ask(other, "probe", digests=probe) == {
            "v": 1,
            "t": "holding",
            "digests": [held.digest],
        }
        assert (await ask(sock, "release", job=job.name))["t"] == "released"
        assert a.daemon.core is not None and a.daemon.core.state is PeerState.IDLE
        assert (await ask(other, "probe", digests=probe))["digests"] == [held.digest]
        assert (await ask(other, "probe", digests=[]))["digests"] == []
        assert (await ask(other, "probe", digests=["../../etc/passwd"]))["t"] == "error"


# -- job pins --------------------------------------------------------------------------------


async def test_job_outputs_survive_cache_pressure_until_the_reservation_ends(
    tmp_path: Path, grid: GridKey, job: Job, coordinators: Coordinators
) -> None:
    produce = "head -c 24576 /dev/urandom > out.dat"
    inputs = [job.stage(f"in{i}.bin", os.urandom(24 * KIB)) for i in range(3)]
    async with live_peer(tmp_path / "a", grid, cache_size=64 * KIB) as a:
        store = a.daemon.store
        sock = await job.reserve(a)
        made = await run_task(sock, job.run_fields("produce", produce, outputs=("out.dat",)))
        [[_, out_digest, _]] = made["outputs"]
        for i, ref in enumerate(inputs):  # 3 x 24 KiB more through a 64 KiB cache
            fields = job.run_fields(f"read{i}", "test -s in.bin", {"in.bin": (ref, [job.source])})
            assert (await run_task(sock, fields))["exit_code"] == 0
            assert store.locate(out_digest) is not None, f"evicted by read{i}"
        assert store.locate(inputs[0].digest) is None  # LRU went on around the pinned output
        # With the output pinned, 48 KiB more do not fit: the task fails, the output stays.
        big = job.stage("big.bin", os.urandom(48 * KIB))
        fields = job.run_fields("big", "test -s big.bin", {"big.bin": (big, [job.source])})
        refused = await run_task(sock, fields)
        assert "cache is full" in refused["error"] and store.locate(out_digest) is not None

        assert (await ask(sock, "release", job=job.name))["t"] == "released"
        assert store.pinned() == {}
        second = coordinators.job("job-2", tmp_path / "second")
        try:
            big = second.stage("big.bin", os.urandom(48 * KIB))
            sock = await second.reserve(a)
            fields = second.run_fields(
                "big", "test -s big.bin", {"big.bin": (big, [second.source])}
            )
            assert (await run_task(sock, fields))["exit_code"] == 0
            assert store.locate(out_digest) is None  # evictable once its job was gone
        finally:
            await second.close()
