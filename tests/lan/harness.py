"""What LAN-tier test modules share: a test's own workers and submits on a LAN of namespaces.

Each test starts its own worker daemons under names of its own (so each has fresh caches and
sees no other test's peers) and stops them when it ends. Every submit shrinks the timeouts
with `--peer-timeout 2 --lease 3`. Nothing waits blindly: `tests/waiting.py` and
`LanGrid.wait_peers` poll with a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bonjourgrid.coordinator.peers import HEARTBEAT_S

from .conftest import Bgrid
from .netns import Host, Lan

Peers = dict[str, dict[str, Any]]

PEER_TIMEOUT_S = 2.0  # --peer-timeout: a peer silent this long is lost
LEASE_S = 3.0  # --lease: a peer whose coordinator is silent this long is idle again
FAST = ("--peer-timeout", f"{PEER_TIMEOUT_S:g}", "--lease", f"{LEASE_S:g}")
SLACK_S = 3.0  # interpreter starts, mDNS round trips and listings on a busy 2-CPU machine
DETECTED_S = PEER_TIMEOUT_S + HEARTBEAT_S + SLACK_S  # a lost peer's work starts again by then
SEEN_S = 10.0  # a new worker daemon is listed by then
STARTED_S = 20.0  # a submitted job's first task starts by then
SUBMIT_S = 60.0
_LISTEN_S = "0.5"  # `bgrid peers --wait`: one-shot answers come within a round trip


@dataclass
class Worker:
    """One worker daemon started by a test."""

    name: str
    host: Host
    proc: subprocess.Popen[Any]

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the daemon's process group (the whole desktop side of the grid)."""
        if self.proc.returncode is None:  # reaped: the pid may be someone else's now
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """`kill -9`: no goodbye, no release."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def assert_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"worker {self.name} exited with code {code} (logs below)")


@dataclass(frozen=True)
class Submitted:
    """A finished `bgrid submit`: exit code, output and report ({} when none was written)."""

    code: int
    stdout: str
    stderr: str
    report: dict[str, Any]

    def explain(self) -> str:
        return (
            f"`bgrid submit` exited {self.code}\n--- stdout\n{self.stdout}\n"
            f"--- stderr\n{self.stderr}\n--- report\n{json.dumps(self.report, indent=1)}"
        )

    def task(self, name: str) -> dict[str, Any]:
        tasks = self.report.get("tasks", {})
        assert name in tasks, f"the report has no task {name!r}\n{self.explain()}"
        return dict(tasks[name])

    def peers_used(self) -> set[str]:
        return {t["peer"] for t in self.report.get("tasks", {}).values() if t["peer"]}

    @property
    def moved(self) -> dict[str, int]:
        """The report's byte counters."""
        counters = self.report.get("bytes")
        assert isinstance(counters, dict), f"the report has no byte counters\n{self.explain()}"
        return {key: int(value) for key, value in counters.items()}


@dataclass
class Running:
    """A `bgrid submit` still running in a host."""

    host: Host
    proc: subprocess.Popen[Any]
    report_path: Path

    def finish(self, timeout: float = SUBMIT_S) -> Submitted:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`bgrid submit` still running after {timeout} s (logs below)")
        record = self.host.record(self.proc)
        report: dict[str, Any] = {}
        if self.report_path.is_file():
            report = json.loads(self.report_path.read_text())
        return Submitted(
            code,
            record.stdout_path.read_text(errors="replace"),
            record.stderr_path.read_text(errors="replace"),
            report,
        )

    def kill(self) -> None:
        """`kill -9` the coordinator: no release, no last word to anyone."""
        assert self.proc.poll() is None, "the coordinator ended before it could be killed"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


class LanGrid:
    """One test's view of the LAN: the workers it started, submits, `bgrid peers` listings."""

    def __init__(self, lan: Lan, bgrid: Bgrid, tmp: Path, submitter: int) -> None:
        self.lan = lan
        self.bgrid = bgrid
        self.tmp = tmp
        self.submitter = lan.hosts[submitter]
        self.tag = secrets.token_hex(2)  # peer names (hence cache directories) of this test
        self.workers: dict[str, Worker] = {}
        self._reports = itertools.count(1)
        # Start daemons and submits keeping this machine's /sys (middlewares such as slurmd
        # need /sys/fs/cgroup); the default gives each host its own, as a real desktop has.
        self.host_sys = False

    def start_worker(
        self, role: str, host_index: int, cost: float, *flags: str, ram: str = "1GiB"
    ) -> Worker:
        """A one-slot worker daemon on host `host_index`, named `<role>-<tag>`."""
        name = f"{role}-{self.tag}"
        host = self.lan.hosts[host_index]
        proc = self.bgrid.start(
            host,
            "worker",
            "--name", name,
            "--cpus", "1",
            "--ram", ram,
            "--cost", f"{cost:g}",
            "--always-idle",
            *flags,
            host_sys=self.host_sys,
        )  # fmt: skip
        worker = Worker(name, host, proc)
        self.workers[name] = worker
        return worker

    def peers(self) -> Peers:
        """This test's peers as `bgrid peers --json` on the submitting host lists them."""
        done = self.bgrid(self.submitter, "peers", "--json", "--wait", _LISTEN_S, timeout=30)
        assert done.returncode == 0, f"`bgrid peers` exited {done.returncode}: {done.stderr}"
        listed = json.loads(done.stdout)
        return {p["name"]: p for p in listed if p.get("name") in self.workers}

    def wait_peers(self, until: Callable[[Peers], bool], deadline_s: float, what: str) -> Peers:
        deadline = time.monotonic() + deadline_s
        while True:
            peers = self.peers()
            if until(peers):
                return peers
            if time.monotonic() >= deadline:
                pytest.fail(f"{what}: not true after {deadline_s:g} s; listed: {peers}")

    def wait_idle(self, workers: Sequence[Worker], deadline_s: float, what: str) -> Peers:
        """Every worker in `workers` alive and listed idle, with no job."""
        for worker in workers:
            worker.assert_alive()

        def idle(peers: Peers) -> bool:
            return all(
                peers.get(w.name, {}).get("state") == "idle" and peers[w.name]["job"] is None
                for w in workers
            )

        return self.wait_peers(idle, deadline_s, what)

    def workflow(self, name: str, tasks: dict[str, dict[str, Any]], subdir: str = "wf") -> Path:
        directory = self.tmp / subdir
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "wf.yaml"
        path.write_text(yaml.safe_dump({"name": name, "tasks": tasks}, sort_keys=False))
        return path

    def start_submit(self, wf: Path, *flags: str, host: Host | None = None) -> Running:
        host = host or self.submitter
        report = wf.parent / f"report-{next(self._reports)}.json"
        args = ("submit", str(wf), "--report", str(report), *FAST, *flags)
        return Running(host, self.bgrid.start(host, *args, host_sys=self.host_sys), report)

    def submit(self, wf: Path, *flags: str, host: Host | None = None) -> Submitted:
        return self.start_submit(wf, *flags, host=host).finish()

    def stop_workers(self) -> None:
        """SIGTERM every live worker of this test (thawed first), SIGKILL it after 5 s."""
        live = [w for w in self.workers.values() if w.proc.poll() is None]
        for worker in live:
            worker.signal(signal.SIGCONT)
            worker.signal(signal.SIGTERM)
        for worker in live:
            try:
                worker.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.kill()


def mark_start(path: Path) -> str:
    """A shell command appending the attempt's number to `path`: one line per start (every
    namespace shares the filesystem, so wherever the task runs)."""
    return f"echo $BGRID_ATTEMPT >> {shlex.quote(str(path))}"


def count_starts(path: Path) -> int:
    """How many times the task marked with `path` has started."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def share_grid_key(lan: Lan, bgrid: Bgrid) -> None:
    """Make a grid key on the first host and give every host both halves of it."""
    first = lan.hosts[0]
    done = bgrid(first, "keys", "init", timeout=30)
    assert done.returncode == 0, done.stderr
    key_dir = Path(first.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
    for host in lan.hosts[1:]:
        target = Path(host.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
        shutil.copytree(key_dir, target, dirs_exist_ok=True)  # modes too: the secret stays 600
