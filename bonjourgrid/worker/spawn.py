"""Starting a task's command cheaply, at the desktop's lowest priority from its first instruction.

Theory of operation. A task must run at the desktop's leftovers (nice 19, SCHED_IDLE, the idle
I/O class) and with a umask of 077 from its first instruction (worker/limits.py). Setting these
in the child between fork and exec (a `preexec_fn`) forces CPython to fork: the kernel copies
the daemon's page tables for every task, which costs more CPU than a tiny command itself.
Without a preexec_fn, `subprocess` uses vfork (CPython 3.10+ on Linux): the child borrows the
parent's memory until it execs. `umask`, `cwd` and `start_new_session` are applied by the C
code between vfork and exec, so they keep vfork.

The priority goes another way. On Linux, the nice value, the scheduling policy and the I/O
priority belong to each thread, and a child copies them from the thread that spawns it. So one
dedicated spawner thread lowers its own priority once (setpriority, sched_setscheduler and
ioprio_set on its native thread id) and spawns every task: each child is born at the lowest
priority, before its first instruction, with no code run between vfork and exec. The daemon's
other threads keep their priority (checked when the thread lowers itself).

Where this does not hold (not Linux; a kernel where lowering the thread lowered the whole
daemon, or did not take), and for tasks with rlimits (`cpu_s`, `memory`: they must hold from
the first instruction too, and setrlimit in a child is per process), the spawner falls back to
the preexec function, as before: a fork that sets everything in the child.

The cost of the thread: the spawner holds the GIL for the Python part of `Popen` (some tens of
microseconds a task) at idle priority. When the owner's processes fill every core, the loop
may wait on it for a few scheduler ticks; a busy owner also stops the tasks (worker/idle.py).

Watching for the end of a child: asyncio's default child watcher starts a thread per child.
Here a pidfd (`os.pidfd_open`, Linux 5.3+) becomes readable when the child exits, so the event
loop watches it like a socket, and `Popen.poll` then reaps it; where pidfds are missing, one
thread per child waits, as asyncio's watcher would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import psutil

from bonjourgrid.worker.limits import TASK_NICE, TASK_UMASK, Limits, ioprio_idle, task_preexec

log = logging.getLogger(__name__)


class TaskProcess:
    """A spawned command whose end the event loop watches (a pidfd, else a waiting thread)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = -1
        try:
            # Valid even if the child already exited: it stays a zombie until we reap it.
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            waiting = loop.run_in_executor(None, popen.wait)
            waiting.add_done_callback(self._waited)
        else:
            loop.add_reader(self._pidfd, self._readable)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Its exit code once it has exited (and been reaped)."""
        return await asyncio.shield(self._exited)

    def _readable(self) -> None:
        code = self.popen.poll()  # waitpid(WNOHANG): reaps it
        if code is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        if not self._exited.done():
            self._exited.set_result(code)

    def _waited(self, waiting: asyncio.Future[int]) -> None:
        if not self._exited.done():
            self._exited.set_result(waiting.result())


class Spawner:
    """Spawns tasks from one thread running at the lowest priority (the module's docstring)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="bgrid-spawn", initializer=self._lower_priority
        )
        self.inherits = False  # whether children of the thread are born at its priority

    async def start(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdout: IO[bytes],
        stderr: IO[bytes],
        limits: Limits,
    ) -> TaskProcess:
        """Spawn `argv` in a session of its own at the lowest priority, under `limits`."""

        def spawn() -> subprocess.Popen[bytes]:
            # Read in the thread, after its initializer decided.
            vfork = self.inherits and not limits.rlimits()
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                umask=TASK_UMASK,
                preexec_fn=None if vfork else task_preexec(limits),
            )

        popen = await asyncio.get_running_loop().run_in_executor(self._thread, spawn)
        return TaskProcess(popen)

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    def _lower_priority(self) -> None:
        """Run once in the spawner thread: lower its own priority, and check it alone."""
        if not sys.platform.startswith("linux"):
            return  # elsewhere a thread id is no process id: the preexec path is used
        thread = threading.get_native_id()
        daemon = psutil.Process()
        before = _priority_of(daemon)
        # Each step on its own, as in the preexec: a kernel that refuses one gets the others.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, TASK_NICE)
        idle_io = ioprio_idle(thread)
        if idle_io is not None:
            idle_io()
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        try:
            lowered = _priority_of(psutil.Process(thread))
        except (psutil.Error, OSError):
            return
        # Children copy this thread's priority only if it is the thread's own (the daemon's
        # main thread kept its own) and it took: otherwise every task gets the preexec.
        self.inherits = _priority_of(daemon) == before and lowered[0] == TASK_NICE
        if not self.inherits:
            log.info("tasks are spawned by fork: the spawner thread could not lower itself alone")


def _priority_of(process: psutil.Process) -> tuple[int, int, int]:
    """Nice value, scheduling policy and I/O class of a process (or of a thread, by its id)."""
    return process.nice(), os.sched_getscheduler(process.pid), int(process.ionice().ioclass)
