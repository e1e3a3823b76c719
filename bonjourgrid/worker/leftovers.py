"""What finished tasks leave behind: ended in batches off the tasks' path, sandboxes recycled.

Theory of operation. When a task's shell exits, its run (worker/sandbox.py) kills the task's
process group at once: one system call. What left the group (`setsid`, a double fork) can only
be found by its marker, in a scan of the process table (worker/reaper.py), and making and
removing a sandbox (two directories, two files) costs a few file-system operations, each one
an inode allocated or freed (on a busy ext4, 50 to 500 µs of CPU apiece). All of this costs
more than a tiny task's command, and none of it has to happen before the task's report goes:

- An escapee cannot change the report. A task with outputs still has its escapees killed
  before its outputs are checked and moved into the store; only a task without outputs leaves
  them here, and its report (exit code, stdout and stderr tails) was read when its shell ended.
- Nobody else reads the sandbox: its name is fresh, unguessable and private (0700).
- An escapee lives at most about `SWEEP_S` longer, at the desktop's lowest priority, and one
  scan kills the escapees of every task that finished since the last sweep, in rounds until
  none is left (`reaper.kill_marked_among`). Sandboxes are dealt with after their processes.
- The daemon sweeps when a job ends and before it stops (`end_job`, `close`): nothing a task
  started and no sandbox outlives its job. A daemon killed with -9 leaves both to the next
  daemon of its cache (`reaper.kill_marked_under`, then the sandboxes' removal).

Recycling. A swept work directory that holds exactly what the daemon made (an empty `sandbox`
directory, `stdout` and `stderr` regular files with no other name) is kept for the job's next
task instead of being removed: no inode is freed or allocated. It is reused only within the
job that used it (the rest are removed at the job's end), only once every process carrying its
marker is dead, and it is made private again (chmod 0700) and its logs are truncated, opened
without following links, when the next task takes it (worker/sandbox.py). A directory that
holds anything else is removed, never recycled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from pathlib import Path

from bonjourgrid.worker import reaper

SWEEP_S = 0.05  # from a task's end to the sweep that ends its escapees and removes its sandbox
MAX_RECYCLED = 64  # work directories kept for the job's next tasks
_LAYOUT = {"sandbox", "stdout", "stderr"}  # a work directory as TaskRun leaves it


class Leftovers:
    """Escapees and sandboxes of finished tasks, swept in batches on this loop."""

    def __init__(self) -> None:
        self.job: str | None = None  # the job whose work directories may be recycled
        self._markers: list[str] = []  # of tasks whose escapees are still to be killed
        # To recycle or remove once their processes are gone, with the job they ran for.
        self._sandboxes: list[tuple[Path, str]] = []
        self._recycled: list[Path] = []  # swept, clean: for the next tasks of `job`
        self._sweeping = asyncio.Lock()  # one sweep at a time: a close waits for a running one
        self._now = asyncio.Event()  # set: the next sweep need not wait
        self._pending: asyncio.Task[None] | None = None

    def leave(self, workdir: Path, marker: str | None, job: str) -> None:
        """Recycle (for `job`) or remove `workdir` soon; first kill what carries `marker`
        (None: nothing can any more)."""
        if marker is not None:
            self._markers.append(marker)
        self._sandboxes.append((workdir, job))
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._sweep_soon())

    @property
    def recyclable(self) -> int:
        """How many swept work directories wait for the job's next tasks."""
        return len(self._recycled)

    def take(self) -> Path | None:
        """A swept work directory of this job to run the next task in, if one is kept."""
        return self._recycled.pop() if self._recycled else None

    async def sweep(self) -> None:
        """Kill the escapees and deal with the sandboxes left so far; return when done."""
        async with self._sweeping:
            markers, left = self._markers, self._sandboxes
            self._markers, self._sandboxes = [], []
            if not markers and not left:
                return
            job = self.job
            mine = [workdir for workdir, of in left if of == job and job is not None]
            others = [workdir for workdir, of in left if of != job or job is None]
            room = MAX_RECYCLED - len(self._recycled)
            kept = await asyncio.to_thread(_sweep, markers, mine, others, room)
            if self.job == job:
                self._recycled.extend(kept)
            else:  # the job ended meanwhile: nothing of it is reused
                await asyncio.to_thread(_remove, kept)

    def start_job(self, job: str) -> None:
        """Work directories left by `job`'s tasks may be recycled for its later tasks."""
        self.job = job

    def end_job(self) -> None:
        """The job ended: no later task takes its directories; the next sweep removes them
        (the caller starts one now)."""
        self.job = None
        self._sandboxes.extend((workdir, "") for workdir in self._recycled)
        self._recycled = []

    async def close(self) -> None:
        """Sweep what is left now and remove every kept directory (the daemon stops)."""
        self._now.set()
        if self._pending is not None:
            await self._pending
        self.end_job()
        await self.sweep()

    async def _sweep_soon(self) -> None:
        # Batches: the tasks that end meanwhile share this sweep's scan of the process table.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._now.wait(), SWEEP_S)
        await self.sweep()


def _sweep(markers: list[str], mine: list[Path], others: list[Path], room: int) -> list[Path]:
    """Kill what carries `markers`, then keep up to `room` of `mine` that are clean; remove
    the rest, and `others`."""
    if markers:
        reaper.kill_marked_among(markers)
    kept: list[Path] = []
    for workdir in mine:
        if len(kept) < room and _clean(workdir):
            kept.append(workdir)
        else:
            others.append(workdir)
    _remove(others)
    return kept


def _clean(workdir: Path) -> bool:
    """Whether `workdir` holds only what the daemon made: an empty sandbox, two log files."""
    try:
        if set(os.listdir(workdir)) != _LAYOUT or os.listdir(workdir / "sandbox"):
            return False
        if not stat.S_ISDIR(os.lstat(workdir / "sandbox").st_mode):
            return False
        for log in ("stdout", "stderr"):
            st = os.lstat(workdir / log)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return False
    except OSError:
        return False
    return True


def _remove(workdirs: list[Path]) -> None:
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
