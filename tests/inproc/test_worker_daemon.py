"""A real worker daemon on 127.0.0.1, driven by this test acting as a coordinator over CURVE."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from bonjourgrid import keys, wire
from bonjourgrid.cache.store import FileIndex, FileRef, hash_file
from bonjourgrid.cache.transfer import DataServer, Fetcher, Source
from bonjourgrid.keys import GridKey, Keypair
from bonjourgrid.worker.core import PeerState
from bonjourgrid.worker.daemon import WorkerConfig, WorkerDaemon
from tests.waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("quick_timing")]

REPLY_S = 5.0  # a live peer on loopback answers in milliseconds; this only bounds a failure
SILENCE_S = 0.3  # how long "no reply at all" is waited for


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Peer:
    """The daemon under test and what a coordinator learns from its advertisement."""

    daemon: WorkerDaemon
    grid: GridKey
    control: str  # endpoint of the control socket
    key: str  # the daemon's CURVE public key (Z85), as in its `key` TXT entry

    @property
    def state(self) -> PeerState:
        assert self.daemon.core is not None
        return self.daemon.core.state

    @property
    def data_port(self) -> int:
        assert self.daemon.core is not None
        return self.daemon.core.data_port


@pytest_asyncio.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    grid = keys.ephemeral_grid_key()
    daemon = WorkerDaemon(
        WorkerConfig(
            name=f"test-{uuid.uuid4().hex[:8]}",
            cpus=2,
            ram_mib=512,
            cost=0.0,
            cache_dir=tmp_path / "cache",
            grid=grid,
            interface="127.0.0.1",
        )
    )
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait([running, ready], timeout=REPLY_S, return_when=asyncio.FIRST_COMPLETED)
    if not daemon.ready.is_set():
        ready.cancel()
        stop.set()
        await running  # raises what stopped it from starting
        pytest.fail(f"the daemon was not ready within {REPLY_S} s")
    assert daemon.keypair is not None
    yield Peer(
        daemon, grid, f"tcp://127.0.0.1:{daemon._control_port}", daemon.keypair.public.decode()
    )
    stop.set()
    await asyncio.wait_for(running, 10)
    if daemon.core is not None:
        daemon.core.validate_state()


class Coordinator:
    """This test, in the coordinator's role: control connections and a data server for inputs."""

    def __init__(self, ctx: zmq.asyncio.Context, peer: Peer, submit_dir: Path) -> None:
        self.ctx = ctx
        self.peer = peer
        self.submit_dir = submit_dir
        self.started: list[tuple[str, int]] = []  # (task, attempt) of `started` messages
        self.keypair = Keypair.generate()  # the coordinator's own data-server key
        self.job_keys: dict[str, Keypair] = {}  # one CURVE keypair per job, as in `reserve`
        self.index = FileIndex()
        # Who may fetch from this coordinator: the jobs' keys (the peer fetches with them).
        self.policy = wire.KeyPolicy()
        self.auth: AsyncioAuthenticator | None = None
        self.server: asyncio.Task[None] | None = None
        self.source: Source | None = None

    def connect(self, keypair: Keypair | None = None) -> zmq.asyncio.Socket:
        """A DEALER to the peer's control socket, proving the grid key unless told otherwise."""
        sock = wire.client_socket(
            self.ctx, keypair or self.peer.grid.keypair(), self.peer.key, wire.MAX_CONTROL_FRAME
        )
        sock.connect(self.peer.control)
        return sock

    async def recv(self, sock: zmq.asyncio.Socket, timeout: float = REPLY_S) -> dict[str, Any]:
        """The next message other than `started` (those are kept in `self.started`)."""
        while True:
            assert await sock.poll(timeout * 1000), f"no reply within {timeout} s"
            msg = wire.as_map(wire.decode(await sock.recv()))
            if msg["t"] != "started":
                return msg
            self.started.append((msg["task"], msg["attempt"]))

    async def ask(self, sock: zmq.asyncio.Socket, msg_type: str, **fields: Any) -> dict[str, Any]:
        await sock.send(wire.pack_raw(msg_type, **fields))
        return await self.recv(sock)

    def job_key(self, job: str) -> Keypair:
        if job not in self.job_keys:
            self.job_keys[job] = Keypair.generate()
            self.policy.allowed.add(self.job_keys[job].public)
        return self.job_keys[job]

    def reserve_fields(
        self, job: str, lease_s: float = 30.0, coordinator: str = "test"
    ) -> dict[str, Any]:
        """The fields of a `reserve` for `job`, with its job keypair."""
        keys = self.job_key(job)
        assert keys.secret is not None
        return {
            "job": job,
            "lease_s": lease_s,
            "coordinator": coordinator,
            "job_public": keys.public.decode(),
            "job_secret": keys.secret.decode(),
        }

    async def reserve(self, job: str, lease_s: float = 30.0) -> zmq.asyncio.Socket:
        sock = self.connect()
        reply = await self.ask(sock, "reserve", **self.reserve_fields(job, lease_s))
        assert reply["t"] == "reserved", reply
        return sock

    def serve(self, name: str, data: bytes) -> FileRef:
        """Stage an input file in the submit directory and serve it to the peer."""
        path = self.submit_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        ref = self.index.add(path)
        if self.server is None:
            self.auth = wire.start_authenticator(self.ctx, {"data": self.policy})
            sock = wire.server_socket(self.ctx, self.keypair, "data", 4096)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.server = asyncio.create_task(DataServer(sock, self.index.locate).serve_forever())
            self.source = Source(
                f"tcp://127.0.0.1:{port}", self.keypair.public.decode(), "coordinator"
            )
        return ref

    def run_fields(
        self,
        job: str,
        task: str,
        command: str,
        inputs: dict[str, FileRef] | None = None,
        outputs: tuple[str, ...] = (),
        attempt: int = 1,
    ) -> dict[str, Any]:
        src = self.source
        sources = [[src.endpoint, src.server_key, src.label]] if src else []
        return {
            "job": job,
            "task": task,
            "attempt": attempt,
            "command": command,
            "inputs": [[p, r.digest, r.size, sources] for p, r in (inputs or {}).items()],
            "outputs": list(outputs),
            "env": {},
            "limits": {},
        }

    async def close(self) -> None:
        if self.server is not None:
            self.server.cancel()
            await asyncio.gather(self.server, return_exceptions=True)
        if self.auth is not None:
            self.auth.stop()


@pytest_asyncio.fixture
async def coordinator(
    zctx: zmq.asyncio.Context, peer: Peer, tmp_path: Path
) -> AsyncIterator[Coordinator]:
    c = Coordinator(zctx, peer, tmp_path / "submit")
    yield c
    await c.close()


# -- reservations ------------------------------------------------------------------------------


async def test_a_peer_is_reserved_by_one_job_at_a_time(
    peer: Peer, coordinator: Coordinator
) -> None:
    first = coordinator.connect()
    reply = await coordinator.ask(first, "reserve", **coordinator.reserve_fields("job-1"))
    assert reply == {
        "v": 1,
        "t": "reserved",
        "job": "job-1",
        "data_port": peer.data_port,
        "cpus": 2,
    }
    assert peer.state is PeerState.RESERVED

    second = coordinator.connect()
    reply = await coordinator.ask(second, "reserve", **coordinator.reserve_fields("job-2"))
    assert reply["t"] == "denied" and "job-1" in reply["reason"]
    # Nor may the other job use the peer it does not hold.
    run = coordinator.run_fields("job-2", "t", "true")
    assert (await coordinator.ask(second, "run", **run))["t"] == "denied"


async def test_release_makes_the_peer_idle_for_the_next_job(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    assert await coordinator.ask(sock, "release", job="job-1") == {
        "v": 1,
        "t": "released",
        "job": "job-1",
    }
    assert peer.state is PeerState.IDLE
    await coordinator.reserve("job-2")


async def test_a_lease_without_heartbeats_runs_out(peer: Peer, coordinator: Coordinator) -> None:
    sock = await coordinator.reserve("job-1", lease_s=0.5)
    assert (await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=0.5))["t"] == (
        "heartbeat_ack"
    )
    took = await wait_until(lambda: peer.state is PeerState.IDLE, 1.5, "lease expiry")
    assert took >= 0.4  # not before the lease ran out
    reply = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=0.5)
    assert reply["t"] == "denied" and "expired" in reply["reason"]


async def test_a_client_without_the_grid_key_gets_no_reply(
    peer: Peer, coordinator: Coordinator
) -> None:
    outsider = coordinator.connect(Keypair.generate())
    await outsider.send(wire.pack_raw("reserve", **coordinator.reserve_fields("intruder")))
    assert not await outsider.poll(SILENCE_S * 1000)
    assert peer.state is PeerState.IDLE
    await coordinator.reserve("job-1")  # the grid's coordinators are still served


# -- tasks -------------------------------------------------------------------------------------


async def test_a_task_runs_and_its_output_is_fetchable_from_the_peer(
    peer: Peer, coordinator: Coordinator, zctx: zmq.asyncio.Context
) -> None:
    sock = await coordinator.reserve("job-1")
    text = b"hello, desktop grid\n" * 1000
    ref = coordinator.serve("in.txt", text)
    command = "tr a-z A-Z < in.txt > out.txt"
    fields = coordinator.run_fields("job-1", "upper", command, {"in.txt": ref}, ("out.txt",))
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    expected = text.upper()
    assert done["t"] == "task_done" and done["task"] == "upper" and done["attempt"] == 1
    assert (done["exit_code"], done["error"]) == (0, "")
    assert done["outputs"] == [["out.txt", digest(expected), len(expected)]]
    assert done["bytes_fetched"] == len(text)
    assert (done["fetched"], done["hit_bytes"]) == ([[ref.digest, "coordinator", len(text)]], 0)
    sandboxes = peer.daemon.store.root / "sandboxes"
    await wait_until(lambda: not any(sandboxes.iterdir()), REPLY_S, "the sandbox's removal")

    # The output stays on the peer; the coordinator fetches it from the peer's data port.
    fetcher = Fetcher(zctx, peer.grid.keypair())
    try:
        source = Source(f"tcp://127.0.0.1:{peer.data_port}", peer.key, "peer")
        output = FileRef(digest(expected), len(expected))
        await fetcher.fetch(output, [source], coordinator.submit_dir / "out.txt")
    finally:
        fetcher.close()
    assert (coordinator.submit_dir / "out.txt").read_bytes() == expected

    # The input is now in the peer's cache: the next task that reads it fetches nothing.
    fields = coordinator.run_fields("job-1", "count", "wc -c < in.txt", {"in.txt": ref})
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    assert (done["exit_code"], done["bytes_fetched"], done["fetched"]) == (0, 0, [])
    assert done["hit_bytes"] == len(text)


async def test_a_failing_command_reports_its_exit_code_and_stderr(
    coordinator: Coordinator,
) -> None:
    sock = await coordinator.reserve("job-1")
    command = "echo 'cannot open raw/1.fits' >&2; exit 3"
    await sock.send(wire.pack_raw("run", **coordinator.run_fields("job-1", "proj", command)))
    done = await coordinator.recv(sock)
    assert done["t"] == "task_done" and done["exit_code"] == 3
    assert "cannot open raw/1.fits" in done["stderr_tail"]
    assert done["outputs"] == []


async def test_an_output_that_is_a_symlink_is_refused(peer: Peer, coordinator: Coordinator) -> None:
    sock = await coordinator.reserve("job-1")
    fields = coordinator.run_fields("job-1", "t", "ln -s /etc/passwd out.txt", outputs=("out.txt",))
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    assert done["t"] == "task_done"
    assert "not a regular file" in done["error"]
    assert done["outputs"] == []
    assert peer.daemon.store.locate(hash_file(Path("/etc/passwd")).digest) is None


async def test_release_stops_the_jobs_running_tasks(peer: Peer, coordinator: Coordinator) -> None:
    sock = await coordinator.reserve("job-1")
    await sock.send(wire.pack_raw("run", **coordinator.run_fields("job-1", "t", "sleep 30")))
    me = psutil.Process()

    def sleepers() -> list[psutil.Process]:
        found = []
        for process in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it may end while we look at it
                alive = process.status() != psutil.STATUS_ZOMBIE
                if alive and "sleep" in " ".join(process.cmdline()):
                    found.append(process)
        return found

    await wait_until(lambda: bool(sleepers()), REPLY_S, "the task's start")
    assert (await coordinator.ask(sock, "release", job="job-1"))["t"] == "released"
    await wait_until(lambda: not sleepers(), REPLY_S, "the task's end")
    assert peer.state is PeerState.IDLE


# -- the boundary ------------------------------------------------------------------------------


def _bad_runs(good: dict[str, Any]) -> dict[str, dict[str, Any]]:
    source = ["tcp://127.0.0.1:1", "key", "coordinator"]
    entry = ["in.txt", "ab" * 32, 3, [source]]
    return {
        "input escapes": {**good, "inputs": [["../x", *entry[1:]]]},
        "absolute input": {**good, "inputs": [["/etc/passwd", *entry[1:]]]},
        "home input": {**good, "inputs": [["~/x", *entry[1:]]]},
        "output escapes": {**good, "outputs": ["sub/../../out"]},
        "absolute output": {**good, "outputs": ["/tmp/out"]},
        "output not a string": {**good, "outputs": [3]},
        "digest not hex": {**good, "inputs": [["in.txt", "x" * 64, 3, [source]]]},
        "negative size": {**good, "inputs": [["in.txt", "ab" * 32, -1, [source]]]},
        "input entry too short": {**good, "inputs": [["in.txt", "ab" * 32]]},
        "source entry malformed": {**good, "inputs": [[*entry[:3], [["tcp://x", 1, "c"]]]]},
        "env value not a string": {**good, "env": {"A": 1}},
    }


async def test_a_malformed_run_is_refused_with_its_reason_and_takes_no_slot(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    good = coordinator.run_fields("job-1", "t", "true", outputs=("out.txt",))
    bad = {
        **_bad_runs(good),
        "command over 64 KiB": {**good, "command": "x" * (wire.MAX_STRING + 1)},
        "NUL in an env value": {**good, "env": {"A": "1\x00"}},
        "a path twice": {**good, "outputs": ["out.txt", "out.txt"]},
    }
    for what, fields in bad.items():
        reply = await coordinator.ask(sock, "run", **fields)
        # Refused, and said of which run: its coordinator fails that attempt at once.
        assert (reply["t"], reply["task"], reply["attempt"]) == ("refused", "t", 1), what
        assert reply["reason"], what
    reply = await coordinator.ask(sock, "run", **_bad_runs(good)["input escapes"])
    assert "escape" in reply["reason"]
    assert peer.daemon.core is not None and peer.daemon.core.running == {}
    ack = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=30.0)
    assert ack == {"v": 1, "t": "heartbeat_ack", "job": "job-1", "running": []}
    assert coordinator.started == []


async def test_a_run_is_acknowledged_before_it_is_reported_and_listed_while_it_runs(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    await sock.send(wire.pack_raw("run", **coordinator.run_fields("job-1", "t", "sleep 30")))
    assert await sock.poll(REPLY_S * 1000)
    started = wire.as_map(wire.decode(await sock.recv()))
    assert (started["t"], started["task"], started["attempt"]) == ("started", "t", 1)
    ack = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=30.0)
    assert ack["running"] == [["t", 1]]
    await sock.send(wire.pack_raw("cancel", job="job-1", task="t"))
    ack = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=30.0)
    assert ack["running"] == []


async def test_garbage_on_the_control_socket_never_stops_the_peer(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = coordinator.connect()
    for frame in (
        b"",
        b"\xc1 definitely not msgpack",
        wire.pack_raw("chunk", digest="ab" * 32, offset=0, data=b"x"),  # a data-plane message
        wire.pack_raw("reserve", **coordinator.reserve_fields("j", lease_s=-1.0)),
        wire.pack_raw("reserve", **coordinator.reserve_fields("j", lease_s=1e9)),
        wire.pack_raw("reserve", **coordinator.reserve_fields("j", lease_s=float("nan"))),
        wire.pack_raw("reserve", **coordinator.reserve_fields("j", lease_s=True)),
        wire.pack_raw("reserve", job="j", lease_s=30.0, coordinator="h"),  # no job keys
        wire.pack_raw("reserve", **{**coordinator.reserve_fields("j"), "job_secret": ""}),
        wire.pack_raw("reserve", **{**coordinator.reserve_fields("j"), "job_public": "x" * 39}),
        wire.pack_raw(  # a secret that is not the public key's other half
            "reserve",
            **{
                **coordinator.reserve_fields("j"),
                "job_secret": coordinator.reserve_fields("k")["job_secret"],
            },
        ),
    ):
        await sock.send(frame)
        assert (await coordinator.recv(sock))["t"] == "error", frame[:40]
    await sock.send_multipart([b"two", b"frames"])  # not one message: dropped (or an error)
    # A frame over the control limit makes libzmq drop that connection, and only that one.
    flooder = coordinator.connect()
    await flooder.send(b"\x00" * (wire.MAX_CONTROL_FRAME + 4096))

    await sock.send(wire.pack_raw("reserve", **coordinator.reserve_fields("job-1")))
    while (reply := await coordinator.recv(sock))["t"] == "error":
        pass
    assert reply["t"] == "reserved"
    assert peer.state is PeerState.RESERVED


# -- hostile and concurrent runs -------------------------------------------------------------


async def test_a_command_the_shell_cannot_take_is_reported_and_frees_its_slot(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    await sock.send(wire.pack_raw("run", **coordinator.run_fields("job-1", "t", "true\x00rm")))
    answered = await sock.poll(500)
    # Retrieved here, a crashed run shows in this test instead of at garbage collection.
    crashed = [t.exception() for _, t in peer.daemon.runs.values() if t.done()]
    assert crashed == [], f"the run crashed: {crashed[0]!r}"
    assert answered, "no reply within 0.5 s"
    reply = wire.as_map(wire.decode(await sock.recv()))
    assert (reply["t"], reply["task"], reply["attempt"]) == ("refused", "t", 1)
    assert "NUL" in reply["reason"]
    assert peer.daemon.core is not None and peer.daemon.core.running == {}


async def test_two_tasks_reading_the_same_input_at_once_both_succeed(
    coordinator: Coordinator,
) -> None:
    sock = await coordinator.reserve("job-1")  # the peer has 2 slots
    ref = coordinator.serve("shared.dat", os.urandom(4 * wire.CHUNK_SIZE))
    for task in ("a", "b"):
        fields = coordinator.run_fields("job-1", task, "test -s shared.dat", {"shared.dat": ref})
        await sock.send(wire.pack_raw("run", **fields))
    reports = [await coordinator.recv(sock), await coordinator.recv(sock)]
    assert [(r["exit_code"], r["error"]) for r in reports] == [(0, ""), (0, "")]


@pytest.mark.parametrize(
    ("name", "command"),
    [("in.txt", "echo changed > in.txt"), (".stderr", "echo oops >&2")],
    ids=["task-writes-its-input", "input-named-.stderr"],
)
async def test_a_task_never_changes_a_cached_input(
    peer: Peer, coordinator: Coordinator, name: str, command: str
) -> None:
    sock = await coordinator.reserve("job-1")
    ref = coordinator.serve("log.txt", b"the original bytes\n")
    await sock.send(
        wire.pack_raw("run", **coordinator.run_fields("job-1", "t", command, {name: ref}))
    )
    await coordinator.recv(sock)  # refused, failed or succeeded: any is fine
    cached = peer.daemon.store.locate(ref.digest)
    assert cached is None or hash_file(cached) == ref


async def test_a_job_name_that_cannot_be_advertised_is_refused_and_the_peer_keeps_serving(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = coordinator.connect()
    await sock.send(wire.pack_raw("reserve", **coordinator.reserve_fields("my job")))
    reply = await coordinator.recv(sock, timeout=0.5)
    assert reply["t"] in ("error", "denied")
    assert peer.state is PeerState.IDLE
    await coordinator.reserve("job-1")
