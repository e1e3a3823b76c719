"""Service runs of a real `bgrid worker` process: what a worker killed with -9 left running is
killed by the next one of the same cache, and `--middleware` reaches the TXT record."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import psutil
import zmq

from bonjourgrid import wire
from bonjourgrid.keys import Keypair, load_grid_key
from bonjourgrid.protocol import Message, Reserve, ServiceStart
from tests.multiproc.conftest import LOOPBACK, Grid
from tests.waiting import wait_until

REPLY_S = 10.0


def ask(sock: zmq.Socket[bytes], message: Message) -> Message:
    sock.send(wire.encode(message))
    assert sock.poll(REPLY_S * 1000), f"no reply to {message.TYPE} within {REPLY_S} s"
    return wire.decode(sock.recv())


def sleepers(marker: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["cmdline"] == ["sleep", marker] and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def test_a_service_dies_with_its_killed_worker_and_the_next_life_kills_what_escaped(
    tmp_path: Path, grid: Grid
) -> None:
    name = grid.start_worker("w", "--middleware", "slurm")
    (peer,) = grid.wait_all_idle().values()
    assert peer["mw"] == ["native", "slurm"]  # the flag, not what this machine has installed
    keypair = load_grid_key(grid.root / "config" / "bonjourgrid").keypair()
    job_keys = Keypair.generate()
    assert job_keys.secret is not None
    ctx = zmq.Context()
    sock = wire.client_socket(ctx, keypair, peer["key"], wire.MAX_CONTROL_FRAME)  # type: ignore[arg-type]
    marker = f"3000.{uuid.uuid4().int % 10**9}"
    try:
        sock.connect(f"tcp://{LOOPBACK}:{peer['port']}")
        reserve = Reserve("job-1", 30.0, "test", job_keys.public.decode(), job_keys.secret.decode())
        assert ask(sock, reserve).TYPE == "reserved"
        # A daemon that double-forks: its `sleep` leaves the group, and the worker's death.
        script = f"setsid sleep {marker} & touch ready; exec sleep {marker}"
        start = ServiceStart("job-1", "d", ("sh", "-c", script), ready_file="ready")
        assert ask(sock, start).TYPE == "service_up"
        assert len(sleepers(marker)) == 2
    finally:
        sock.close(linger=0)
        ctx.term()

    try:
        os.kill(grid.procs[name].pid, signal.SIGKILL)
        grid.procs[name].wait()
        # The service's own process dies with its worker (PR_SET_PDEATHSIG); the one that
        # left its session is out of the kernel's reach: the next life of the worker ends it.
        wait_until(lambda: len(sleepers(marker)) == 1, 20, "the service dying with its worker")

        grid.start_worker("w", "--middleware", "slurm")  # the same name: the same cache
        wait_until(lambda: not sleepers(marker), 20, "the previous life's service processes ending")
        grid.wait_all_idle()
    finally:
        for leftover in sleepers(marker):  # only when the test failed
            leftover.kill()
