"""The task sandbox on a shared desktop, through a real worker daemon on 127.0.0.1.

Each test is a finding of an attack run: a task that reaches out through a hard link, reads
another job's cache, escapes its process group, corrupts an input another task reads,
competes with the owner, or runs past its wall-clock limit. Tests run as root in CI, where
file modes stop nothing: the defences under test must hold without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bonjourgrid import wire
from bonjourgrid.cache.local import SANDBOXES, LocalCache
from bonjourgrid.cache.store import hash_file
from bonjourgrid.worker import reaper
from tests.inproc import test_worker_daemon as daemon_tests
from tests.inproc.test_worker_daemon import REPLY_S, Coordinator, Peer
from tests.waiting import async_wait_until as wait_until

# A real daemon on 127.0.0.1, and this test in the coordinator's role (the same fixtures).
peer = daemon_tests.peer
coordinator = daemon_tests.coordinator

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("quick_timing")]


async def run_task(
    coordinator: Coordinator, command: str, task: str = "t", **fields: Any
) -> dict[str, Any]:
    """Reserve the peer for job-1 (once), run one task, and return its `task_done`."""
    sock = coordinator.__dict__.get("_sock")
    if sock is None:
        sock = coordinator.__dict__["_sock"] = await coordinator.reserve("job-1")
    message = {**coordinator.run_fields("job-1", task, command), **fields}
    await sock.send(wire.pack_raw("run", **message))
    done = await coordinator.recv(sock, timeout=20)
    assert done["t"] == "task_done", done
    return done


def stored(peer: Peer, done: dict[str, Any], path: str) -> bytes:
    """The bytes of output `path` of a finished task, as the peer's store holds them."""
    digest = {rel: d for rel, d, _ in done["outputs"]}[path]
    located = peer.daemon.store.locate(digest)
    assert located is not None
    return located.read_bytes()


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where an escaping process writes its pid; whatever it names is killed at teardown."""
    path = tmp_path / "escaped.pid"
    yield path
    if path.exists():  # a failed test must not leave its escapee to the next one
        with contextlib.suppress(ValueError, psutil.Error):
            psutil.Process(int(path.read_text())).kill()


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- hard-linked outputs -----------------------------------------------------------------------


async def test_an_output_hard_linked_to_a_private_file_is_copied_never_chmod_ed(
    peer: Peer, coordinator: Coordinator, tmp_path: Path
) -> None:
    private = tmp_path / "home" / "private"
    private.parent.mkdir()
    private.write_bytes(b"the owner's secret\n")
    private.chmod(0o600)
    before = private.stat()
    done = await run_task(coordinator, f"ln {private} out.txt", outputs=["out.txt"])
    assert (done["exit_code"], done["error"]) == (0, "")
    after = private.stat()
    assert stat.S_IMODE(after.st_mode) == 0o600, "the shared inode was chmod-ed"
    assert (after.st_ino, after.st_nlink) == (before.st_ino, 1)  # the sandbox's link is gone
    assert private.read_bytes() == b"the owner's secret\n"
    entry = peer.daemon.store.locate(done["outputs"][0][1])
    assert entry is not None and entry.stat().st_ino != after.st_ino  # a copy, not the inode


# -- private caches and sandboxes --------------------------------------------------------------


async def test_the_cache_and_the_sandbox_are_readable_by_the_worker_s_user_only(
    peer: Peer, coordinator: Coordinator
) -> None:
    ref = coordinator.serve("in.txt", b"job data\n")
    command = (
        "stat -c %a .. . in.txt > modes.txt; echo new > new.txt; stat -c %a new.txt >> modes.txt"
    )
    inputs = coordinator.run_fields("job-1", "t", "", {"in.txt": ref})["inputs"]
    done = await run_task(coordinator, command, inputs=inputs, outputs=["modes.txt"])
    assert (done["exit_code"], done["error"]) == (0, "")
    # The work directory, the sandbox, an input, a file the task made.
    assert stored(peer, done, "modes.txt").split() == [b"700", b"700", b"400", b"600"]
    root = peer.daemon.store.root
    # Once the sandbox is gone (its removal runs after the report): nothing left to race with.
    sandboxes = root / SANDBOXES
    await wait_until(lambda: not any(sandboxes.iterdir()), REPLY_S, "the sandbox's removal")
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, f"{path} is {oct(mode)}"
        elif path.parent.parent.name == "objects":
            assert mode == 0o400, f"{path} is {oct(mode)}"
        else:
            assert mode & 0o077 == 0 or path.name == "lock", f"{path} is {oct(mode)}"


def test_a_world_readable_cache_of_an_older_version_is_made_private_on_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    cache = LocalCache(root)
    partial = cache.incoming_path("x")
    partial.write_bytes(b"old data")
    digest = hashlib.sha256(b"old data").hexdigest()
    entry = cache.commit(partial, digest)
    cache.close()
    for path in (root, root / "objects", entry.parent, root / "incoming", root / SANDBOXES):
        path.chmod(0o755)  # as an older version left them
    entry.chmod(0o444)
    LocalCache(root).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in (root / "objects", entry.parent, root / "incoming", root / SANDBOXES):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(entry.stat().st_mode) == 0o400


# -- escaped processes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "escape",
    [
        "setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 3000'",
        "( setsid sh -c 'echo $$ > {pidfile}; exec sleep 3000' & )",  # double fork, new session
    ],
    ids=["setsid-fork", "double-fork"],
)
async def test_a_process_that_leaves_the_task_s_session_dies_with_the_task(
    coordinator: Coordinator, pidfile: Path, escape: str
) -> None:
    # The task ends only once the escaped process runs, so the test can never pass vacuously.
    command = escape.format(pidfile=pidfile) + f"; until [ -s {pidfile} ]; do sleep 0.01; done"
    done = await run_task(coordinator, command)
    assert (done["exit_code"], done["error"]) == (0, "")
    pid = int(pidfile.read_text())
    await wait_until(lambda: gone(pid), REPLY_S, f"the end of escaped process {pid}")


async def test_a_task_s_processes_carry_its_sandbox_as_a_marker_the_workflow_cannot_unset(
    peer: Peer, coordinator: Coordinator
) -> None:
    command = f'echo "${reaper.MARKER}" > m.txt'
    done = await run_task(
        coordinator, command, outputs=["m.txt"], env={reaper.MARKER: "/elsewhere"}
    )
    assert (done["exit_code"], done["error"]) == (0, "")
    marker = Path(stored(peer, done, "m.txt").decode().strip())
    assert marker.parent == (peer.daemon.store.root / SANDBOXES).resolve()


# -- inputs another task reads -----------------------------------------------------------------


async def test_a_task_that_truncates_its_input_changes_nobody_else_s_copy(
    peer: Peer, coordinator: Coordinator, tmp_path: Path
) -> None:
    data = os.urandom(3 * wire.CHUNK_SIZE)
    ref = coordinator.serve("shared.dat", data)
    sock = await coordinator.reserve("job-1")  # the peer has 2 slots: both run at once
    flag = tmp_path / "truncated"
    writer = f": > shared.dat; echo gone > shared.dat; touch {flag}"
    reader = f"until [ -e {flag} ]; do sleep 0.01; done; sha256sum shared.dat > sum.txt"
    for task, command, outputs in (("reader", reader, ("sum.txt",)), ("writer", writer, ())):
        fields = coordinator.run_fields("job-1", task, command, {"shared.dat": ref}, outputs)
        await sock.send(wire.pack_raw("run", **fields))
    reports = {}
    for _ in range(2):
        done = await coordinator.recv(sock, timeout=20)
        reports[done["task"]] = done
    assert [(r["exit_code"], r["error"]) for r in reports.values()] == [(0, ""), (0, "")]
    assert stored(peer, reports["reader"], "sum.txt").split()[0].decode() == ref.digest
    cached = peer.daemon.store.locate(ref.digest)
    assert cached is not None and hash_file(cached) == ref  # and still cached: not evicted


# -- priority ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{}, {"cpu_s": 100, "memory": 1 << 32}], ids=["none", "rlimits"])
async def test_a_task_runs_at_the_desktop_s_lowest_priority_with_a_private_umask(
    peer: Peer, coordinator: Coordinator, limits: dict[str, int]
) -> None:
    probe = (
        "import os, psutil; p = psutil.Process(); "
        "print(p.nice(), os.sched_getscheduler(0), int(p.ionice().ioclass))"
    )
    command = (
        f'{sys.executable} -c "{probe}" > prio.txt; umask >> prio.txt; '
        "stat -c %a ../stdout ../stderr >> prio.txt"
    )
    done = await run_task(coordinator, command, outputs=["prio.txt"], limits=limits)
    assert (done["exit_code"], done["error"]) == (0, "")
    nice, policy, ioclass, *octal = stored(peer, done, "prio.txt").split()
    umask, stdout_mode, stderr_mode = (int(v, 8) for v in octal)
    assert (int(nice), int(policy), int(ioclass)) == (19, os.SCHED_IDLE, psutil.IOPRIO_CLASS_IDLE)
    assert (umask, stdout_mode, stderr_mode) == (0o077, 0o600, 0o600)
    # The daemon itself keeps its priority: only the task lowered its own.
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)) == (0, os.SCHED_OTHER)


async def test_a_task_starts_with_the_signals_python_ignores_restored(
    peer: Peer, coordinator: Coordinator
) -> None:
    # Python ignores SIGPIPE, and an ignored signal stays ignored across exec: a pipeline
    # whose reader quit early would then never end (`yes | head -1`).
    done = await run_task(
        coordinator, "grep SigIgn /proc/self/status > ign.txt", outputs=["ign.txt"]
    )
    assert (done["exit_code"], done["error"]) == (0, "")
    ignored = int(stored(peer, done, "ign.txt").split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGCHLD):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the task"
    done = await run_task(coordinator, "yes | head -n 1", task="pipe")
    assert (done["exit_code"], done["stdout"], done["stderr"]) == (0, b"y\n", b"")


async def test_a_task_whose_launcher_dies_is_reported_killed_and_the_next_one_runs(
    peer: Peer, coordinator: Coordinator, pidfile: Path
) -> None:
    sock = await coordinator.reserve("job-1")
    command = f"echo $$ > {pidfile}; exec sleep 3000"
    await sock.send(wire.pack_raw("run", **coordinator.run_fields("job-1", "long", command)))
    await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), REPLY_S, "the task")
    launcher = peer.daemon.spawner.launcher_pid
    assert launcher is not None
    os.kill(launcher, signal.SIGKILL)
    done = await coordinator.recv(sock, timeout=20)
    while done["t"] != "task_done":
        done = await coordinator.recv(sock, timeout=20)
    assert done["exit_code"] == -signal.SIGKILL, done
    assert "task launcher stopped" in done["error"] and "killed" in done["error"]
    pid = int(pidfile.read_text())
    await wait_until(lambda: gone(pid), REPLY_S, f"the end of task process {pid}")
    coordinator.__dict__["_sock"] = sock
    again = await run_task(coordinator, "echo again", task="next")
    assert (again["exit_code"], again["stdout"]) == (0, b"again\n")
    assert peer.daemon.spawner.launcher_pid not in (None, launcher)  # a new one


async def test_a_run_cancelled_while_its_command_is_being_started_does_not_run_on(
    peer: Peer, coordinator: Coordinator
) -> None:
    sock = await coordinator.reserve("job-1")
    launcher = peer.daemon.spawner.launcher_pid
    assert launcher is not None
    sandboxes = str(peer.daemon.sandboxes)

    def task_processes() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get(reaper.MARKER, "").startswith(sandboxes):
                    found.append(process)
        return found

    os.kill(launcher, signal.SIGSTOP)  # the spawn request waits, unanswered, in its socket
    try:
        run = coordinator.run_fields("job-1", "t", "exec sleep 3000")
        await sock.send(wire.pack_raw("run", **run))
        await wait_until(lambda: peer.daemon.spawner.pending == 1, REPLY_S, "the spawn request")
        await sock.send(wire.pack_raw("cancel", job="job-1", task="t"))
        ack = await coordinator.ask(sock, "heartbeat", job="job-1", lease_s=30.0)
        assert ack["running"] == []  # the cancel was handled before the command started
    finally:
        os.kill(launcher, signal.SIGCONT)
    await wait_until(lambda: peer.daemon.spawner.pending == 0, REPLY_S, "the spawn's answer")
    await wait_until(lambda: not task_processes(), REPLY_S, "the end of the cancelled command")


# -- the wall-clock limit ----------------------------------------------------------------------


async def test_a_task_over_its_wall_clock_limit_is_killed_with_its_whole_tree(
    coordinator: Coordinator, pidfile: Path
) -> None:
    command = f"setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 3000'; sleep 3000"
    done = await run_task(coordinator, command, limits={"wall_s": 1})
    assert done["exit_code"] != 0
    assert "exceeded its wall-clock limit of 1 s" in done["error"], done
    assert "raise limits.wall_s" in done["error"]
    pid = int(pidfile.read_text())
    await wait_until(lambda: gone(pid), REPLY_S, f"the end of escaped process {pid}")


# -- recycled work directories -----------------------------------------------------------------


async def test_a_recycled_work_directory_is_private_and_empty_and_goes_with_its_job(
    peer: Peer, coordinator: Coordinator
) -> None:
    leftovers = peer.daemon.leftovers
    # A task that opens up its directories and its log, and leaves no file: its directory is
    # clean, so the job's next task gets it.
    first = await run_task(
        coordinator, 'chmod 755 . ..; chmod 644 ../stdout; echo "$BGRID_SANDBOX"', task="a"
    )
    assert (first["exit_code"], first["error"]) == (0, "")
    await wait_until(lambda: leftovers.recyclable == 1, REPLY_S, "the sweep of task a")
    probe = "n=$(ls -A | wc -l); stat -c %a .. . ../stdout > modes.txt; echo $n >> modes.txt"
    second = await run_task(
        coordinator, f'{probe}; echo "$BGRID_SANDBOX"', task="b", outputs=["modes.txt"]
    )
    assert (second["exit_code"], second["error"]) == (0, "")
    assert second["stdout"] == first["stdout"], "not recycled: nothing to test"
    # Private again, and empty (its stdout holds only its own output).
    assert stored(peer, second, "modes.txt").split() == [b"700", b"700", b"600", b"0"]

    # The job ends: no later job runs there, and nothing of it is left.
    sock = coordinator.__dict__["_sock"]
    assert (await coordinator.ask(sock, "release", job="job-1"))["t"] == "released"
    sandboxes = peer.daemon.store.root / SANDBOXES
    await wait_until(lambda: not any(sandboxes.iterdir()), REPLY_S, "the sandboxes' removal")


async def test_a_work_directory_whose_log_became_a_link_is_never_recycled(
    peer: Peer, coordinator: Coordinator, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    first = await run_task(
        coordinator, f'rm ../stderr; ln -s {victim} ../stderr; echo "$BGRID_SANDBOX"', task="a"
    )
    assert (first["exit_code"], first["error"]) == (0, "")
    sandboxes = peer.daemon.store.root / SANDBOXES
    await wait_until(lambda: not any(sandboxes.iterdir()), REPLY_S, "the removal of task a's")
    second = await run_task(coordinator, 'echo "$BGRID_SANDBOX" >&2', task="b")
    assert (second["exit_code"], second["error"]) == (0, "")
    assert second["stderr"] != first["stdout"]
    assert victim.read_text() == "precious\n"
