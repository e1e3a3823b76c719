"""Real `bgrid` processes on 127.0.0.1: worker daemons, submits, peers listings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from bonjourgrid.discovery.txt import PEER_SERVICE

LOOPBACK = "127.0.0.1"


def bgrid_cmd(*args: str) -> list[str]:
    # sys.executable, not `bgrid` or `python3`: a pyenv shim would cost ~150 ms a start.
    return [sys.executable, "-m", "bonjourgrid.cli", *args]


class Grid:
    """A grid key in its own config dir, and worker daemons serving it on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_CACHE_HOME": str(root / "cache"),
        }
        self.tag = uuid.uuid4().hex[:6]  # unique peer names: tests may share the loopback
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def init_key(self) -> None:
        self.run("keys", "init", check=True)

    def run(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            bgrid_cmd(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def start_worker(self, name: str, *flags: str) -> str:
        full = f"{name}-{self.tag}"
        log = open(self.root / f"{full}.log", "wb")  # noqa: SIM115
        self.procs[full] = subprocess.Popen(
            bgrid_cmd("worker", "--name", full, "--interface", LOOPBACK, "--always-idle", *flags),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return full

    def peers(self) -> dict[str, dict[str, Any]]:
        """Our peers as `bgrid peers --json` shows them (other tests' peers filtered out)."""
        out = self.run("peers", "--json", "--interface", LOOPBACK, "--wait", "0.7", check=True)
        return {p["name"]: p for p in json.loads(out.stdout) if p["name"] in self.procs}

    def wait_peers(
        self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 10.0
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        peers: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            peers = self.peers()
            if check(peers):
                return peers
        raise AssertionError(f"peers never reached the expected state; last seen: {peers}")

    def wait_all_idle(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        return self.wait_peers(
            lambda ps: (
                set(ps) == set(self.procs) and all(p["state"] == "idle" for p in ps.values())
            ),
            timeout,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def grid(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Grid]:
    g = Grid(tmp_path / "grid")
    g.root.mkdir()
    g.init_key()
    yield g
    g.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(g.logs())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


class RogueHost:
    """Services this test registers on 127.0.0.1, as a host that lies on the LAN would."""

    def __init__(self) -> None:
        self.zc = Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
        self.infos: list[ServiceInfo] = []

    def advertise(
        self,
        name: str,
        port: int,
        txt: Mapping[str, str | bytes | None],
        service: str = PEER_SERVICE,
    ) -> None:
        """Register `name` without probing: a rogue claims it even if a real peer owns it."""
        info = ServiceInfo(
            service,
            f"{name}.{service}",
            port=port,
            properties=txt,
            addresses=[socket.inet_aton(LOOPBACK)],
            server=f"{name}.rogue.local.",
        )
        self.zc.register_service(info, cooperating_responders=True)
        self.infos.append(info)

    def close(self) -> None:
        for info in self.infos:
            with contextlib.suppress(Exception):
                self.zc.unregister_service(info)
        self.zc.close()


@pytest.fixture
def rogue(monkeypatch: pytest.MonkeyPatch) -> Iterator[RogueHost]:
    # A rogue needs no manners: no 1.2 s probe and no spaced announcements per service.
    # zeroconf internals: if they are renamed, registering only gets slower.
    import zeroconf._core

    for constant in ("_CHECK_TIME", "_REGISTER_TIME", "_UNREGISTER_TIME"):
        monkeypatch.setattr(zeroconf._core, constant, 5, raising=False)
    host = RogueHost()
    yield host
    host.close()


def submit(
    grid: Grid, workflow: Path, *flags: str, timeout: float = 90
) -> tuple[int, dict[str, Any], str]:
    """`bgrid submit WORKFLOW` on loopback: its exit code, report ({} if none) and output."""
    report_file = workflow.parent / "report.json"
    report_file.unlink(missing_ok=True)  # a report of an earlier submit is not this one's
    out = grid.run(
        "submit",
        str(workflow),
        "--interface",
        LOOPBACK,
        "--report",
        str(report_file),
        *flags,
        timeout=timeout,
    )
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return out.returncode, report, out.stdout + out.stderr


def write_workflow(directory: Path, text: str, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content)
    path = directory / "wf.yaml"
    path.write_text(text)
    return path
