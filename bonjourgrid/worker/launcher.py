"""The task launcher: a small process of the worker daemon's own that forks and execs tasks.

Theory of operation. Every task command must start in a session of its own, in its sandbox,
at the desktop's leftovers (nice 19, SCHED_IDLE, the idle I/O class), with a umask of 077 and
its rlimits, from its first instruction: the forked child sets all of that before it execs
(`task_preexec`, worker/limits.py). Forking the daemon itself costs a copy of its page tables
(tens of MB of Python, zmq and zeroconf): about 3 ms of kernel time per task on this kind of
machine, more than the task `true` costs. vfork avoids the copy but holds the daemon's GIL
until the child execs, and a child at idle priority on a busy desktop may wait long for the CPU
to do so: heartbeats stall (worker/spawn.py tells the measurement).

So the daemon starts this process once (`python -m bonjourgrid.worker.launcher FD PARENT`),
which imports only the standard library and limits.py, and whose stalls are its own. Its
spawning thread lowers its own priority once (Linux keeps nice, scheduling policy and I/O
class per thread, and a child inherits its spawning thread's), and the process keeps a umask
of 077: a task without rlimits is then started by posix_spawn (vfork and exec, no copy of
this process, about half the CPU of a fork whose child runs Python before its exec), with
its session, descriptors and signal dispositions set by the spawn itself. A task with
rlimits (which hold per process), or one on a system where the thread could not lower
itself, is forked and sets everything before it execs, as before. The main thread answers
the daemon and reaps. It is the daemon's child and dies with it
(PR_SET_PDEATHSIG); it is a child subreaper, so what a task orphans is reparented to it, and
it reaps those; they stay among the daemon's descendants, where the reaper finds them by
marker (worker/reaper.py).

Protocol, over a SOCK_SEQPACKET socket pair (the kernel keeps message boundaries; both ends
are the same program run by the same user, so the messages are pickled tuples):
- daemon -> launcher: ("spawn", id, argv, env, cwd, limits), with the task's stdout and
  stderr descriptors attached (SCM_RIGHTS);
- launcher -> daemon: ("spawned", id, pid), or ("failed", id, errno, message) when the child
  could not exec (reported through a close-on-exec pipe, as subprocess does), then
  ("exited", id, returncode) once it is reaped (a signal as -N, as subprocess says it).
The daemon stops a task by signalling its process group itself: stopping never waits on this
process. End of file on the socket (the daemon closed it, or died) ends this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence

from bonjourgrid.worker.limits import TASK_NICE, TASK_UMASK, Limits, ioprio_idle, task_preexec

MAX_REQUEST = 1 << 22  # a spawn request: command and environment are bounded far below this
# Python ignores SIGPIPE and SIGXFSZ, and this process SIGINT; an ignored signal stays ignored
# across exec: a task gets them back at their default (`yes | head` must end), as subprocess's
# restore_signals does. SIGCHLD is caught here: exec resets it by itself.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGINT") if hasattr(signal, name)
)
_EARLY_EXITS = 4096  # exits reaped before their spawn was registered (or orphans'), kept
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _exec_child(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    limits: Limits,
    out_fd: int,
    err_fd: int,
    report_fd: int,
) -> None:
    """In the forked child: become the task, or write why not to `report_fd` and exit."""
    try:
        os.setsid()
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for sig in _DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        task_preexec(limits)()  # priority, umask, rlimits: worker/limits.py
        os.execve(argv[0], list(argv), dict(env))
    except BaseException as err:
        number = getattr(err, "errno", None) or 0
        with contextlib.suppress(OSError):
            os.write(report_fd, f"{number}:{err}".encode(errors="replace")[:2000])
    finally:
        os._exit(127)


def _spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    limits: Limits,
    out_fd: int,
    err_fd: int,
) -> int:
    """Fork and exec the task; its pid, or OSError saying why it could not start."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        os.close(report_r)
        _exec_child(argv, env, cwd, limits, out_fd, err_fd, report_w)
    os.close(report_w)
    try:
        # Empty once the child has exec'd (close-on-exec closed its end): it runs.
        why = os.read(report_r, 4096)
    finally:
        os.close(report_r)
    if why:
        os.waitpid(pid, 0)
        number, _, message = why.decode(errors="replace").partition(":")
        raise OSError(int(number) if number.isdigit() else 0, message)
    return pid


def _posix_spawn(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, out_fd: int, err_fd: int
) -> int:
    """Start the task by posix_spawn (vfork and exec: no copy of this process); it inherits
    the calling thread's priority (nice, scheduling policy, I/O class) and our umask."""
    os.chdir(cwd)  # posix_spawn has no chdir here; only the spawning thread uses paths
    try:
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
            setsigmask=(),
        )
    finally:
        # Never left working in a sandbox: what looks for processes working in one (a
        # restarted daemon's leftovers, worker/reaper.py) must not find the launcher.
        os.chdir("/")


def _lower_this_thread() -> bool:
    """Give the calling thread a task's priority (nice 19, SCHED_IDLE, the idle I/O class);
    whether it holds all of them (Linux keeps the three per thread, and a child inherits its
    spawning thread's)."""
    tid = threading.get_native_id()
    idle_io = ioprio_idle()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, TASK_NICE)
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        if idle_io is not None:
            idle_io()  # who=0: the calling thread
        return (
            os.getpriority(os.PRIO_PROCESS, tid) == TASK_NICE
            and os.sched_getscheduler(tid) == os.SCHED_IDLE
            and idle_io is not None
        )
    return False


class _SpawnThread(threading.Thread):
    """Starts tasks one after another, at a task's priority: a task without rlimits by
    posix_spawn, inheriting it (the cheap way); one with rlimits, or on a system where the
    thread could not lower itself, by fork and `task_preexec`. Its results go back to the
    main thread, which answers the daemon, through `results` and a byte on `wake`."""

    def __init__(self, wake: int) -> None:
        super().__init__(name="bgrid-launch", daemon=True)
        self.requests: queue.SimpleQueue[
            tuple[int, list[str], dict[str, str], str, Limits, list[int]] | None
        ] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[int, int, OSError | None]] = queue.SimpleQueue()
        self._wake = wake

    def run(self) -> None:
        lowered = _lower_this_thread()
        while (request := self.requests.get()) is not None:
            ident, argv, env, cwd, limits, fds = request
            try:
                if lowered and not limits.rlimits():
                    pid = _posix_spawn(argv, env, cwd, fds[0], fds[1])
                else:
                    pid = _spawn(argv, env, cwd, limits, fds[0], fds[1])
            except OSError as err:
                self.results.put((ident, 0, err))
            else:
                self.results.put((ident, pid, None))
            finally:
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake, b"s")


def serve(sock: socket.socket) -> None:
    """Answer spawn requests on `sock` and report every task's end, until end of file."""
    sock.setblocking(True)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    tasks: dict[int, int] = {}  # pid -> request id
    early: dict[int, int] = {}  # pid -> exit code, reaped before its spawn was registered
    spawner = _SpawnThread(wake_w)
    spawner.start()

    def send(*message: object) -> None:
        sock.send(pickle.dumps(message))

    def report_exit(pid: int, code: int) -> None:
        ident = tasks.pop(pid, None)
        if ident is not None:
            send("exited", ident, code)
        else:  # an orphan we reaped, or a task whose spawn is not registered yet
            early[pid] = code
            while len(early) > _EARLY_EXITS:
                del early[next(iter(early))]

    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 2)
                    if not data:
                        return  # the daemon is gone, or closed us
                    for fd in fds:
                        os.set_inheritable(fd, False)  # only their copies on 0-2 reach the task
                    kind, ident, argv, env, cwd, limits = pickle.loads(data)
                    assert kind == "spawn" and len(fds) == 2
                    spawner.requests.put((ident, argv, env, cwd, limits, fds))
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
            # Spawns done by the thread: answered, and their pids registered before the reaping.
            while not spawner.results.empty():
                ident, pid, error = spawner.results.get()
                if error is not None:
                    send("failed", ident, error.errno or 0, error.strerror or str(error))
                    continue
                tasks[pid] = ident
                send("spawned", ident, pid)
                if pid in early:
                    report_exit(pid, early.pop(pid))
            # Reap every child that ended: tasks are reported, orphans (we are their
            # subreaper) only reaped.
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                report_exit(pid, os.waitstatus_to_exitcode(status))
    finally:
        spawner.requests.put(None)


def main(argv: Sequence[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    # Passed to us inheritable: no task may hold it (the daemon would never see our end).
    os.set_inheritable(fd, False)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the daemon died before we could tie ourselves to it
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the daemon's to handle
    os.umask(TASK_UMASK)  # inherited by every task (this process writes no file)
    os.chdir("/")  # not the daemon's directory: it works nowhere that may be removed
    # A broken pipe or reset: the daemon is gone.
    with (
        socket.socket(fileno=fd) as sock,
        contextlib.suppress(BrokenPipeError, ConnectionResetError),
    ):
        serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
