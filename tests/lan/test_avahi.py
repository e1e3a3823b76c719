"""A desktop whose mDNS port another responder holds alone (avahi-daemon with
`disallow-other-stacks=yes`): `bgrid worker` and `bgrid submit` say in one line what to change.

The port is held by a socket bound to 0.0.0.0:5353 without SO_REUSEADDR/SO_REUSEPORT, as avahi
holds it, inside a test host's network namespace: the machine's own interfaces are untouched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

from bonjourgrid.discovery.advertise import MDNS_PORT_TAKEN
from tests.waiting import wait_until

from .conftest import Bgrid, _live_lan
from .netns import Host, Lan

_HOLD_PORT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))  # alone: no SO_REUSEADDR, no SO_REUSEPORT
print("holding", flush=True)
sys.stdin.read()  # until the test host is torn down
"""
_HOLD_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def lan1(tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    yield from _live_lan(1, tmp_path_factory)


@pytest.fixture(scope="module")
def held_host(lan1: Lan, bgrid: Bgrid) -> Host:
    """The LAN's host, its UDP port 5353 held alone, with a grid key."""
    host = lan1.hosts[0]
    assert bgrid(host, "keys", "init").returncode == 0
    proc = host.popen([sys.executable, "-c", _HOLD_PORT], stdin=subprocess.PIPE)  # kept open
    out = host.processes[-1].stdout_path
    wait_until(
        lambda: "holding" in out.read_text() or proc.poll() is not None,
        _HOLD_DEADLINE_S,
        "the port holder to bind 5353",
    )
    assert proc.poll() is None, f"the port holder ended: {host.describe_logs()}"
    return host


def _one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"bgrid: error: {MDNS_PORT_TAKEN}", stderr


def test_a_worker_says_what_to_change_when_avahi_holds_the_port(
    held_host: Host, bgrid: Bgrid
) -> None:
    out = bgrid(held_host, "worker", "--always-idle", "--name", "w1", timeout=30)
    assert out.returncode == 2, out.stderr
    _one_line_error(out.stderr)
    assert "disallow-other-stacks=no in /etc/avahi/avahi-daemon.conf" in out.stderr


def test_a_submit_says_what_to_change_when_avahi_holds_the_port(
    held_host: Host, bgrid: Bgrid, tmp_path: Path
) -> None:
    wf = held_host.dir / "wf.yaml"
    wf.write_text("tasks:\n  t: {command: 'echo x > o', outputs: [o]}\n")
    out = bgrid(held_host, "submit", str(wf), timeout=30)
    assert out.returncode == 2, out.stderr
    _one_line_error(out.stderr)
