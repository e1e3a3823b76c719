"""Denial of service without a key, on a real LAN: a flood of idle TCP connections and a
crowd of fake peers that never answer. Every test ends with its jobs succeeded on the real
peers.

Four hosts: host 1 submits, host 2 runs the real worker, host 3 attacks (it holds no key it
could use: it only opens connections and advertises services). No timing is asserted here:
`benchmarks/fake_peers.py` measures what the fake peers cost.
"""

from __future__ import annotations

import resource
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.waiting import wait_until

from .conftest import Bgrid
from .fakes import advertise_fake_peers, flood, listening_ports
from .harness import SEEN_S, STARTED_S, LanGrid, Worker, share_grid_key
from .netns import Lan

_SUBMITTER, _WORKER, _ATTACKER = 0, 1, 2
_DESKTOP_FILES = 1024  # the usual soft limit of a desktop session's processes
_FLOOD = 1100  # idle connections per port: more than the desktop limit
_FAKES = 2000


@pytest.fixture(scope="module")
def keyed_lan(lan4: Lan, bgrid: Bgrid) -> Lan:
    share_grid_key(lan4, bgrid)
    return lan4


@pytest.fixture
def grid(keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[LanGrid, None, None]:
    lan_grid = LanGrid(keyed_lan, bgrid, tmp_path, _SUBMITTER)
    try:
        yield lan_grid
    finally:
        lan_grid.stop_workers()


def _desktop_worker(grid: LanGrid, role: str) -> Worker:
    """A worker started as a desktop session starts it: soft limit 1024 open files, hard
    limit above it (`prlimit` is what a session's ulimit is to its children)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    assert hard > 2 * _FLOOD + 200, f"this machine's hard open-file limit ({hard}) is too low"
    name = f"{role}-{grid.tag}"
    host = grid.lan.hosts[_WORKER]
    args = ("worker", "--name", name, "--cpus", "1", "--ram", "1GiB", "--always-idle")
    proc = host.popen(
        ["prlimit", f"--nofile={_DESKTOP_FILES}:{hard}", "--", *grid.bgrid.command(*args)]
    )
    worker = Worker(name, host, proc)
    grid.workers[name] = worker
    return worker


def test_a_flood_of_idle_connections_starves_neither_a_running_job_nor_a_new_submit(
    grid: LanGrid,
) -> None:
    worker = _desktop_worker(grid, "flooded")
    grid.wait_idle([worker], SEEN_S, "the worker is listed idle")
    ports = listening_ports(worker.host, worker.proc.pid)
    assert len(ports) == 2, f"expected a control and a data port, found {ports}"
    started = grid.tmp / "started"
    running = grid.start_submit(
        grid.workflow(
            "running",
            {"slow": {"command": f"touch {started}; sleep 4; echo done > out", "outputs": ["out"]}},
            subdir="running",
        )
    )
    wait_until(started.exists, STARTED_S, "the running job's task started")
    flooder = flood(grid.lan.hosts[_ATTACKER], worker.host.ip, ports, _FLOOD)
    try:
        first = running.finish()
        assert first.code == 0, first.explain()
        assert first.peers_used() == {worker.name}
        second = grid.submit(
            grid.workflow("during", {"t": {"command": "echo ok > out", "outputs": ["out"]}}, "new")
        )
        assert second.code == 0, second.explain()
        assert second.peers_used() == {worker.name}
        worker.assert_alive()
        assert flooder.proc.poll() is None, "the flood stopped before the submits ended"
    finally:
        flooder.stop()


def test_two_thousand_silent_fake_peers_do_not_stop_a_submit(grid: LanGrid) -> None:
    real = grid.start_worker("real", _WORKER, cost=0)
    grid.wait_idle([real], SEEN_S, "the real worker is listed idle")
    attacker = grid.lan.hosts[_ATTACKER]
    # The fakes copy a real peer's TXT and carry credentials of the grid: enrolled desktops
    # that froze, the worst case (without credentials they are not even contacted).
    key_dir = Path(attacker.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
    fakes = advertise_fake_peers(attacker, _FAKES, grid.tag, key_dir)
    try:
        done = grid.submit(
            grid.workflow("fakes", {"t": {"command": "echo ok > out", "outputs": ["out"]}})
        )
        assert done.code == 0, done.explain()
        assert [p["name"] for p in done.report["peers"]] == [real.name]
        assert done.peers_used() == {real.name}
    finally:
        fakes.stop()
