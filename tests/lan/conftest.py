"""LAN tier: hosts in network namespaces; every test here is marked `lan`, skips if unusable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from .netns import Host, Lan, lan_available

_HERE = Path(__file__).resolve().parent
_BGRID_TIMEOUT_S = 60.0
_LIVE_LANS: list[Lan] = []  # what a failing test's report shows the logs of


class Bgrid:
    """Runs the `bgrid` CLI inside a test host, with the interpreter running these tests."""

    def command(self, *args: str) -> list[str]:
        """The command line for `bgrid ARGS` (sys.executable: no slow pyenv shim)."""
        return [sys.executable, "-m", "bonjourgrid.cli", *args]

    def __call__(
        self,
        host: Host,
        *args: str,
        timeout: float = _BGRID_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `bgrid ARGS` in `host` and wait for it."""
        return host.run(self.command(*args), timeout=timeout, env=env, cwd=cwd)

    def start(
        self,
        host: Host,
        *args: str,
        env: Mapping[str, str] | None = None,
        host_sys: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start `bgrid ARGS` (a daemon) in `host`; it is killed when the LAN closes.
        `host_sys`: keep this machine's /sys (see `Host._command`)."""
        return host.popen(self.command(*args), env=env, host_sys=host_sys)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.lan)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and item.path.is_relative_to(_HERE):
        for lan in _LIVE_LANS:
            report.sections.append(("test LAN host logs", lan.describe_logs()))
    return report


@pytest.fixture(scope="session")
def bgrid() -> Bgrid:
    """`bgrid(host, *args)` runs the CLI in a host; `bgrid.start(host, *args)` starts a daemon."""
    return Bgrid()


def _live_lan(n_hosts: int, tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    """`n_hosts` hosts on one bridge, whose logs a failing test shows; closed even on failure."""
    reason = lan_available()
    if reason is not None:
        pytest.skip(reason)
    lan = Lan(n_hosts, tmp_path_factory.mktemp(f"lan{n_hosts}"))
    _LIVE_LANS.append(lan)
    try:
        yield lan
    finally:
        _LIVE_LANS.remove(lan)
        lan.close()


@pytest.fixture(scope="module")
def lan4(tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    """Four hosts on one bridge, torn down after the module even when tests fail."""
    yield from _live_lan(4, tmp_path_factory)


@pytest.fixture(scope="module")
def lan6(tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    """Six hosts on one bridge, torn down after the module even when tests fail."""
    yield from _live_lan(6, tmp_path_factory)


class MdnsWatcher:
    """A live mDNS view of `_bonjourgrid._tcp` peers from one host: every TXT state, in order."""

    _SCRIPT = r"""
import json, threading, time
from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf
lock = threading.Lock()
def emit(**fields):
    with lock:
        print(json.dumps({"t": time.time(), **fields}), flush=True)
def on_change(zeroconf, service_type, name, state_change):
    peer = name.removesuffix("." + service_type)
    if state_change is ServiceStateChange.Removed:
        emit(name=peer, event="removed", state=None, job=None)
        return
    info = zeroconf.get_service_info(service_type, name, timeout=2000)
    if info is None:
        emit(name=peer, event="unresolved", state=None, job=None)
        return
    txt = {k.decode(): v.decode() if v is not None else None for k, v in info.properties.items()}
    emit(name=peer, event=state_change.name.lower(), state=txt.get("state"), job=txt.get("job"))
zc = Zeroconf()
ServiceBrowser(zc, "_bonjourgrid._tcp.local.", handlers=[on_change])
threading.Event().wait()
"""

    def __init__(self, host: Host) -> None:
        self.proc = host.popen([sys.executable, "-c", self._SCRIPT])
        self.log = host.record(self.proc).stdout_path

    def events(self) -> list[dict[str, Any]]:
        """Every change seen so far: {"t", "name", "event", "state", "job"}."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def history(self, name: str) -> list[tuple[str | None, str | None]]:
        """Every (state, job) peer `name` was seen in, in order."""
        return [(e["state"], e["job"]) for e in self.events() if e["name"] == name]

    def wait_until(self, done: Callable[[MdnsWatcher], bool], deadline_s: float, what: str) -> None:
        """Poll the view until `done(self)`; fail the test, saying `what`, at the deadline."""
        deadline = time.monotonic() + deadline_s
        while not done(self):
            if self.proc.poll() is not None:
                pytest.fail("the mDNS watcher died (logs below)")
            if time.monotonic() >= deadline:
                pytest.fail(f"{what}: not seen after {deadline_s} s; events: {self.events()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
