"""Per-task resource limits and priority: checked at the wire, set in the task before it execs.

A `run` message carries `limits`, a map with the optional keys `cpu_s` (seconds of CPU time),
`memory` (bytes of address space) and `wall_s` (seconds of wall-clock time for the whole
task, from the start of its command). The worker applies the first two with setrlimit in
the child, between fork and exec (`task_preexec`), so /bin/sh and everything it starts
inherit them and no process of the task runs a moment without them. Setting them from
outside after the spawn (psutil's prlimit) would leave a window in which the shell may
already have forked an unlimited child. Like `ulimit`, those two hold for each process of
the task, not their sum. `wall_s` is kept by the sandbox (worker/sandbox.py), which kills
the task's whole tree at the limit.

The same function gives every task the desktop's leftovers, as BOINC and HTCondor's desktop
policy do: nice 19, the idle I/O class (ioprio_set, IOPRIO_CLASS_IDLE) and SCHED_IDLE where
the kernel allows, each inherited by all the task starts; and a umask of 077, so what the
task writes is readable by the worker's user only.

The daemon runs it from a spawning thread of its own, off the event loop (worker/spawn.py says
why not vfork from a thread at idle priority instead).

Why a preexec function is acceptable although the daemon has threads (zmq, zeroconf): the
function only makes system calls with arguments computed before the fork; it takes no lock,
logs nothing and imports nothing, and CPython reinitialises its own locks in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import re
import resource
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bonjourgrid.errors import ConfigError, ProtocolError
from bonjourgrid.units import MIB, format_size, parse_size

__all__ = [
    "LIMIT_KEYS",
    "Limits",
    "check_cpu_s",
    "check_memory",
    "check_wall_s",
    "limits_from_wire",
    "task_preexec",
]

# The keys of `limits`, in workflow files and on the wire.
LIMIT_KEYS = ("cpu_s", "memory", "wall_s")
MAX_CPU_S = 10**7  # about four months: anything larger is a typo
MAX_WALL_S = MAX_CPU_S
TASK_NICE = 19  # the lowest priority: the owner's every process goes first
TASK_UMASK = 0o077  # what a task writes, only the worker's user reads
MIN_MEMORY = 4 * MIB  # below this not even /bin/sh starts
MAX_MEMORY = 1 << 50  # a pebibyte
CPU_GRACE_S = 1  # between SIGXCPU (soft limit) and SIGKILL (hard limit)

# What programs print when an allocation fails (Python, glibc, C++, sort, Java, Go, Rust).
_OUT_OF_MEMORY = re.compile(
    r"MemoryError|Cannot allocate memory|out of memory|bad_alloc|memory exhausted|"
    r"failed to allocate|OutOfMemoryError|memory allocation of \d+ bytes failed",
    re.IGNORECASE,
)
_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS)
_NUMBER = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*")


def check_cpu_s(value: object) -> int:
    """Whole seconds of CPU time from a positive number (rounded up); ValueError otherwise."""
    return _check_seconds("cpu_s", value, MAX_CPU_S)


def check_wall_s(value: object) -> int:
    """Whole seconds of wall-clock time from a positive number (rounded up); ValueError else."""
    return _check_seconds("wall_s", value, MAX_WALL_S)


def _check_seconds(key: str, value: object, most: int) -> int:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{key} {value!r} must be a number of seconds > 0")
    seconds = math.ceil(value)
    if seconds > most:
        raise ValueError(f"{key} {value!r} is over the maximum of {most} s")
    return seconds


def check_memory(value: object) -> int:
    """Bytes from a size ("512MiB", "2GiB") or a number of MiB; ValueError otherwise."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        size = int(float(value) * MIB)  # as the `ram` TXT key: a bare number is MiB
    elif isinstance(value, str):
        try:
            size = parse_size(value)
        except ConfigError:
            raise ValueError(
                f"memory {value!r} is not a size; write it as 512MiB or 2GiB"
            ) from None
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        size = int(value * MIB)
    else:
        raise ValueError(f"memory {value!r} must be a size such as 512MiB or 2GiB")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(
            f"memory {value!r} must be between {format_size(MIN_MEMORY)} and "
            f"{format_size(MAX_MEMORY)}"
        )
    return size


@dataclass(frozen=True)
class Limits:
    """The resource limits of one task; None means unlimited."""

    cpu_s: int | None = None  # seconds of CPU time, per process
    memory: int | None = None  # bytes of address space (RLIMIT_AS), per process
    wall_s: int | None = None  # seconds from the start of the task to its end, the whole tree

    def rlimits(self) -> list[tuple[int, int, int]]:
        """(resource, soft, hard) to set, never above the hard limits this daemon runs under."""
        wanted = []
        if self.cpu_s is not None:
            wanted.append((resource.RLIMIT_CPU, self.cpu_s, self.cpu_s + CPU_GRACE_S))
        if self.memory is not None:
            wanted.append((resource.RLIMIT_AS, self.memory, self.memory))
        pairs = []
        for which, soft, hard in wanted:
            # Only root may raise a hard limit: stay under ours, or setrlimit fails in the child.
            ceiling = resource.getrlimit(which)[1]
            if ceiling != resource.RLIM_INFINITY:
                hard = min(hard, ceiling)
                soft = min(soft, hard)
            pairs.append((which, soft, hard))
        return pairs

    def to_wire(self) -> dict[str, int]:
        """The `limits` map of a message (limits_from_wire reads it back)."""
        return {k: v for k in LIMIT_KEYS if (v := getattr(self, k)) is not None}

    def preexec(self) -> Callable[[], None] | None:
        """A function for subprocess's preexec_fn that sets the limits; None when unlimited."""
        pairs = self.rlimits()  # computed here: the child only makes the system calls
        if not pairs:
            return None

        def apply() -> None:
            for which, soft, hard in pairs:
                resource.setrlimit(which, (soft, hard))

        return apply

    def explain(self, exit_code: int, stderr_tail: str, out_of_time: bool = False) -> str:
        """Why a task that exited with `exit_code` failed, if one of its limits says; else "".

        `out_of_time`: the sandbox stopped the task at its wall-clock limit.
        """
        if out_of_time:
            return (
                f"exceeded its wall-clock limit of {self.wall_s} s and was killed with every "
                "process it started; raise limits.wall_s or make the task shorter"
            )
        if exit_code == 0:
            return ""
        # A signal shows as -N from the process itself, or as 128+N from a shell that waited.
        sig = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
        how = f"killed by {_signal_name(sig)}" if sig else f"exit code {exit_code}"
        if self.cpu_s is not None:
            if sig == signal.SIGXCPU:
                return (
                    f"exceeded its CPU time limit of {self.cpu_s} s ({how}); "
                    "raise limits.cpu_s or make the task shorter"
                )
            if sig == signal.SIGKILL:
                return (
                    f"{how}, most likely at its CPU time limit of {self.cpu_s} s "
                    f"(the hard limit, {CPU_GRACE_S} s after SIGXCPU); raise limits.cpu_s"
                )
        if self.memory is not None:
            limit = format_size(self.memory)
            if _OUT_OF_MEMORY.search(stderr_tail):
                return (
                    f"ran out of memory at its memory limit of {limit} ({how}); "
                    "raise limits.memory or make the task use less"
                )
            if sig in _CRASH_SIGNALS:
                return (
                    f"{how}, possibly at its memory limit of {limit} (an allocation failed); "
                    "raise limits.memory if it needs more"
                )
        return ""

    def describe(self) -> str:
        """The limits in words, for messages: "CPU 10 s, memory 512.0 MiB"."""
        parts = []
        if self.cpu_s is not None:
            parts.append(f"CPU {self.cpu_s} s")
        if self.memory is not None:
            parts.append(f"memory {format_size(self.memory)}")
        if self.wall_s is not None:
            parts.append(f"wall-clock {self.wall_s} s")
        return ", ".join(parts) or "none"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def limits_from_wire(value: Mapping[Any, Any]) -> Limits:
    """The limits in a `run` message's `limits` map; ProtocolError if malformed."""
    unknown = [k for k in value if k not in LIMIT_KEYS]
    if unknown:
        # A limit this peer cannot enforce must not be silently dropped.
        raise ProtocolError(
            f"unknown limit {str(unknown[0])[:40]!r}: this peer enforces {', '.join(LIMIT_KEYS)}"
        )
    checked: dict[str, int] = {}
    for key, low, high in (
        ("cpu_s", 1, MAX_CPU_S),
        ("memory", MIN_MEMORY, MAX_MEMORY),
        ("wall_s", 1, MAX_WALL_S),
    ):
        number = value.get(key)
        if number is None:
            continue
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
            raise ProtocolError(f"limit {key} must be a whole number in {low}..{high}")
        checked[key] = number
    return Limits(**checked)


# -- priority ---------------------------------------------------------------------------------

_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
# ioprio_set has no libc wrapper: its system call number, per architecture.
_NR_IOPRIO_SET = {
    "x86_64": 251,
    "amd64": 251,
    "aarch64": 30,
    "arm64": 30,
    "riscv64": 30,
    "i386": 289,
    "i686": 289,
    "armv7l": 314,
    "ppc64le": 273,
    "s390x": 282,
}


def ioprio_idle() -> Callable[[], None] | None:
    """A function that puts the calling process in the idle I/O class; None where unknown."""
    number = _NR_IOPRIO_SET.get(platform.machine().lower())
    if number is None or not hasattr(os, "sched_setscheduler"):  # not Linux
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    args = (
        ctypes.c_long(number),
        ctypes.c_int(_IOPRIO_WHO_PROCESS),
        ctypes.c_int(0),  # this process
        ctypes.c_int(_IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT),
    )

    def apply() -> None:
        syscall(*args)  # best effort: -1 (EPERM, ENOSYS) leaves the default class

    return apply


def task_preexec(limits: Limits) -> Callable[[], None]:
    """The preexec_fn of a task: lowest priority, private umask, then `limits`' rlimits."""
    rlimits = limits.preexec()
    idle_io = ioprio_idle()
    scheduler = getattr(os, "SCHED_IDLE", None)
    param = os.sched_param(0) if scheduler is not None else None

    def apply() -> None:
        os.umask(TASK_UMASK)
        # Each step on its own: a kernel that refuses one still gets the others.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, TASK_NICE)
        if idle_io is not None:
            idle_io()
        if scheduler is not None and param is not None:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, scheduler, param)
        if rlimits is not None:
            rlimits()

    return apply
