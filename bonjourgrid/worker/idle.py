"""Is the owner at the desk? A pure idle policy, and the probes that feed it.

Theory of operation. `IdlePolicy.decide(sample, now)` is pure (time comes in as an
argument): the owner is *active* when the keyboard or mouse was used less than
`idle_after_s` ago, or when the CPU load that is not ours (`load`, a fraction of all cores)
averages `max_load` or more over a short window. Input preempts at once; load is judged on
its mean over `_LOAD_WINDOW_S`, with a small hysteresis, so one spike does not flap a peer.
Defaults follow HTCondor's desktop policy: 15 minutes, 30%.

`OwnerMonitor` is the I/O side: it reads the input sources and the CPU counters, and asks
the policy. Input sources on Linux without X (the idea of HTCondor's startd):

- the access time of the logged-in users' terminals (utmp, through psutil; every
  /dev/tty[0-9]* and /dev/pts/* when utmp lists nobody): the kernel moves a terminal's atime
  when something reads what the user types. Output moves only the mtime, so a daemon that
  logs to its own terminal does not keep itself busy;
- the access and modification times of /dev/input/event* and /dev/input/mice (current
  kernels rarely move them, but they cost nothing where they do);
- the keyboard and mouse interrupt counters in /proc/interrupts (i8042, PS/2, "keyboard",
  "mouse"): a change means input. Idle time from this source counts from the daemon's start.

`--activity-file PATH` (its mtime is the owner's last activity: `touch PATH` says "the owner
is back") and `--activity-command CMD` (prints the seconds since the last input, e.g. from
xprintidle or the desktop's idle monitor) replace those built-in sources. When no source
knows, input is unknown and only load decides.

Non-grid load = every core's busy time minus the CPU time of this daemon and of everything it
started (its tasks, through psutil), so grid work never makes a peer look busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from bonjourgrid.errors import ConfigError

log = logging.getLogger(__name__)

IDLE_AFTER_S = 900.0  # HTCondor's desktop policy: 15 minutes without keyboard or mouse
MAX_LOAD = 0.30  # ... and the machine's other work under 30% of its CPUs

_LOAD_WINDOW_S = 10.0  # load is judged on its mean over this window
_LOAD_HYSTERESIS = 0.05  # busy from load: idle again only below max_load - this
_LOAD_SAMPLE_S = 1.0  # how often CPU counters are read (inputs are read at every sample)
_COMMAND_EVERY_S = 1.0  # how often --activity-command runs (a fork costs more than a stat)
_COMMAND_TIMEOUT_S = 5.0
_RESCAN_S = 10.0  # how often the list of terminals and input devices is refreshed
_INTERRUPTS_EVERY_S = 1.0  # /proc/interrupts grows with the core count: read it at most this often


@dataclass(frozen=True)
class ActivitySample:
    """What the probes saw: seconds since the last input (None: unknown) and non-grid load."""

    input_idle_s: float | None
    load: float


@dataclass(frozen=True)
class IdleSettings:
    """The idle policy's thresholds and where owner activity is read from."""

    idle_after_s: float = IDLE_AFTER_S
    max_load: float = MAX_LOAD  # 1.0: load never makes the owner active
    activity_file: Path | None = None
    activity_command: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.idle_after_s) and self.idle_after_s >= 0):
            raise ConfigError(f"idle time {self.idle_after_s} is not a number of minutes >= 0")
        if not 0 < self.max_load <= 1:
            raise ConfigError(
                f"max load {self.max_load} is not a fraction of the CPUs in (0, 1]: "
                "e.g. 0.3 for 30% (1 turns the load test off)"
            )
        if self.activity_command is not None and not self.activity_command.strip():
            raise ConfigError("the activity command is empty")


class IdlePolicy:
    """Decides, sample by sample, whether the owner is using the machine. Pure."""

    def __init__(
        self,
        idle_after_s: float = IDLE_AFTER_S,
        max_load: float = MAX_LOAD,
        load_window_s: float = _LOAD_WINDOW_S,
    ) -> None:
        self.idle_after_s = idle_after_s
        self.max_load = max_load
        self.load_window_s = load_window_s
        self.why = "no sample yet"  # the reason for the last decision, for the log
        self._loads: deque[tuple[float, float]] = deque()
        self._load_high = False

    @property
    def watches_load(self) -> bool:
        return self.max_load < 1.0

    def decide(self, sample: ActivitySample, now: float) -> bool:
        """True when the owner is active (the peer must be busy) at time `now`."""
        idle = sample.input_idle_s
        mean = self._mean_load(sample.load, now)
        if self.watches_load:
            # Hysteresis: once busy from load, the load must fall clearly below the bar.
            bar = self.max_load
            if self._load_high:
                bar -= min(_LOAD_HYSTERESIS, self.max_load / 2)
            self._load_high = mean >= bar
        if idle is not None and idle < self.idle_after_s:
            self.why = f"keyboard/mouse used {idle:.1f} s ago"
            return True
        if self._load_high:
            self.why = f"other work uses {mean:.0%} of the CPUs (limit {self.max_load:.0%})"
            return True
        seen = "input unknown" if idle is None else f"no keyboard/mouse for {idle:.0f} s"
        self.why = f"{seen}, other work {mean:.0%} of the CPUs" if self.watches_load else seen
        return False

    def _mean_load(self, load: float, now: float) -> float:
        if not self.watches_load:
            return load
        self._loads.append((now, load))
        while self._loads and self._loads[0][0] <= now - self.load_window_s:
            self._loads.popleft()
        return sum(value for _, value in self._loads) / len(self._loads)


# -- input sources (I/O) ------------------------------------------------------------------


class InputSource(Protocol):
    async def idle_s(self, wall: float) -> float | None:
        """Seconds since the owner last used this input at wall-clock `wall`; None: unknown."""
        ...


class ActivityFile:
    """The file's mtime is the owner's last activity (`touch` it: the owner is back)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def idle_s(self, wall: float) -> float | None:
        try:
            return max(0.0, wall - self.path.stat().st_mtime)
        except OSError:
            return None


class ActivityCommand:
    """A shell command that prints the seconds since the last input (run every second)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._last: tuple[float, float] | None = None  # (idle seconds, wall time read)
        self._next_run = 0.0
        self._failing = False

    async def idle_s(self, wall: float) -> float | None:
        if wall >= self._next_run:
            self._next_run = wall + _COMMAND_EVERY_S
            self._last = await self._run(wall)
        if self._last is None:
            return None
        idle, read_at = self._last
        return idle + max(0.0, wall - read_at)

    async def _run(self, wall: float) -> tuple[float, float] | None:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), _COMMAND_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            self._failed(f"did not answer within {_COMMAND_TIMEOUT_S:.0f} s")
            return None
        text = out.decode("utf-8", "replace").strip()
        try:
            idle = float(text.split()[0])
            if not (math.isfinite(idle) and idle >= 0):
                raise ValueError(text)
        except (ValueError, IndexError):
            self._failed(f"exited {proc.returncode} and printed {text[:80]!r}")
            return None
        self._failing = False
        return idle, wall

    def _failed(self, what: str) -> None:
        if not self._failing:  # once per failing spell, not five times a second
            log.warning(
                "activity command %r %s: it must print the seconds since the last "
                "keyboard/mouse input; input is unknown until it does",
                self.command,
                what,
            )
        self._failing = True


def _file_time(path: str, with_mtime: bool) -> float | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return max(st.st_atime, st.st_mtime) if with_mtime else st.st_atime


class Terminals:
    """The atime of the logged-in users' terminals, or of every terminal if utmp lists none."""

    def __init__(self, dev: Path = Path("/dev")) -> None:
        self.dev = dev
        self._paths: list[str] = []
        self._rescan_at = 0.0

    async def idle_s(self, wall: float) -> float | None:
        if wall >= self._rescan_at:
            self._rescan_at = wall + _RESCAN_S
            self._paths = self._scan()
        times = [t for t in (_file_time(p, with_mtime=False) for p in self._paths) if t]
        return max(0.0, wall - max(times)) if times else None

    def _scan(self) -> list[str]:
        try:
            # ":0" or "unix:..." (X displays) are not devices: only paths under /dev count.
            ttys = {u.terminal for u in psutil.users() if u.terminal}
        except (OSError, RuntimeError):
            ttys = set()
        paths = [str(self.dev / t) for t in sorted(ttys) if ":" not in t]
        paths = [p for p in paths if os.path.exists(p)]
        if paths:
            return paths
        # No utmp (containers, some distributions): HTCondor's "bad utmp" mode.
        return sorted(
            glob.glob(str(self.dev / "tty[0-9]*")) + glob.glob(str(self.dev / "pts" / "[0-9]*"))
        )


class InputDevices:
    """The atime/mtime of /dev/input/event* and /dev/input/mice, where the kernel moves them."""

    def __init__(self, dev: Path = Path("/dev")) -> None:
        self.dev = dev
        self._paths: list[str] = []
        self._rescan_at = 0.0

    async def idle_s(self, wall: float) -> float | None:
        if wall >= self._rescan_at:
            self._rescan_at = wall + _RESCAN_S
            self._paths = sorted(glob.glob(str(self.dev / "input" / "event*")))
            self._paths += glob.glob(str(self.dev / "input" / "mice"))
        times = [t for t in (_file_time(p, with_mtime=True) for p in self._paths) if t]
        return max(0.0, wall - max(times)) if times else None


class KeyboardInterrupts:
    """Keyboard and mouse interrupt counts in /proc/interrupts: a change is input."""

    _MARKERS = ("i8042", "keyboard", "mouse")

    def __init__(self, path: Path = Path("/proc/interrupts")) -> None:
        self.path = path
        self._count: int | None = self._read()
        self._changed_at = time.time()  # unknown before the daemon started: count from now
        self._next_read = 0.0

    async def idle_s(self, wall: float) -> float | None:
        if self._count is None:  # no such interrupt line on this machine
            return None
        if wall >= self._next_read:
            self._next_read = wall + _INTERRUPTS_EVERY_S
            count = self._read()
            if count is not None and count != self._count:
                self._count, self._changed_at = count, wall
        return max(0.0, wall - self._changed_at)

    def _read(self) -> int | None:
        try:
            lines = self.path.read_text().splitlines()[1:]
        except OSError:
            return None
        total, found = 0, False
        for line in lines:
            if any(m in line.lower() for m in self._MARKERS):
                found = True
                total += sum(int(f) for f in line.split()[1:] if f.isdigit())
        return total if found else None


def input_sources(settings: IdleSettings) -> list[InputSource]:
    """The sources the settings name, else the built-in ones of this platform."""
    explicit: list[InputSource] = []
    if settings.activity_file is not None:
        explicit.append(ActivityFile(settings.activity_file))
    if settings.activity_command is not None:
        explicit.append(ActivityCommand(settings.activity_command))
    return explicit or [Terminals(), InputDevices(), KeyboardInterrupts()]


# -- CPU load (I/O) ------------------------------------------------------------------------


class NonGridLoad:
    """CPU load of everything but this daemon and its descendants, a fraction of all cores."""

    def __init__(self, grid_root: int | None = None) -> None:
        self._root = psutil.Process(grid_root) if grid_root is not None else None
        self._busy, self._total = _cpu_counters()
        self._grid = self._grid_seconds(descendants=False)

    def measure(self, tasks_running: bool) -> float:
        """The load since the previous call; `tasks_running`: also scan the daemon's children."""
        busy, total = _cpu_counters()
        grid = self._grid_seconds(descendants=tasks_running)
        d_busy, d_total = busy - self._busy, total - self._total
        # A task whose parent died escapes the scan: its time drops out, never below zero.
        d_grid = max(0.0, grid - self._grid)
        self._busy, self._total, self._grid = busy, total, grid
        if d_total <= 0:
            return 0.0
        return min(1.0, max(0.0, (d_busy - d_grid) / d_total))

    def _grid_seconds(self, descendants: bool) -> float:
        if self._root is None:
            return 0.0
        procs = [self._root]
        if descendants:
            with contextlib.suppress(psutil.Error):
                procs += self._root.children(recursive=True)
        seconds = 0.0
        for proc in procs:
            # A process's children_* hold the time of the children it has reaped: a task that
            # ended between two samples still counts, in its parent.
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                seconds += t.user + t.system + t.children_user + t.children_system
        return seconds


def _cpu_counters() -> tuple[float, float]:
    """(busy, total) CPU seconds summed over every core since boot, as psutil counts them."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


class OwnerMonitor:
    """Samples the inputs and the load, and asks the policy: is the owner active?"""

    def __init__(
        self,
        settings: IdleSettings,
        grid_root: int | None = None,
        sources: Sequence[InputSource] | None = None,
    ) -> None:
        self.policy = IdlePolicy(settings.idle_after_s, settings.max_load)
        self.sources = list(input_sources(settings) if sources is None else sources)
        self._load = NonGridLoad(grid_root) if self.policy.watches_load else None
        self._last_load = 0.0
        self._load_at = -math.inf

    async def sample(self, now: float, tasks_running: bool = False) -> ActivitySample:
        """Read every source; the CPU counters at most every `_LOAD_SAMPLE_S` (monotonic `now`)."""
        wall = time.time()
        idles = [i for i in [await s.idle_s(wall) for s in self.sources] if i is not None]
        if self._load is not None and now - self._load_at >= _LOAD_SAMPLE_S:
            self._last_load, self._load_at = self._load.measure(tasks_running), now
        return ActivitySample(min(idles) if idles else None, self._last_load)

    async def owner_active(self, now: float, tasks_running: bool = False) -> bool:
        return self.policy.decide(await self.sample(now, tasks_running), now)

    def describe(self) -> str:
        """The policy in one line, for the daemon's log."""
        p = self.policy
        load = f"other work under {p.max_load:.0%} of the CPUs" if p.watches_load else "any load"
        inputs = ", ".join(type(s).__name__ for s in self.sources)
        return f"idle after {p.idle_after_s / 60:g} min without input ({inputs}) and {load}"
