"""Starting a task's command off the event loop, and watching for its end without a thread.

Theory of operation. A task must run at the desktop's leftovers (nice 19, SCHED_IDLE, the idle
I/O class), with a umask of 077 and its rlimits, from its first instruction: the child sets
them between fork and exec (`task_preexec`, worker/limits.py). `subprocess` runs that in the
calling thread and waits there, without the GIL, until the child has exec'd. So the daemon
spawns from one thread of its own, at normal priority: the event loop goes on serving
(heartbeats, other tasks' reports) while the kernel copies the daemon for the fork and the
child lowers itself, which under load can take a while since the child runs at idle priority.

Why not vfork from a thread that lowered its own priority (children inherit a thread's nice,
policy and I/O class on Linux, so no preexec would be needed and CPython would vfork): the
spawning thread holds the GIL until the vfork'd child execs, and that child runs at idle
priority. With the owner's processes busy on every core it waits for CPU, and so does every
thread of the daemon waiting for the GIL: measured here, 1.4 s stalls of the main thread with
four busy loops on two cores (0.15 s when the spawning thread keeps normal priority). That
would silence heartbeats and lose the peer; fork costs more CPU but never stalls the loop.

Watching for the end of a child: asyncio's default child watcher starts a thread per child.
Here a pidfd (`os.pidfd_open`, Linux 5.3+) becomes readable when the child exits, so the event
loop watches it like a socket, and `Popen.poll` then reaps it; where pidfds are missing, one
thread per child waits, as asyncio's watcher would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from bonjourgrid.worker.limits import Limits, task_preexec


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
    """Spawns tasks from one thread of the daemon's own (the module's docstring)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bgrid-spawn")

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
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=task_preexec(limits),  # why a preexec: worker/limits.py
            )

        popen = await asyncio.get_running_loop().run_in_executor(self._thread, spawn)
        return TaskProcess(popen)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
