"""What finished tasks leave behind, ended and removed in batches off the tasks' path.

Theory of operation. When a task's shell exits, its run (worker/sandbox.py) kills the task's
process group at once: one system call. What left the group (`setsid`, a double fork) can only
be found by its marker, in a scan of the process table (worker/reaper.py), and removing the
sandbox takes a few system calls a file. Both cost more than a tiny task's command itself, and
neither has to happen before the task's report goes back:

- An escapee cannot change the report. A task with outputs still has its escapees killed
  before its outputs are checked and moved into the store; only a task without outputs leaves
  them here, and its report (exit code, stdout and stderr tails) was read when its shell ended.
- Nobody else reads the sandbox: its name is fresh, unguessable and private (0700).
- An escapee lives at most about `SWEEP_S` longer, at the desktop's lowest priority, and one
  scan kills the escapees of every task that finished since the last sweep, in rounds until
  none is left (`reaper.kill_marked_among`). Sandboxes go after their processes.
- The daemon sweeps once more when a job ends and before it stops (`close`): nothing a task
  started and no sandbox outlives the daemon. A daemon killed with -9 leaves both to the next
  daemon of its cache (`reaper.kill_marked_under`, then the sandboxes' removal).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from bonjourgrid.worker import reaper

SWEEP_S = 0.05  # from a task's end to the sweep that ends its escapees and removes its sandbox


class Leftovers:
    """Escapees and sandboxes of finished tasks, swept in batches on this loop."""

    def __init__(self) -> None:
        self._markers: list[str] = []  # of tasks whose escapees are still to be killed
        self._sandboxes: list[Path] = []  # to remove, once their processes are gone
        self._sweeping = asyncio.Lock()  # one sweep at a time: a close waits for a running one
        self._now = asyncio.Event()  # set: the next sweep need not wait
        self._pending: asyncio.Task[None] | None = None

    def leave(self, workdir: Path, marker: str | None) -> None:
        """Remove `workdir` soon; first kill what carries `marker` (None: nothing can)."""
        if marker is not None:
            self._markers.append(marker)
        self._sandboxes.append(workdir)
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._sweep_soon())

    async def sweep(self) -> None:
        """Kill the escapees and remove the sandboxes left so far; return when done."""
        async with self._sweeping:
            markers, sandboxes = self._markers, self._sandboxes
            self._markers, self._sandboxes = [], []
            if markers or sandboxes:
                await asyncio.to_thread(_sweep, markers, sandboxes)

    async def close(self) -> None:
        """Sweep what is left now (the daemon stops)."""
        self._now.set()
        if self._pending is not None:
            await self._pending
        await self.sweep()

    async def _sweep_soon(self) -> None:
        # Batches: the tasks that end meanwhile share this sweep's scan of the process table.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._now.wait(), SWEEP_S)
        await self.sweep()


def _sweep(markers: list[str], sandboxes: list[Path]) -> None:
    if markers:
        reaper.kill_marked_among(markers)
    for workdir in sandboxes:
        shutil.rmtree(workdir, ignore_errors=True)
