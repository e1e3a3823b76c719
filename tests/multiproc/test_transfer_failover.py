"""A data source in another process dies mid-file or serves bad bytes: the fetcher carries on.

Each failing source is a real process serving a file with the product's DataServer over
CURVE; it can be told to stop answering after some bytes, so that the test kills it
(SIGKILL) in the middle of a transfer, never before nor after it. The live source is a
DataServer in this process, in a zmq context of its own, so its served bytes can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.cache.store import FileRef, hash_file
from bonjourgrid.cache.transfer import DataServer, Fetcher, Source
from bonjourgrid.keys import Keypair
from tests.waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("quick_timing")]

MIB = 1024 * 1024
START_S = 15.0  # a Python process importing zmq starts in well under a second

# A data server process: serves the file at argv[1] whatever digest is asked, to the client
# key argv[2]; after argv[3] bytes (if >= 0) it answers nothing more, and waits to be killed.
_SERVER = """
import asyncio, sys
from pathlib import Path
import zmq.asyncio
from bonjourgrid import wire
from bonjourgrid.cache.transfer import DataServer
from bonjourgrid.keys import Keypair

class Stalling(DataServer):
    async def _handle(self, client, msg):
        if 0 <= STALL_AFTER <= self.bytes_served:
            await asyncio.Event().wait()
        return await super()._handle(client, msg)

async def main():
    ctx = zmq.asyncio.Context()
    keys = Keypair.generate()
    policy = wire.KeyPolicy({sys.argv[2].encode()})
    wire.start_authenticator(ctx, {"data": policy})
    sock = wire.server_socket(ctx, keys, "data", 4096)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    server = Stalling(sock, lambda digest: Path(sys.argv[1]), policy, host="")  # the wire
    print(port, keys.public.decode(), flush=True)
    await server.serve_forever()

STALL_AFTER = int(sys.argv[3])
asyncio.run(main())
"""


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    source: Source

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@contextlib.asynccontextmanager
async def server_process(
    path: Path, client: Keypair, label: str, stall_after: int = -1
) -> AsyncIterator[ServerProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        str(path),
        client.public.decode(),
        str(stall_after),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],  # the checkout, so `bonjourgrid` imports from it
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), START_S)
        port, key = line.decode().split()
        yield ServerProcess(proc, Source(f"tcp://127.0.0.1:{port}", key, label))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@dataclass
class LiveSource:
    server: DataServer
    source: Source


@contextlib.asynccontextmanager
async def live_source(path: Path, client: Keypair) -> AsyncIterator[LiveSource]:
    """A DataServer in this process serving `path`, in a zmq context of its own."""
    ctx = zmq.asyncio.Context()
    keys = Keypair.generate()
    auth = wire.start_authenticator(ctx, {"data": wire.KeyPolicy({client.public})})
    sock = wire.server_socket(ctx, keys, "data", 4096)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    server = DataServer(sock, lambda digest: path, host="")  # no same-host copy: the wire
    task = asyncio.create_task(server.serve_forever())
    try:
        yield LiveSource(server, Source(f"tcp://127.0.0.1:{port}", keys.public.decode(), "live"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        auth.stop()
        ctx.destroy(linger=0)


async def fetch_killing(
    fetcher: Fetcher,
    ref: FileRef,
    dying: ServerProcess,
    live: LiveSource,
    partial: Path,
    after: int,
) -> Source:
    """Fetch `ref` from `dying`, then `live`; SIGKILL `dying` once `after` bytes arrived."""
    fetch = asyncio.create_task(fetcher.fetch(ref, [dying.source, live.source], partial))
    try:
        await wait_until(
            lambda: partial.exists() and partial.stat().st_size >= after,
            START_S,
            f"the first {after} bytes from {dying.source.label}",
        )
        assert not fetch.done()
        await dying.kill()
        return await asyncio.wait_for(fetch, 30)
    finally:
        fetch.cancel()


def random_file(path: Path, size: int) -> FileRef:
    data = os.urandom(size)
    path.write_bytes(data)
    return FileRef(hashlib.sha256(data).hexdigest(), size)


@pytest.fixture
def client() -> Keypair:
    return Keypair.generate()


@pytest.fixture
def fetcher(zctx: zmq.asyncio.Context, client: Keypair) -> Iterator[Fetcher]:
    f = Fetcher(zctx, client)
    yield f
    f.close()


async def test_a_source_killed_mid_transfer_hands_the_rest_to_the_next_source(
    tmp_path: Path, client: Keypair, fetcher: Fetcher
) -> None:
    ref = random_file(tmp_path / "big.bin", 48 * MIB)
    partial = tmp_path / "incoming" / "big.part"
    async with (
        server_process(tmp_path / "big.bin", client, "dying", stall_after=16 * MIB) as dying,
        live_source(tmp_path / "big.bin", client) as live,
    ):
        assert await fetch_killing(fetcher, ref, dying, live, partial, 16 * MIB) == live.source
        assert hash_file(partial) == ref
        # The live source sent only what the dead one had not: the transfer went on from there.
        assert live.server.bytes_served == ref.size - 16 * MIB


async def test_a_source_serving_corrupt_bytes_is_discarded_for_the_next(
    tmp_path: Path, client: Keypair, fetcher: Fetcher
) -> None:
    ref = random_file(tmp_path / "true.bin", 3 * MIB + 5)
    random_file(tmp_path / "rotten.bin", ref.size)  # same size, other bytes, same name asked
    partial = tmp_path / "incoming" / "x.part"
    async with (
        server_process(tmp_path / "rotten.bin", client, "rotten") as rotten,
        live_source(tmp_path / "true.bin", client) as live,
    ):
        assert await fetcher.fetch(ref, [rotten.source, live.source], partial) == live.source
        assert hash_file(partial) == ref
        assert live.server.bytes_served == ref.size  # nothing of the rotten copy kept
        assert (fetcher.bytes_from["rotten"], fetcher.bytes_from["live"]) == (0, ref.size)


async def test_a_resumed_file_that_does_not_verify_is_fetched_again_whole(
    tmp_path: Path, client: Keypair, fetcher: Fetcher
) -> None:
    # The first source serves 2 MiB of wrong bytes, then dies; the second completes the file,
    # which cannot verify; the second source's bytes may be sound, so it is asked for all.
    ref = random_file(tmp_path / "true.bin", 4 * MIB)
    random_file(tmp_path / "rotten.bin", ref.size)
    partial = tmp_path / "incoming" / "x.part"
    async with (
        server_process(tmp_path / "rotten.bin", client, "rotten", stall_after=2 * MIB) as rotten,
        live_source(tmp_path / "true.bin", client) as live,
    ):
        assert await fetch_killing(fetcher, ref, rotten, live, partial, 2 * MIB) == live.source
        assert hash_file(partial) == ref
        assert live.server.bytes_served == (ref.size - 2 * MIB) + ref.size
