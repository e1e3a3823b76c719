"""Starting a task's command through the task launcher, and hearing of its end, without a
thread or a fork of the daemon.

Theory of operation. A task must run in a session of its own, at the desktop's leftovers
(nice 19, SCHED_IDLE, the idle I/O class), with a umask of 077 and its rlimits, from its first
instruction. A child sets them between fork and exec (`task_preexec`, worker/limits.py). Who
forks matters for speed:
- the daemon itself: each fork copies the page tables of tens of MB of Python, zmq and
  zeroconf (about 3 ms of kernel time per task here, more than the task `true`);
- vfork from a daemon thread that lowered its own priority (children inherit a thread's nice,
  policy and I/O class on Linux, so no preexec, and CPython vforks): the spawning thread holds
  the GIL until the child execs, and a child at idle priority waits for the CPU to do so when
  the owner's processes keep every core busy. Measured: 1.4 s stalls of the daemon's event
  loop with four busy loops on two cores, enough to silence heartbeats and lose the peer;
- the task launcher (worker/launcher.py), the daemon's one helper process: small (standard
  library only), its stalls are its own, so it may vfork (posix_spawn) from a thread that
  holds a task's priority, and it forks only for rlimits. This module's Spawner talks to it
  over a socket pair: a request with the task's stdout and stderr descriptors attached,
  answered by the pid (or why it could not start), then by its exit code once the launcher
  has reaped it. The event loop reads the answers like any socket. Measured on 2,000 `true`
  tasks on `--local 2`: about 2.2 ms of CPU per task (daemons, launchers and tasks) with
  the launcher, against 4.3 ms when the launcher forked and 5.5 ms when the daemon did.

Stopping a task needs no launcher: the daemon signals the task's process group itself. If the
launcher dies, every task it started is killed and reported killed by SIGKILL, and the next
spawn starts a new launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TypeVar

from bonjourgrid.worker.launcher import MAX_REQUEST
from bonjourgrid.worker.limits import Limits

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_CLOSE_S = 2.0  # how long a closing launcher has to exit before it is killed


class TaskProcess:
    """A task the launcher started: its pid, and its exit code once it has exited."""

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self._exited = exited
        self.lost = ""  # why it was killed when its launcher stopped (its report says so)

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """Its exit code once it has exited (a signal as -N)."""
        return await asyncio.shield(self._exited)


class Spawner:
    """Spawns tasks through the daemon's task launcher (the module's docstring)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count()
        # Per request id: the task once spawned, and its exit code once reaped. Both futures
        # exist from the request on: one read of the socket may bring both answers.
        self._starting: dict[int, asyncio.Future[TaskProcess]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._procs: dict[int, TaskProcess] = {}  # id -> the task, while it runs

    @property
    def launcher_pid(self) -> int | None:
        """The running launcher's pid, if one runs."""
        return self._launcher.pid if self._launcher is not None else None

    @property
    def pending(self) -> int:
        """Spawn requests the launcher has not answered yet."""
        return len(self._starting)

    def open(self) -> None:
        """Start the launcher now (else the first spawn does), from the daemon's loop."""
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._launcher = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bonjourgrid.worker.launcher",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)

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
        """Spawn `argv` in a session of its own at the lowest priority, under `limits`;
        OSError if it could not start (the launcher's child could not exec it)."""
        self.open()
        assert self._sock is not None
        ident = next(self._ids)
        loop = asyncio.get_running_loop()
        request = pickle.dumps(("spawn", ident, argv, dict(env), str(cwd), limits))
        if len(request) > MAX_REQUEST:
            raise OSError(0, "the command and its environment are too large to start")
        spawned: asyncio.Future[TaskProcess] = loop.create_future()
        exited: asyncio.Future[int] = loop.create_future()
        self._starting[ident], self._exits[ident] = spawned, exited
        try:
            socket.send_fds(self._sock, [request], [stdout.fileno(), stderr.fileno()])
        except OSError:
            self._launcher_gone("its socket failed")
            raise
        return await spawned

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as err:
                self._launcher_gone(str(err))
                return
            if not data:
                self._launcher_gone("it exited")
                return
            kind, ident, *rest = pickle.loads(data)
            if kind == "spawned":
                proc = self._procs[ident] = TaskProcess(rest[0], self._exits[ident])
                _settle(self._starting.pop(ident), proc)
            elif kind == "failed":
                self._exits.pop(ident, None)
                spawned = self._starting.pop(ident)
                if not spawned.done():
                    spawned.set_exception(OSError(rest[0], rest[1]))
            elif kind == "exited":
                self._procs.pop(ident, None)
                _settle(self._exits.pop(ident), rest[0])

    def _launcher_gone(self, why: str) -> None:
        """The launcher died: its tasks are killed and reported so; the next spawn restarts it."""
        if self._sock is None:
            return
        log.error(
            "the task launcher stopped (%s): its %d task(s) are killed", why, len(self._procs)
        )
        self._disconnect()
        for ident, proc in self._procs.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.lost = f"the worker's task launcher stopped ({why}): the task was killed"
            _settle(self._exits.pop(ident), -signal.SIGKILL)
        self._procs.clear()
        for spawned in self._starting.values():
            if not spawned.done():
                spawned.set_exception(OSError(0, f"the task launcher stopped ({why})"))
        self._starting.clear()
        self._exits.clear()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        launcher, self._launcher = self._launcher, None
        if launcher is not None:
            try:
                launcher.wait(_CLOSE_S)  # end of file ends it at once
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()

    def close(self) -> None:
        """Stop the launcher (the daemon stops; its tasks were stopped before)."""
        self._disconnect()


def _settle(future: asyncio.Future[_T], value: _T) -> None:
    if not future.done():  # a cancelled waiter leaves its future cancelled
        future.set_result(value)
