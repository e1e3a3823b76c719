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
which imports only the standard library and limits.py: forking it is cheap, and a fork that
waits for the CPU stalls nobody but it. It is the daemon's child and dies with it
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
import selectors
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

from bonjourgrid.worker.limits import Limits, task_preexec

MAX_REQUEST = 1 << 22  # a spawn request: command and environment are bounded far below this
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
        # Python ignores SIGPIPE (and SIGXFSZ); an ignored signal stays ignored across exec,
        # so put them back as subprocess's restore_signals does (`yes | head` must end).
        for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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

    def send(*message: object) -> None:
        sock.send(pickle.dumps(message))

    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 2)
                if not data:
                    return  # the daemon is gone, or closed us
                for fd in fds:
                    os.set_inheritable(fd, False)  # only their copies on 1 and 2 go to the task
                try:
                    kind, ident, argv, env, cwd, limits = pickle.loads(data)
                    assert kind == "spawn" and len(fds) == 2
                    try:
                        pid = _spawn(argv, env, cwd, limits, fds[0], fds[1])
                    except OSError as err:
                        send("failed", ident, err.errno or 0, err.strerror or str(err))
                    else:
                        tasks[pid] = ident
                        send("spawned", ident, pid)
                finally:
                    for fd in fds:
                        os.close(fd)
            else:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
        # Reap every child that ended: tasks are reported, orphans (we are their subreaper)
        # only reaped.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ident = tasks.pop(pid, None)
            if ident is not None:
                send("exited", ident, os.waitstatus_to_exitcode(status))


def main(argv: Sequence[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    # Passed to us inheritable: no task may hold it (the daemon would never see our end).
    os.set_inheritable(fd, False)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the daemon died before we could tie ourselves to it
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the daemon's to handle
    # A broken pipe or reset: the daemon is gone.
    with (
        socket.socket(fileno=fd) as sock,
        contextlib.suppress(BrokenPipeError, ConnectionResetError),
    ):
        serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
