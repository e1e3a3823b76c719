"""Per-task resource limits: what the wire may carry, what the child gets, what the user reads."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest

from bonjourgrid.errors import ProtocolError
from bonjourgrid.worker import limits
from bonjourgrid.worker.limits import (
    Limits,
    check_cpu_s,
    check_memory,
    limits_from_wire,
    task_preexec,
)

MIB = 1024**2


@pytest.mark.parametrize(
    ("value", "seconds"), [(1, 1), (10, 10), (0.2, 1), (2.5, 3), (limits.MAX_CPU_S, 10**7)]
)
def test_cpu_time_is_whole_seconds_rounded_up(value: float, seconds: int) -> None:
    assert check_cpu_s(value) == seconds


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "10", None, 1e8])
def test_cpu_time_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(ValueError, match="cpu_s"):
        check_cpu_s(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512MiB", 512 * MIB),
        ("2GiB", 2 * 1024 * MIB),
        ("1G", 1024 * MIB),
        ("1GB", 1024 * MIB),
        (512, 512 * MIB),  # a bare number is MiB, as the `ram` TXT key
        ("512", 512 * MIB),
        (" 64.5 ", int(64.5 * MIB)),
        (4, 4 * MIB),
    ],
)
def test_memory_is_a_size_or_mib(value: object, size: int) -> None:
    assert check_memory(value) == size


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("lots", "not a size"),
        ("-5MiB", "not a size"),
        ("1KiB", "between 4.0 MiB"),
        (0, "between"),
        (-1, "between"),
        (2**60, "between"),
        (True, "must be a size"),
        (None, "must be a size"),
        (float("nan"), "must be a size"),
        ([512], "must be a size"),
    ],
)
def test_memory_must_be_a_sensible_size(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_memory(value)


# -- the wire ----------------------------------------------------------------------------------


def test_limits_from_the_wire() -> None:
    assert limits_from_wire({}) == Limits()
    assert limits_from_wire({"cpu_s": 10}) == Limits(cpu_s=10)
    assert limits_from_wire({"cpu_s": 1, "memory": 64 * MIB}) == Limits(1, 64 * MIB)
    assert limits_from_wire({"cpu_s": None}) == Limits()
    assert limits_from_wire({"wall_s": 30}) == Limits(wall_s=30)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"pids": 10}, "unknown limit 'pids'"),
        ({1: 10}, "unknown limit '1'"),
        ({"cpu_s": 0}, "cpu_s must be a whole number"),
        ({"cpu_s": -3}, "cpu_s"),
        ({"cpu_s": 1.5}, "cpu_s"),
        ({"cpu_s": True}, "cpu_s"),
        ({"cpu_s": "10"}, "cpu_s"),
        ({"cpu_s": 2**64}, "cpu_s"),
        ({"memory": 1024}, "memory must be a whole number"),
        ({"memory": 2**63}, "memory"),
        ({"memory": [1]}, "memory"),
        ({"wall_s": 0}, "wall_s must be a whole number"),
        ({"wall_s": 2.5}, "wall_s"),
        ({"wall_s": 2**64}, "wall_s"),
    ],
)
def test_malformed_limits_are_protocol_errors(fields: dict[Any, Any], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        limits_from_wire(fields)


# -- applying them -----------------------------------------------------------------------------


def test_no_limits_no_preexec_function() -> None:
    assert Limits().preexec() is None
    assert Limits().rlimits() == []


def test_the_cpu_hard_limit_leaves_a_grace_second_for_sigxcpu() -> None:
    assert Limits(cpu_s=5, memory=64 * MIB).rlimits() == [
        (resource.RLIMIT_CPU, 5, 5 + limits.CPU_GRACE_S),
        (resource.RLIMIT_AS, 64 * MIB, 64 * MIB),
    ]


def test_limits_never_ask_above_the_daemons_own_hard_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only root may raise a hard limit: asking more would make setrlimit fail in the child.
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3, 4))
    assert Limits(cpu_s=10, memory=64 * MIB).rlimits() == [
        (resource.RLIMIT_CPU, 4, 4),
        (resource.RLIMIT_AS, 4, 4),
    ]


def test_the_child_and_its_children_run_under_the_limits() -> None:
    apply = Limits(cpu_s=7, memory=256 * MIB).preexec()
    assert apply is not None
    # `ulimit -t` prints seconds and `ulimit -v` KiB; the inner sh is a child of the outer.
    out = subprocess.run(
        ["/bin/sh", "-c", "ulimit -t; ulimit -v; sh -c 'ulimit -t'"],
        preexec_fn=apply,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["7", str(256 * 1024), "7"]
    assert resource.getrlimit(resource.RLIMIT_CPU)[0] != 7  # the daemon itself is untouched


def test_a_task_yields_to_the_owner_and_keeps_its_files_private() -> None:
    # Read by the child itself: its nice value, scheduling policy, I/O class and umask.
    probe = (
        "import os, psutil; p = psutil.Process(); "
        "print(p.nice(), os.sched_getscheduler(0), int(p.ionice().ioclass), os.umask(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=task_preexec(Limits()),
        capture_output=True,
        text=True,
        check=True,
    )
    nice, policy, ioclass, umask = (int(v) for v in out.stdout.split())
    assert nice == limits.TASK_NICE == 19
    assert policy == os.SCHED_IDLE
    assert ioclass == psutil.IOPRIO_CLASS_IDLE
    assert umask == 0o077
    assert os.getpriority(os.PRIO_PROCESS, 0) != 19  # the daemon itself is untouched


def test_the_task_preexec_applies_the_limits_too() -> None:
    out = subprocess.run(
        ["/bin/sh", "-c", "ulimit -t"],
        preexec_fn=task_preexec(Limits(cpu_s=9)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["9"]


# -- telling the user --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [-signal.SIGXCPU, 128 + signal.SIGXCPU])
def test_sigxcpu_says_the_cpu_limit_was_exceeded(code: int) -> None:
    message = Limits(cpu_s=1).explain(code, "")
    assert message.startswith("exceeded its CPU time limit of 1 s (killed by SIGXCPU)")
    assert "raise limits.cpu_s" in message


def test_sigkill_under_a_cpu_limit_names_the_hard_limit() -> None:
    message = Limits(cpu_s=3).explain(-signal.SIGKILL, "")
    assert "killed by SIGKILL, most likely at its CPU time limit of 3 s" in message


@pytest.mark.parametrize(
    "stderr",
    [
        "Traceback (most recent call last):\n  ...\nMemoryError\n",
        "sort: memory exhausted\n",
        "terminate called after throwing an instance of 'std::bad_alloc'\n",
        "head: cannot allocate memory\n",
        "memory allocation of 1073741824 bytes failed\n",
    ],
)
def test_an_allocation_failure_under_a_memory_limit_says_so(stderr: str) -> None:
    message = Limits(memory=256 * MIB).explain(1, stderr)
    assert message.startswith("ran out of memory at its memory limit of 256.0 MiB (exit code 1)")


def test_a_crash_under_a_memory_limit_is_possibly_the_limit() -> None:
    message = Limits(memory=256 * MIB).explain(-signal.SIGSEGV, "")
    assert message.startswith("killed by SIGSEGV, possibly at its memory limit of 256.0 MiB")


@pytest.mark.parametrize(
    ("limit", "code", "stderr"),
    [
        (Limits(cpu_s=1, memory=64 * MIB), 0, "MemoryError"),  # it succeeded: nothing to say
        (Limits(), -signal.SIGXCPU, "MemoryError"),  # no limit of ours did that
        (Limits(cpu_s=1), 1, "MemoryError"),  # a CPU limit does not explain a memory error
        (Limits(memory=64 * MIB), 2, "file not found"),  # an ordinary failure
        (Limits(cpu_s=1), -signal.SIGTERM, ""),
    ],
)
def test_other_exits_are_left_to_the_exit_code(limit: Limits, code: int, stderr: str) -> None:
    assert limit.explain(code, stderr) == ""


def test_the_wall_clock_limit_is_named_when_the_sandbox_hit_it() -> None:
    message = Limits(wall_s=30).explain(-signal.SIGKILL, "", out_of_time=True)
    assert "exceeded its wall-clock limit of 30 s" in message
    assert "raise limits.wall_s" in message
    assert Limits(wall_s=30).explain(-signal.SIGKILL, "") == ""  # killed by someone else


def test_describe() -> None:
    assert Limits().describe() == "none"
    assert Limits(wall_s=5).describe() == "wall-clock 5 s"
    assert Limits(cpu_s=10, memory=512 * MIB).describe() == "CPU 10 s, memory 512.0 MiB"
