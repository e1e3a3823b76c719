"""SIGINT and SIGTERM end a `bgrid submit` in every phase, and its peers are idle again.

Each test starts a submit, waits until it is in the phase under test (what it logs, what it
has open, what its task wrote), signals it, and waits for it with a deadline: a safety net,
not a timing assertion. Peers must be idle again well before their lease (10 s) would have
freed them: the submit released them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from bonjourgrid.discovery.txt import PEER_SERVICE
from bonjourgrid.keys import Keypair
from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, write_workflow
from tests.multiproc.test_hostile import plausible_txt
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

EXIT_DEADLINE_S = 5.0  # a signalled submit has ended by then (the goal is 1 s)
RELEASED_S = 5.0  # its peers are listed idle by then, under the 10 s lease
PHASE_S = 20.0  # the submit reaches the phase under test by then
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def start_submit(grid: Grid, wf: Path, *flags: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = wf.parent / "submit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            bgrid_cmd("-v", "submit", str(wf), "--interface", LOOPBACK, *flags),
            env=grid.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def wait_for(
    until: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Wait until `until()`; fail at once, with the submit's log, if the submit ends first."""
    wait_until(
        lambda: until() or proc.poll() is not None, PHASE_S, lambda: f"{what}:\n{log.read_text()}"
    )
    assert until(), f"submit ended before {what}:\n{log.read_text()}"


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, log: Path) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        code = proc.wait(EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(
            f"submit still running {EXIT_DEADLINE_S} s after {sig.name}:\n{log.read_text()}"
        )
    return code, log.read_text(errors="replace")


@pytest.fixture
def silent_peer(grid: Grid) -> Iterator[str]:
    """A fake peer of the grid, advertised on loopback, that never answers: a reservation
    round that asks it lasts a whole reservation timeout, so recruiting lasts a while."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    keypair = Keypair.generate()
    assert keypair.secret is not None
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keypair.public, keypair.secret
    port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
    name = f"silent-{grid.tag}"
    zc = Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    info = ServiceInfo(
        PEER_SERVICE,
        f"{name}.{PEER_SERVICE}",
        port=port,
        properties=plausible_txt(grid, name, key=keypair.public.decode()),
        addresses=[socket.inet_aton(LOOPBACK)],
        server=f"{name}.rogue.local.",
    )
    zc.register_service(info)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            zc.unregister_service(info)
        zc.close()
        sock.close()
        ctx.destroy(linger=0)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_recruiting_ends_the_submit_and_releases_its_peers(
    tmp_path: Path, grid: Grid, silent_peer: str, sig: signal.Signals
) -> None:
    real = grid.start_worker("r1")
    grid.wait_all_idle()
    wf = write_workflow(tmp_path / "wf", "tasks:\n  t: {command: 'echo x > o', outputs: [o]}\n")
    # Five peers wanted, two seen: it reserves the real one and waits on the silent one.
    proc, log = start_submit(grid, wf, "--workers", "5..5")
    wait_for(lambda: f"recruited {real}" in log.read_text(), proc, log, "recruited")
    code, output = stop(proc, sig, log)
    assert code == 128 + sig, output
    assert f"interrupted by {sig.name} while recruiting peers" in output
    grid.wait_all_idle(timeout=RELEASED_S)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_hashing_a_large_input_ends_the_submit(
    tmp_path: Path, grid: Grid, sig: signal.Signals
) -> None:
    grid.start_worker("h1")
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "wf", "tasks:\n  t: {command: 'wc -c big > o', inputs: [big], outputs: [o]}\n"
    )
    big = wf.parent / "big"
    with big.open("wb") as f:
        f.truncate(64 * 1024**3)  # sparse: a minute of hashing, no disk
    proc, log = start_submit(grid, wf)
    ps = psutil.Process(proc.pid)

    def hashing() -> bool:
        with contextlib.suppress(psutil.Error):
            return any(Path(f.path) == big for f in ps.open_files())
        return False

    wait_for(hashing, proc, log, "hashing the input")
    code, output = stop(proc, sig, log)
    assert code == 128 + sig, output
    assert f"interrupted by {sig.name} while staging inputs" in output
    grid.wait_all_idle(timeout=RELEASED_S)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_tasks_run_cancels_the_job_and_releases_its_peers(
    tmp_path: Path, grid: Grid, sig: signal.Signals
) -> None:
    grid.start_worker("t1")
    grid.start_worker("t2")
    grid.wait_all_idle()
    started = tmp_path / "started"
    tasks = "".join(
        f"  t{i}: {{command: 'touch {started}.{i}; sleep 60', outputs: [o{i}]}}\n" for i in range(2)
    )
    wf = write_workflow(tmp_path / "wf", "tasks:\n" + tasks)
    report = tmp_path / "report.json"
    proc, log = start_submit(grid, wf, "--workers", "2..2", "--report", str(report))
    wait_for(lambda: all(Path(f"{started}.{i}").exists() for i in range(2)), proc, log, "running")
    code, output = stop(proc, sig, log)
    assert code == 128 + sig, output  # 130 or 143, as a shell reports a stopped command
    assert f"cancelled by the user ({sig.name})" in output
    resume = f"bgrid submit {wf} --workers 2..2 --interface {LOOPBACK} --report {report} --resume"
    assert f"to go on from there: {resume}" in output
    said = json.loads(report.read_text())
    assert said["reason"] == f"cancelled by the user ({sig.name})", said
    assert said["status"] == "failed" and said["signal"] == sig.name
    grid.wait_all_idle(timeout=RELEASED_S)
