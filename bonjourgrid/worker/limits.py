"""Per-task resource limits: checked at the wire, set in the task's process before it execs.

A `run` message carries `limits`, a map with the optional keys `cpu_s` (seconds of CPU time)
and `memory` (bytes of address space). The worker applies them with setrlimit in the child,
between fork and exec (`Limits.preexec`), so /bin/sh and everything it starts inherit them
and no process of the task runs a moment without them. Setting them from outside after the
spawn (psutil's prlimit) would leave a window in which the shell may already have forked an
unlimited child. Like `ulimit`, a limit holds for each process of the task, not their sum.

Why a preexec function is acceptable although the daemon has threads (zmq, zeroconf): the
function only calls setrlimit with numbers computed before the fork; it takes no lock, logs
nothing and imports nothing, and CPython reinitialises its own locks in the child.
"""

from __future__ import annotations

import math
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
    "limits_from_wire",
]

LIMIT_KEYS = ("cpu_s", "memory")  # the keys of `limits`, in workflow files and on the wire
MAX_CPU_S = 10**7  # about four months: anything larger is a typo
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
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"cpu_s {value!r} must be a number of seconds > 0")
    seconds = math.ceil(value)
    if seconds > MAX_CPU_S:
        raise ValueError(f"cpu_s {value!r} is over the maximum of {MAX_CPU_S} s")
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

    def preexec(self) -> Callable[[], None] | None:
        """A function for subprocess's preexec_fn that sets the limits; None when unlimited."""
        pairs = self.rlimits()  # computed here: the child only makes the system calls
        if not pairs:
            return None

        def apply() -> None:
            for which, soft, hard in pairs:
                resource.setrlimit(which, (soft, hard))

        return apply

    def explain(self, exit_code: int, stderr_tail: str) -> str:
        """Why a task that exited with `exit_code` failed, if one of its limits says; else ""."""
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
    for key, low, high in (("cpu_s", 1, MAX_CPU_S), ("memory", MIN_MEMORY, MAX_MEMORY)):
        number = value.get(key)
        if number is None:
            continue
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
            raise ProtocolError(f"limit {key} must be a whole number in {low}..{high}")
        checked[key] = number
    return Limits(**checked)
