"""LAN tier: hosts in network namespaces; every test here is marked `lan`, skips if unusable."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Generator, Mapping
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
        self, host: Host, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        """Start `bgrid ARGS` (a daemon) in `host`; it is killed when the LAN closes."""
        return host.popen(self.command(*args), env=env)


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


@pytest.fixture(scope="module")
def lan4(tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    """Four hosts on one bridge, torn down after the module even when tests fail."""
    reason = lan_available()
    if reason is not None:
        pytest.skip(reason)
    lan = Lan(4, tmp_path_factory.mktemp("lan4"))
    _LIVE_LANS.append(lan)
    try:
        yield lan
    finally:
        _LIVE_LANS.remove(lan)
        lan.close()
