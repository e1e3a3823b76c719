"""A LAN of test hosts on one machine: Linux network namespaces joined by a bridge.

Theory of operation: a switch namespace holds a bridge `br0`; every host is a namespace with
one veth `eth0` plugged into that bridge, an address 10.77.X.i/24, `lo` up and a route for
224.0.0.0/4 so mDNS multicast leaves through `eth0`. The machine's own interfaces are never
touched: every `ip` command names one of our namespaces. Every process started in a host is
tracked and killed on `Lan.close()`, which also deletes every namespace it created, even after
a setup that failed half-way, and runs at interpreter exit as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_IP_TIMEOUT_S = 10.0
_TERM_GRACE_S = 5.0  # a daemon gets this long to exit cleanly on SIGTERM before SIGKILL
_DRAIN_S = 1.0  # how long a killed command's pipes may stay open before we stop reading
_MULTICAST = "224.0.0.0/4"
_LAN_SEQ = itertools.count()  # several Lans in one process get distinct names and subnets


class LanSetupError(RuntimeError):
    """An `ip`/`tc` command failed while building or changing the test LAN."""


def _run_ip(args: Sequence[str]) -> str:
    """Run one iproute2/tc command; raise LanSetupError with its stderr when it fails."""
    try:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LanSetupError(f"`{' '.join(args)}` could not run: {err}") from err
    if done.returncode != 0:
        raise LanSetupError(
            f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def namespace_prefix() -> str:
    """How the names of every namespace this process creates begin, e.g. "bg4242-"."""
    return f"bg{os.getpid() % 10000}-"


def _existing_namespaces() -> set[str]:
    """Names of the network namespaces that exist now."""
    out = _run_ip(["ip", "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@functools.cache
def lan_available() -> str | None:
    """None when this machine can build a test LAN, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found"
    probe = f"bgprobe{os.getpid() % 100000}"
    try:
        _run_ip(["ip", "netns", "add", probe])
    except LanSetupError as err:
        return f"cannot create network namespaces: {err}"
    try:
        _run_ip(["ip", "-n", probe, "link", "set", "lo", "up"])
    except LanSetupError as err:
        return f"cannot configure network namespaces: {err}"
    finally:
        with contextlib.suppress(LanSetupError):
            _run_ip(["ip", "netns", "del", probe])
    return None


@dataclass(frozen=True)
class HostProcess:
    """One process started in a host, with the files its output goes to."""

    proc: subprocess.Popen[Any]
    args: tuple[str, ...]
    stdout_path: Path
    stderr_path: Path


def _label(args: Sequence[str]) -> str:
    """A short file-name-safe label for a command line, for its log file names."""
    words = [
        "script" if "\n" in a or len(a) > 40 else Path(a).name
        for a in args
        if not a.startswith("-")
    ][:4]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(words))[:48] or "cmd"


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, or a note when it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


class Host:
    """One test host: a network namespace with an address, its own config/cache dirs, logs."""

    def __init__(self, name: str, ip: str, index: int, home: Path) -> None:
        self.name = name
        self.ip = ip
        self.index = index
        self.dir = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env: dict[str, str] = dict(os.environ)
        for var, sub in (
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_CACHE_HOME", "cache"),
            ("XDG_DATA_HOME", "data"),
            ("XDG_STATE_HOME", "state"),
        ):
            (home / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(home / sub)
        self.env["PYTHONUNBUFFERED"] = "1"  # logs must be complete when a test fails
        self.env.pop("BGRID_INTERFACES", None)  # inside a namespace every interface is ours
        self.processes: list[HostProcess] = []
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.ip!r})"

    def _command(self, args: Sequence[str], host_sys: bool = False) -> list[str]:
        """`ip netns exec` gives the process a private /sys of the namespace; `host_sys`
        enters the network namespace only (`nsenter --net`), keeping this machine's /sys:
        slurmd 22.05 needs /sys/fs/cgroup, which `ip netns exec` hides."""
        if host_sys:
            return ["nsenter", f"--net=/run/netns/{self.name}", *args]
        return ["ip", "netns", "exec", self.name, *args]

    def _log_paths(self, args: Sequence[str]) -> tuple[Path, Path]:
        stem = f"{next(self._seq):03d}-{_label(args)}"
        return self.logs / f"{stem}.out", self.logs / f"{stem}.err"

    def _merged_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def popen(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        host_sys: bool = False,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start `args` inside this host (own process group), output to log files; tracked."""
        out_path, err_path = self._log_paths(args)
        with out_path.open("wb") as out, err_path.open("wb") as err:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", err)
            kw.setdefault("stdin", subprocess.DEVNULL)
            proc: subprocess.Popen[Any] = subprocess.Popen(
                self._command(args, host_sys),
                env=self._merged_env(env),
                start_new_session=True,  # so teardown can signal the whole process group
                **kw,
            )
        self.processes.append(HostProcess(proc, tuple(args), out_path, err_path))
        return proc

    def run(
        self,
        args: Sequence[str],
        timeout: float,
        check: bool = False,
        input: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` inside this host and wait; output captured and also saved as logs."""
        out_path, err_path = self._log_paths(args)
        proc = subprocess.Popen(
            self._command(args),
            env=self._merged_env(env),
            cwd=cwd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        record = HostProcess(proc, tuple(args), out_path, err_path)
        self.processes.append(record)
        try:
            stdout, stderr = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            stdout, stderr = _drain(proc)
            out_path.write_text(stdout)
            err_path.write_text(f"{stderr}\n[killed after {timeout} s timeout]\n")
            raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
        except BaseException:
            _signal_group(proc, signal.SIGKILL)
            _drain(proc)
            raise
        out_path.write_text(stdout)
        err_path.write_text(stderr)
        done = subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)
        if check:
            done.check_returncode()
        return done

    def record(self, proc: subprocess.Popen[Any]) -> HostProcess:
        """The record (command line, log files) of a process started by `popen`."""
        for p in self.processes:
            if p.proc is proc:
                return p
        raise KeyError(f"process {proc.pid} was not started on host {self.name}")

    def set_link(self, up: bool) -> None:
        """Bring this host's eth0 up or down (a cable pulled or plugged back)."""
        _run_ip(["ip", "-n", self.name, "link", "set", "eth0", "up" if up else "down"])
        if up:
            # The kernel flushes the multicast route when the link goes down.
            _run_ip(["ip", "-n", self.name, "route", "replace", _MULTICAST, "dev", "eth0"])

    def terminate_all(self, grace_s: float = _TERM_GRACE_S) -> None:
        """SIGTERM every live process group started here, SIGKILL those still alive after grace."""
        live = [p.proc for p in self.processes if p.proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in live:
            # Whatever outlives its group leader is still inside our namespace: Lan.close
            # kills it there.
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_TERM_GRACE_S)

    def describe_logs(self, tail_lines: int = 40) -> str:
        """Every process started here, its exit status and the tail of its output."""
        parts = [f"=== host {self.name} ({self.ip}) ==="]
        for p in self.processes:
            code = p.proc.poll()
            status = "running" if code is None else f"exit {code}"
            shown = " ".join("<script>" if "\n" in a else a for a in p.args)
            parts.append(f"--- {shown}  [{status}]")
            for path in (p.stdout_path, p.stderr_path):
                parts.append(f"[{path.name}]\n{_tail(path, tail_lines)}")
        return "\n".join(parts)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `proc`, while its pid cannot have been reused."""
    if proc.returncode is not None:
        return  # reaped: its pid may belong to someone else now; Lan.close sweeps leftovers
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _drain(proc: subprocess.Popen[Any]) -> tuple[str, str]:
    """Reap a killed `run` process and what it printed, without waiting on pipes held open."""
    try:
        stdout, stderr = proc.communicate(timeout=_DRAIN_S)
    except subprocess.TimeoutExpired as err:
        # A process of another session (not killed with the group) still holds the pipes.
        stdout, stderr = err.stdout, err.stderr
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
    return _text(stdout), _text(stderr)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


class Lan:
    """`n_hosts` hosts on one bridge; `rate` (e.g. "100mbit") shapes each host link with tbf."""

    def __init__(self, n_hosts: int, tmp: Path, rate: str | None = None) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"n_hosts must be 1..250, got {n_hosts}")
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []  # created so far, in order, for teardown
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(n_hosts, Path(tmp), rate)
        except BaseException:
            self.close()
            raise

    def _build(self, n_hosts: int, tmp: Path, rate: str | None) -> None:
        seq = next(_LAN_SEQ)
        existing = _existing_namespaces()
        # Short unique names: a stale namespace of a crashed run with the same pid is skipped.
        for attempt in itertools.count():
            prefix = f"{namespace_prefix()}{seq}{'' if attempt == 0 else chr(96 + attempt)}"
            wanted = {f"{prefix}sw", *(f"{prefix}h{i}" for i in range(1, n_hosts + 1))}
            if not wanted & existing:
                break
        subnet = f"10.77.{(os.getpid() + seq) % 254 + 1}"
        self.switch = f"{prefix}sw"
        self._add_namespace(self.switch)
        bridge = ["type", "bridge", "forward_delay", "0", "mcast_snooping", "0"]
        _run_ip(["ip", "-n", self.switch, "link", "add", "br0", *bridge])
        _run_ip(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i in range(1, n_hosts + 1):
            name, port = f"{prefix}h{i}", f"p{i}"
            self._add_namespace(name)
            veth = ["type", "veth", "peer", "name", "eth0", "netns", name]
            _run_ip(["ip", "-n", self.switch, "link", "add", port, *veth])
            _run_ip(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
            _run_ip(["ip", "-n", self.switch, "link", "set", port, "up"])
            _run_ip(["ip", "-n", name, "addr", "add", f"{subnet}.{i}/24", "dev", "eth0"])
            _run_ip(["ip", "-n", name, "link", "set", "lo", "up"])
            _run_ip(["ip", "-n", name, "link", "set", "eth0", "up"])
            _run_ip(["ip", "-n", name, "route", "add", _MULTICAST, "dev", "eth0"])
            if rate is not None:
                # Both directions: host upload on eth0, host download on the switch port.
                for ns, dev in ((name, "eth0"), (self.switch, port)):
                    tbf = ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"]
                    _run_ip(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *tbf])
            self.hosts.append(Host(name, f"{subnet}.{i}", i, tmp / name))

    def _add_namespace(self, name: str) -> None:
        _run_ip(["ip", "netns", "add", name])
        self._namespaces.append(name)

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe_logs(self, tail_lines: int = 40) -> str:
        """The logs of every process on every host, for a failing test's report."""
        return "\n\n".join(h.describe_logs(tail_lines) for h in self.hosts)

    def close(self) -> None:
        """Kill every process started on the LAN and delete every namespace; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for host in self.hosts:
            host.terminate_all()
        for ns in reversed(self._namespaces):
            _kill_namespace_pids(ns)  # escapees in their own session, e.g. task sandboxes
            with contextlib.suppress(LanSetupError):
                _run_ip(["ip", "netns", "del", ns])


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace `ns` (only our namespaces get here)."""
    deadline = time.monotonic() + _TERM_GRACE_S
    while True:
        try:
            out = _run_ip(["ip", "netns", "pids", ns])
        except LanSetupError:
            return
        # Zombies are not listed (their net namespace is already released): no need to wait
        # for whoever reaps them.
        pids = [int(tok) for tok in out.split() if tok.isdigit()]
        if not pids or time.monotonic() >= deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
