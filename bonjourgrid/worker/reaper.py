"""Every process a task starts ends with the task, even one that left its process group.

Theory of operation. A task runs under /bin/sh in a session of its own, and stopping its
process group stops what stayed in it. A process can leave the group (`setsid`, a double
fork), so two more things hold it:

- The daemon is a child subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux): an orphaned
  task process is reparented to the daemon, not to init, so it stays among the daemon's
  descendants whatever it does to its session.
- Each task's processes carry a marker in their environment, `BGRID_SANDBOX=<the sandbox
  directory>`, which every child inherits and /proc/PID/environ shows (psutil). When the
  task ends, every descendant of the daemon that carries its marker is killed, round after
  round until none is left (a process that forks meanwhile is found in the next round):
  at once when the task has outputs to check or was stopped, else in a batched sweep with
  the other tasks finished meanwhile (worker/leftovers.py says why that is safe).

The marker also names the cache directory the sandbox is in. A daemon killed with -9 leaves
its tasks running; the next daemon of the same cache kills every process whose marker names
a sandbox of that cache (`kill_marked_under`) before it removes the sandboxes, so an orphaned
task neither finishes a second time nor sees its directory vanish under it.

What this does not catch: a process that drops the marker (`env -i`, exec with a new
environment) and leaves the process group. A cgroup per task would; it needs a writable
cgroup v2 tree, which a desktop daemon rarely has.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Collection
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MARKER = "BGRID_SANDBOX"  # the environment variable that tags a task's processes
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1
_KILL_ROUNDS = 50  # rounds of find-and-kill before giving up on a process that forks faster
_REAP_S = 2.0  # how long a SIGKILLed process may take to become a zombie and be reaped


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where impossible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
    if not done:
        log.warning("could not become a child subreaper: %s", os.strerror(ctypes.get_errno()))
    return done


# Set by whoever starts a worker that must not outlive it (the embedded local grid): its pid.
PARENT_PID_ENV = "BGRID_PARENT_PID"


def stop_with_parent(parent_pid: int) -> bool:
    """Have the kernel send this process SIGTERM when `parent_pid`, its parent, dies (even by
    `kill -9`): the embedded local grid's workers must not outlive their submit. False where
    impossible, or when the parent is already gone (then the caller should stop at once)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        set_up = bool(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return True  # nothing to rely on: the parent stops its workers itself
    # The parent may have died before the signal was armed: then we are someone else's now.
    return set_up and os.getppid() == parent_pid


def _marker_of(process: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error, OSError):
        return process.environ().get(MARKER)
    return None


def _kill_rounds(find: Callable[[], list[psutil.Process]]) -> int:
    """SIGKILL what `find` returns until it returns nothing; how many processes were killed."""
    killed: dict[int, psutil.Process] = {}
    for _ in range(_KILL_ROUNDS):
        alive = []
        for process in find():
            with contextlib.suppress(psutil.Error):
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.send_signal(signal.SIGKILL)
                    alive.append(process)
        if not alive:
            break
        killed.update((p.pid, p) for p in alive)
    else:
        log.warning("task processes kept forking through %d rounds of SIGKILL", _KILL_ROUNDS)
    # Those reparented to this process are its zombies now: reap them (psutil waits on its
    # own children with waitpid), and wait for the others to be gone.
    psutil.wait_procs(list(killed.values()), timeout=_REAP_S)
    return len(killed)


def kill_marked(tag: str) -> int:
    """Kill every descendant of this process whose marker is `tag`; how many."""
    return kill_marked_among({tag})


def kill_marked_among(tags: Collection[str]) -> int:
    """Kill every descendant of this process whose marker is one of `tags`; how many. One
    scan of the process table a round, whatever the number of tags."""
    me = psutil.Process()
    wanted = set(tags)

    def find() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [p for p in me.children(recursive=True) if _marker_of(p) in wanted]
        return []

    return _kill_rounds(find)


def _marked_of_user(
    matches: Callable[[str], bool], working_in: str | None = None
) -> Callable[[], list[psutil.Process]]:
    """A finder of the processes of this user (not this one) whose marker `matches`, or, with
    `working_in` (a directory path ending in a separator), whose working directory lies there:
    a middleware's job step (slurmstepd) clears its environment, marker included, but works
    in its daemon's directory."""
    uid = os.geteuid()
    me = os.getpid()

    def find() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.pid == me or process.uids().real != uid:
                    continue
                tag = _marker_of(process)
                if (tag is not None and matches(tag)) or (
                    working_in is not None and _working_in(process, working_in)
                ):
                    found.append(process)
        return found

    return find


def _working_in(process: psutil.Process, prefix: str) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return (process.cwd() + os.sep).startswith(prefix)
    return False


def kill_marked_anywhere(tag: str) -> int:
    """Kill every process of this user whose marker is `tag`, descendant or not: the command
    of an external run (worker/task_steps.py) is a child of the middleware, not of this one."""
    return _kill_rounds(_marked_of_user(lambda found: found == tag))


def kill_working_in(directory: Path) -> int:
    """Kill every process of this user (not this one) working in `directory`."""
    prefix = str(directory.resolve()) + os.sep
    return _kill_rounds(_marked_of_user(lambda _tag: False, working_in=prefix))


def kill_marked_under(directory: Path) -> int:
    """Kill every process of this user whose marker names a sandbox in `directory`, or that
    works in one (what a middleware's daemon started there, which lost the marker)."""
    prefix = str(directory.resolve()) + os.sep
    killed = _kill_rounds(_marked_of_user(lambda tag: tag.startswith(prefix), working_in=prefix))
    if killed:
        log.warning("killed %d task processes left by a previous daemon of this cache", killed)
    return killed


def reap_group(pgid: int) -> None:
    """Reap this process's zombie children in process group `pgid`.

    A task process orphaned by its parent and then ended by itself is this (subreaper)
    process's zombie; the group is the task's, so no other child of the daemon is reaped.
    """
    while True:
        try:
            if os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG) is None:
                return  # children in that group, none of them ended
        except ChildProcessError:
            return  # no child of ours is in that group
