"""Service runs on a real worker daemon on 127.0.0.1, driven by this test as the coordinator.

The service is a small HTTP server (Python's http.server) that binds the port the worker
picked, writes its ready file, and starts a `sleep` in a session of its own (a daemon that
double-forks): what the worker must stop with it, whatever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
import zmq.asyncio

from bonjourgrid import keys, wire
from bonjourgrid.backends.base import ServiceSpec
from bonjourgrid.cache.local import SANDBOXES
from bonjourgrid.coordinator.services import PeerServices, ServiceError
from bonjourgrid.protocol import Message
from bonjourgrid.worker import reaper
from bonjourgrid.worker.core import PeerState
from bonjourgrid.worker.daemon import WorkerConfig, WorkerDaemon
from bonjourgrid.worker.idle import IdleSettings
from tests.inproc.test_worker_daemon import REPLY_S, Coordinator, Peer
from tests.waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("quick_timing")]

GONE_S = 5.0  # a stopped service's processes are gone within the grace period and a SIGKILL

# argv: host, port, marker of the background sleep
SERVER = """
import http.server, pathlib, subprocess, sys
server = http.server.HTTPServer(
    (sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler
)
subprocess.Popen(["setsid", "sleep", sys.argv[3]])
pathlib.Path("ready").write_text("up")
server.serve_forever()
"""


def server_start(job: str, marker: str, **changes: Any) -> dict[str, Any]:
    """The fields of a `service_start` of the HTTP server."""
    return {
        "job": job,
        "name": "web",
        "argv": [sys.executable, "-c", SERVER, "{host}", "{port:http}", marker],
        "files": {"conf/web.conf": "listen {host}:{port:http}\nhome {dir}\n{json: 1}\n"},
        "secrets": {"auth.key": b"\x00secret\xff"},
        "ports": ["http", "spare"],
        "env": {"WEB_HOME": "{dir}"},
        "ready_file": "ready",
        **changes,
    }


def processes_of(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names `marker` (the server and its sleep)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=REPLY_S) as response:
        return str(response.read().decode())


@contextlib.asynccontextmanager
async def running(config: WorkerConfig) -> AsyncIterator[Peer]:
    daemon = WorkerDaemon(config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_until(lambda: daemon.ready.is_set() or task.done(), REPLY_S, "daemon ready")
        if task.done():
            await task  # raises what stopped it from starting
        assert daemon.keypair is not None and config.grid is not None
        yield Peer(
            daemon,
            config.grid,
            f"tcp://127.0.0.1:{daemon._control_port}",
            daemon.keypair.public.decode(),
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert daemon.core is not None
    daemon.core.validate_state()


def config(tmp_path: Path, **changes: Any) -> WorkerConfig:
    return WorkerConfig(
        name=f"svc-{uuid.uuid4().hex[:8]}",
        cpus=1,
        ram_mib=512,
        cost=0.0,
        cache_dir=tmp_path / "cache",
        grid=keys.ephemeral_grid_key(),
        interface="127.0.0.1",
        middleware=("native",),
        **changes,
    )


@pytest_asyncio.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    async with running(config(tmp_path)) as peer:
        yield peer


@pytest_asyncio.fixture
async def coordinator(
    zctx: zmq.asyncio.Context, peer: Peer, tmp_path: Path
) -> AsyncIterator[Coordinator]:
    c = Coordinator(zctx, peer, tmp_path / "submit")
    yield c
    await c.close()


async def start_server(coordinator: Coordinator, sock: Any, marker: str) -> dict[str, Any]:
    reply = await coordinator.ask(sock, "service_start", **server_start("job-1", marker))
    assert reply["t"] == "service_up", reply
    return reply


def service_dirs(peer: Peer) -> list[Path]:
    return sorted((peer.daemon.store.root / SANDBOXES).glob("service-*"))


async def test_a_service_starts_on_its_ports_with_its_files_and_stops_with_its_group(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    marker = f"3000.{uuid.uuid4().int % 10**9}"
    up = await start_server(coordinator, sock, marker)
    ports, directory = up["ports"], Path(up["directory"])
    assert set(ports) == {"http", "spare"} and ports["http"] != ports["spare"]

    # Reachable on the port the worker picked, and serving its {dir}: the config file with
    # its placeholders filled in, other braces as they were.
    conf = await asyncio.to_thread(get, f"http://127.0.0.1:{ports['http']}/conf/web.conf")
    assert conf == f"listen 127.0.0.1:{ports['http']}\nhome {directory}\n{{json: 1}}\n"
    assert stat.S_IMODE((directory / "auth.key").stat().st_mode) == 0o600
    assert (directory / "auth.key").read_bytes() == b"\x00secret\xff"
    assert stat.S_IMODE(directory.parent.stat().st_mode) == 0o700
    server, sleeper = sorted(processes_of(marker), key=lambda p: "sleep" in p.cmdline())
    assert server.environ()["WEB_HOME"] == str(directory)
    assert sleeper.environ()[reaper.MARKER].startswith(str(peer.daemon.store.root / SANDBOXES))
    assert peer.daemon.core is not None and peer.daemon.core.running == {}  # no task slot

    # A heartbeat still answers while the service runs.
    ack = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=30.0)
    assert ack["t"] == "heartbeat_ack"

    reply = await coordinator.ask(sock, "service_stop", job="job-1", name="web")
    assert reply["t"] == "service_exited" and reply["stopped"] is True
    assert processes_of(marker) == []  # the server and the sleep that left its group
    assert not directory.exists() and service_dirs(peer) == []
    # The name is free again.
    await start_server(coordinator, sock, marker)


@pytest.mark.parametrize("how", ["release", "lease expiry"])
async def test_a_service_stops_when_the_lease_ends(
    peer: Peer, coordinator: Coordinator, how: str
) -> None:
    lease_s = 30.0 if how == "release" else 1.0
    sock = await coordinator.reserve("job-1", lease_s=lease_s)
    marker = f"3000.{uuid.uuid4().int % 10**9}"
    await start_server(coordinator, sock, marker)
    assert len(processes_of(marker)) == 2
    if how == "release":
        assert (await coordinator.ask(sock, "release", job="job-1"))["t"] == "released"
    await wait_until(lambda: peer.state is PeerState.IDLE, 5, "the lease ending")
    await wait_until(lambda: not processes_of(marker), GONE_S, "the service's processes ending")
    await wait_until(lambda: not service_dirs(peer), GONE_S, "the service's directory going")


async def test_a_service_stops_when_the_owner_stays_past_vacate_after(
    tmp_path: Path, zctx: zmq.asyncio.Context
) -> None:
    activity = tmp_path / "owner-active"  # touched: the owner is at the desk
    idle = IdleSettings(idle_after_s=600.0, max_load=1.0, activity_file=activity)
    # A service (a middleware's daemon) is not suspended: it runs on until the vacate.
    settings = config(tmp_path, always_idle=False, idle=idle, vacate_after_s=0.5)
    async with running(settings) as peer:
        coordinator = Coordinator(zctx, peer, tmp_path / "submit")
        try:
            sock = await coordinator.reserve("job-1")
            marker = f"3000.{uuid.uuid4().int % 10**9}"
            await start_server(coordinator, sock, marker)
            activity.touch()
            reply = await coordinator.recv(sock, timeout=GONE_S)
            assert (reply["t"], reply["state"]) == ("suspension", "suspended")
            assert processes_of(marker)  # still running while the owner may leave again
            reply = await coordinator.recv(sock, timeout=GONE_S)
            assert reply["t"] == "preempted"
            await wait_until(lambda: not processes_of(marker), GONE_S, "the service ending")
            await wait_until(lambda: not service_dirs(peer), GONE_S, "its directory going")
            assert peer.state is PeerState.BUSY
        finally:
            await coordinator.close()


async def test_a_service_that_cannot_start_is_reported_with_its_log(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    script = "echo 'fatal: no config' >&2; exit 4"
    fields = server_start("job-1", "x", argv=["sh", "-c", script], files={}, secrets={})
    reply = await coordinator.ask(sock, "service_start", **fields)
    assert reply["t"] == "service_failed"
    assert "exited (4) before it wrote 'ready'" in reply["reason"]
    assert "fatal: no config" in reply["reason"]

    missing = server_start("job-1", "x", argv=["no-such-daemon-here"], files={}, secrets={})
    reply = await coordinator.ask(sock, "service_start", **missing)
    assert reply["t"] == "service_failed" and "could not start" in reply["reason"]
    assert service_dirs(peer) == []
    # A malformed one is answered with what is wrong.
    bad = server_start("job-1", "x", files={"../escape": "x"})
    reply = await coordinator.ask(sock, "service_start", **bad)
    assert reply["t"] == "service_failed" and "would escape" in reply["reason"]


async def test_a_service_that_dies_on_its_own_is_reported(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    script = "touch ready; sleep 0.2; echo 'segfault, say' >&2; exit 3"
    fields = server_start("job-1", "x", argv=["sh", "-c", script], files={}, secrets={})
    assert (await coordinator.ask(sock, "service_start", **fields))["t"] == "service_up"
    reply = await coordinator.recv(sock)
    assert reply["t"] == "service_exited" and reply["stopped"] is False
    assert reply["exit_code"] == 3 and "segfault, say" in reply["log_tail"]
    await wait_until(lambda: not service_dirs(peer), GONE_S, "its directory going")


async def test_only_the_job_holding_the_peer_may_start_a_service(
    peer: Peer, coordinator: Coordinator
) -> None:
    await coordinator.reserve("job-1")
    other = coordinator.connect()
    reply = await coordinator.ask(other, "service_start", **server_start("job-1", "x"))
    assert reply["t"] == "denied"
    assert service_dirs(peer) == []


async def test_peer_services_start_and_stop_a_service_over_a_link(
    peer: Peer, coordinator: Coordinator
) -> None:
    """The coordinator's ServiceControl, with this test's socket as the peer's link."""
    sock = await coordinator.reserve("job-1")

    async def send(name: str, message: Message) -> None:
        assert name == "p1"
        await sock.send(wire.encode(message))

    services = PeerServices("job-1", send, stop_timeout_s=GONE_S)

    async def route() -> None:
        while True:
            services.deliver("p1", wire.decode(await sock.recv()))

    router = asyncio.create_task(route())
    try:
        marker = f"3000.{uuid.uuid4().int % 10**9}"
        fields = server_start("job-1", marker)
        spec = ServiceSpec(
            fields["name"],
            tuple(fields["argv"]),
            fields["files"],
            fields["secrets"],
            tuple(fields["ports"]),
            fields["env"],
            fields["ready_file"],
        )
        started = await services.start_service("p1", spec)
        assert started.peer == "p1" and set(started.ports) == {"http", "spare"}
        page = await asyncio.to_thread(
            get, f"http://127.0.0.1:{started.ports['http']}/conf/web.conf"
        )
        assert page.startswith("listen 127.0.0.1:")
        with pytest.raises(ServiceError, match="did not start: a service named 'web' already"):
            await services.start_service("p1", spec)
        await services.stop_service("p1", "web")
        assert processes_of(marker) == [] and service_dirs(peer) == []
        await services.stop_service("p1", "web")  # stopped already: nothing to do
    finally:
        router.cancel()
        await asyncio.gather(router, return_exceptions=True)
