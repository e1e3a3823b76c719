"""Running one task: inputs into a private directory, the command, outputs into the store.

A task's sandbox is a fresh, private (0700) directory holding copies of its inputs at their
declared relative paths. The command runs there under /bin/sh in a session (process group) of
its own, at the desktop's lowest priority (worker/limits.py, spawned as worker/spawn.py
says), with a marker in its environment; when it ends or is stopped, its group is killed at
once, and every process carrying the marker (worker/reaper.py) before its outputs are
checked, or, for a task without outputs, by the next batched sweep (worker/leftovers.py),
which removes the sandbox too. Declared outputs must be regular files inside the sandbox;
they are moved into the content store and reported by digest.

Why copies and not hard links into the cache: a hard link is the cache's own inode, and a
task running as root (tests, CI, many desktops' daemons) writes through any file mode, so a
task that truncates its input would corrupt the cache and every other task reading it.
A copy costs the input's bytes once more on disk and the time to write them; it is made in
the kernel (copy_file_range), and on btrfs or XFS it is a reflink that costs neither until
the task writes. The copies live in the sandbox, outside the cache's size bound, and go with
it when the task ends.

Files reach the local cache through one `Staging` per daemon, shared by task runs and
prefetches: one fetch per digest at a time, whoever asks, proving the job's keypair. What
the job that holds the peer keeps (pins, files prefetched and not yet used) is its `JobData`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid.cache.local import CacheFullError, LocalCache
from bonjourgrid.cache.store import FileRef
from bonjourgrid.cache.transfer import Fetcher, Source
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.keys import Keypair
from bonjourgrid.protocol import (
    MAX_LOG,
    MAX_RUN_FILES,
    Run,
    RunPart,
    StepGranted,
    TaskInput,
    check_path,
)
from bonjourgrid.worker import reaper
from bonjourgrid.worker.leftovers import Leftovers
from bonjourgrid.worker.limits import Limits, limits_from_wire
from bonjourgrid.worker.spawn import Spawner, TaskProcess
from bonjourgrid.worker.task_steps import ExternalStep, StepEnded

log = logging.getLogger(__name__)

# Between SIGTERM and SIGKILL of a task's process group: with the daemon's owner sampling
# period (0.2 s), a returning owner gets the machine back within a second.
STOP_GRACE_S = 0.5
_STDERR_TAIL = 2000  # characters of stderr kept in a report
_MAX_PARALLEL_FETCHES = 4  # per task run
_MAX_PREFETCHES = 4  # fetches that prefetches run at once, for the whole peer
_MAX_JOINS = 3  # shared fetches a file waits on (each failed) before it is fetched regardless
_DISK_FULL_BYTES = 1024 * 1024  # a failed task on a disk with less free than this: disk full


@dataclass(frozen=True)
class RunSpec:
    """What a `run` (and its `run_part`s) asks for, checked."""

    command: str
    inputs: tuple[TaskInput, ...]
    outputs: tuple[str, ...]
    env: dict[str, str]
    limits: Limits
    launch: str = "worker"  # "external": a `bgrid task-step` runs the command (task_steps.py)


def safe_relative(path: str) -> str:
    """`path` if it is relative and stays inside the sandbox; ProtocolError otherwise."""
    return check_path(path)


def run_spec(run: Run, parts: Sequence[RunPart] = ()) -> RunSpec:
    """The task of a decoded `run` and its parts (each checked by `decode`) as a whole;
    ProtocolError if the whole does not hold together."""
    inputs = list(run.inputs)
    outputs = list(run.outputs)
    for part in parts:
        inputs.extend(part.inputs)
        outputs.extend(part.outputs)
    if len(inputs) + len(outputs) > MAX_RUN_FILES:
        raise ProtocolError(f"a run lists more than {MAX_RUN_FILES} inputs and outputs")
    paths = [i.path for i in inputs] + outputs
    if len(set(paths)) != len(paths):
        raise ProtocolError("a path is listed twice among the task's inputs and outputs")
    return RunSpec(
        run.command,
        tuple(inputs),
        tuple(outputs),
        run.env,
        limits_from_wire(run.limits),
        run.launch,
    )


@dataclass(eq=False)
class JobData:
    """What the peer keeps for the job that holds its reservation, until `end()`."""

    name: str
    keypair: Keypair | None  # what its fetches prove to data servers (None: --insecure)
    store: LocalCache
    worker: str = ""  # this worker's name, BGRID_WORKER in a task's environment
    pins: set[str] = field(default_factory=set)  # job pins: one count each in the store
    unclaimed: set[str] = field(default_factory=set)  # prefetched, no run has used them yet
    prefetches: set[asyncio.Task[None]] = field(default_factory=set)
    ended: bool = False

    def keep(self, digest: str) -> None:
        """Pin `digest` until the reservation ends (it need not be cached yet)."""
        if not self.ended and digest not in self.pins:
            self.store.pin(digest)
            self.pins.add(digest)

    def let_go(self, digest: str) -> None:
        """Drop the job's pin on `digest` (a prefetch that brought nothing)."""
        if digest in self.pins:
            self.pins.discard(digest)
            self.store.unpin(digest)

    def end(self) -> None:
        """The reservation ended: cancel its prefetches, drop its pins."""
        self.ended = True
        for task in self.prefetches:
            task.cancel()
        for digest in self.pins:
            self.store.unpin(digest)
        self.pins.clear()
        self.unclaimed.clear()


# How `Staging.obtain` found a file: in the cache, brought by this caller, or brought by a
# fetch someone else on this peer had in flight.
HIT, FETCHED, SHARED = "hit", "fetched", "shared"


@dataclass(eq=False)
class _Fetch:
    task: asyncio.Task[str]  # its result: the label of the source that served the file
    urgent: asyncio.Event  # set when a run waits for it: a prefetch then goes at once
    waiters: int = 0


class Staging:
    """Brings files into the local cache: one fetch per digest at a time, whoever asks.

    A run that needs a file a prefetch (or another run) is fetching waits for that fetch;
    so does a prefetch of a file a run is fetching. A fetch nobody waits for any more (its
    runs stopped, its prefetches cancelled) is cancelled. Runs go first: a prefetch starts
    moving bytes only while no run of this peer is fetching (or once a run waits for it), so
    the files of the tasks about to compute never share the link with those of later ones.
    """

    def __init__(self, store: LocalCache, fetcher: Fetcher) -> None:
        self.store = store
        self.fetcher = fetcher
        self.inflight: dict[str, _Fetch] = {}  # digest -> the fetch bringing it
        self.prefetch_slots = asyncio.Semaphore(_MAX_PREFETCHES)
        self._demand = 0  # runs staging their inputs now
        self._no_demand = asyncio.Event()
        self._no_demand.set()

    async def obtain(
        self,
        ref: FileRef,
        sources: tuple[Source, ...],
        job: JobData,
        slots: asyncio.Semaphore,
        what: str,
        prefetch: bool = False,
    ) -> tuple[str, str]:
        """Make `ref` present in the cache: (HIT | FETCHED | SHARED, label of the source).

        Raises what the fetch raised (TransferError, CacheFullError) when this call fetched.
        """
        joins = 0
        while True:
            # Off the loop: an entry changed on disk is hashed again (and dropped if corrupt).
            if await asyncio.to_thread(self.store.has, ref):
                return HIT, ""
            current = self.inflight.get(ref.digest)
            if current is not None and joins < _MAX_JOINS:
                joins += 1
                if not prefetch:
                    current.urgent.set()
                try:
                    await self._join(current)
                    return SHARED, ""
                except asyncio.CancelledError:
                    if _cancelling():
                        raise
                except Exception:  # that fetch failed: try again, with our sources
                    pass
                continue
            async with slots:
                if ref.digest in self.inflight and joins < _MAX_JOINS:
                    continue  # someone began while this waited for a slot
                if self.store.holds(ref.digest) and await asyncio.to_thread(self.store.has, ref):
                    return SHARED, ""  # someone brought it while this waited for a slot
                urgent = asyncio.Event()
                if not prefetch:
                    urgent.set()
                entry = _Fetch(
                    asyncio.ensure_future(self._fetch(ref, sources, job, what, urgent)),
                    urgent,
                )
                if self.inflight.setdefault(ref.digest, entry) is entry:
                    # A callback, not a `finally` in the fetch: a fetch cancelled before its
                    # first step never runs its body. Callbacks run in order: before waiters.
                    entry.task.add_done_callback(functools.partial(self._forget, ref.digest, entry))
                return FETCHED, await self._join(entry)

    async def _fetch(
        self,
        ref: FileRef,
        sources: tuple[Source, ...],
        job: JobData,
        what: str,
        urgent: asyncio.Event,
    ) -> str:
        prefetch = not urgent.is_set()
        while not urgent.is_set() and not self._no_demand.is_set():
            await _first_of(urgent, self._no_demand)
        self.store.admit(ref.size, what)
        partial = self.store.incoming_path(ref.digest)
        source = await self.fetcher.fetch(ref, sources, partial, job.keypair)
        self.store.commit(partial, ref.digest)
        if prefetch and not job.ended:
            # Here, before any waiter resumes: a run that waited for it sees it prefetched.
            job.unclaimed.add(ref.digest)
        return source.label

    def begin_demand(self) -> None:
        """A run is staging its inputs: prefetches that have not started wait."""
        self._demand += 1
        self._no_demand.clear()

    def end_demand(self) -> None:
        self._demand -= 1
        if self._demand == 0:
            self._no_demand.set()

    def _forget(self, digest: str, entry: _Fetch, done: asyncio.Task[str]) -> None:
        if self.inflight.get(digest) is entry:
            del self.inflight[digest]

    async def _join(self, entry: _Fetch) -> str:
        entry.waiters += 1
        try:
            return await asyncio.shield(entry.task)
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.task.done():
                entry.task.cancel()  # nobody wants these bytes any more


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not a fetch it waited for)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class TaskRun:
    """One attempt of one task on this peer; `stop()` ends it from outside.

    Layout: `workdir/sandbox/` is the task's directory (its cwd), and its stdout and stderr
    go to `workdir/` beside it, where no declared path can reach them. `workdir` (absolute and
    resolved: no symbolic link in it) is the marker its processes carry. An external run
    (`step` given) does not spawn its command: the `bgrid task-step` that claims it does
    (worker/task_steps.py).
    """

    def __init__(
        self,
        job: JobData,
        task: str,
        attempt: int,
        spec: RunSpec,
        workdir: Path,
        staging: Staging,
        spawner: Spawner,
        leftovers: Leftovers,
        step: ExternalStep | None = None,
    ) -> None:
        self.job, self.task, self.attempt = job.name, task, attempt
        self.jobdata = job
        self.spec = spec
        self.workdir = workdir
        self.sandbox = workdir / "sandbox"
        self.marker = str(workdir)  # resolved by the daemon: the prefix its successor looks for
        self.staging = staging
        self.store = staging.store
        self.spawner = spawner
        self.leftovers = leftovers
        self.step = step
        self.fetched: list[list[Any]] = []  # [digest, source label, bytes] per input moved
        self.hit_bytes = 0
        self._adopted: list[str] = []  # outputs in the store, each pinned by this run
        self._proc: TaskProcess | None = None
        self._escapees_killed = False  # its processes that left the group: killed already
        self._staging: asyncio.Future[None] | None = None
        self._stopped = False
        self._out_of_time = False  # stopped at its wall-clock limit
        self._suspended = False  # the owner is back: its process group is stopped (SIGSTOP)

    async def execute(self) -> dict[str, Any]:
        """Fetch, run, store; the fields of the `task_done` report. Never raises."""
        report: dict[str, Any] = {
            "job": self.job,
            "task": self.task,
            "attempt": self.attempt,
            "exit_code": -1,
            "outputs": [],
            "stderr_tail": "",
            "error": "",
            "fetch_s": 0.0,
            "run_s": 0.0,
            "bytes_fetched": 0,
            "fetched": self.fetched,
            "hit_bytes": 0,
        }
        started = time.monotonic()
        for item in self.spec.inputs:  # no input may be evicted while this task needs it
            self.store.pin(item.ref.digest)
        try:
            if self.spec.inputs:  # a task of its own, which stop() cancels
                self._staging = asyncio.ensure_future(self._stage_inputs())
                await self._staging
            else:  # nothing to wait for: not worth a task and its loop turns
                self._make_sandbox()
            report["fetch_s"] = time.monotonic() - started
            before = {i.ref.digest: self.store.fingerprint(i.ref.digest) for i in self.spec.inputs}
            started = time.monotonic()
            report["exit_code"] = await self._run_command()
            report["run_s"] = time.monotonic() - started
            self._evict_changed_inputs(before)
            report["stderr_tail"] = self._stderr_tail()
            report["error"] = self.spec.limits.explain(
                report["exit_code"], report["stderr_tail"], self._out_of_time
            )
            if not report["error"] and self._proc is not None and self._proc.lost:
                report["error"] = self._proc.lost
            if report["exit_code"] != 0 and not report["error"] and self._disk_full():
                # The command's own complaint may be lost: its stderr file is on that disk.
                report["error"] = self._disk_full_message("No space left on device")
            if report["exit_code"] == 0 and self.spec.outputs:
                # Hashing a big output takes seconds: off the loop, heartbeats keep flowing.
                report["outputs"] = await asyncio.to_thread(self._store_outputs)
        except CacheFullError as err:
            report["error"] = f"{err.strerror}; the task should run on another peer"
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                report["error"] = self._disk_full_message(err.strerror or "no space left")
            else:
                report["error"] = str(err)
        except (TransferError, OutputError) as err:
            report["error"] = str(err)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            report["error"] = "stopped while its inputs were fetched"
        except Exception as err:  # the promise: a report always goes back, whatever happened
            log.exception("task %s/%s failed in the worker", self.job, self.task)
            report["error"] = f"the worker could not run the task: {type(err).__name__}: {err}"
        finally:
            if self.step is not None:  # no claim is granted any more
                self.step.end(report["error"] or f"its command exited {report['exit_code']}")
            # Every attempt's stdout and stderr go back, bounded: the coordinator keeps them.
            for stream in ("stdout", "stderr"):
                report[stream], report[f"{stream}_size"] = read_tail(self.workdir / stream)
            # Off this path, in a batch: why it is safe, worker/leftovers.py.
            self.leftovers.leave(
                self.workdir, None if self._escapees_killed else self.marker, self.job
            )
            for item in self.spec.inputs:
                self.store.unpin(item.ref.digest)
            for digest in self._adopted:  # the job keeps its outputs: consumers fetch them here
                if report["outputs"]:
                    self.jobdata.keep(digest)
                self.store.unpin(digest)
            report["bytes_fetched"] = sum(size for _, _, size in self.fetched)
            report["hit_bytes"] = self.hit_bytes
        return report

    def _disk_full(self) -> bool:
        try:
            return shutil.disk_usage(self.workdir).free < _DISK_FULL_BYTES
        except OSError:
            return False

    def _disk_full_message(self, detail: str) -> str:
        return (
            f"this peer's disk is full ({self.workdir.parent}): {detail}; "
            "the task should run on another peer"
        )

    def _make_sandbox(self) -> None:
        self.workdir.chmod(0o700)  # whatever the daemon's umask (or the previous task) did
        try:
            self.sandbox.mkdir(mode=0o700)
        except FileExistsError:  # a recycled work directory (worker/leftovers.py): empty
            if not stat.S_ISDIR(os.lstat(self.sandbox).st_mode):
                raise
            self.sandbox.chmod(0o700)

    async def _stage_inputs(self) -> None:
        self._make_sandbox()
        slots = asyncio.Semaphore(_MAX_PARALLEL_FETCHES)
        job = self.jobdata

        async def stage(item: TaskInput) -> None:
            digest, size = item.ref.digest, item.ref.size
            how, label = await self.staging.obtain(
                item.ref, item.sources, job, slots, f"input {item.path!r}"
            )
            # The accounting of `task_done`: a file a prefetch brought for this job was
            # reported by its `prefetched`; its first use here counts as neither hit nor fetch.
            if how == FETCHED:
                self.fetched.append([digest, label, size])
            elif how == HIT and digest not in job.unclaimed:
                self.hit_bytes += size
            job.unclaimed.discard(digest)

        staged = [asyncio.ensure_future(stage(i)) for i in self.spec.inputs]
        self.staging.begin_demand()
        try:
            await asyncio.gather(*staged)
        finally:  # one input failed, or the run was stopped: the others need not come
            self.staging.end_demand()
            for task in staged:
                task.cancel()
        for item in self.spec.inputs:
            # A private copy (why: the module's docstring); big ones take a while: off the loop.
            await asyncio.to_thread(self.store.copy_into, item.ref.digest, self.sandbox / item.path)
            self.store.touch(item.ref.digest)

    def _evict_changed_inputs(self, before: dict[str, tuple[int, int]]) -> None:
        # Inputs are copies, but a task running with enough rights (root) may still reach into
        # the cache by its path: never serve bytes that changed meanwhile.
        for digest, seen in before.items():
            try:
                changed = self.store.fingerprint(digest) != seen
            except FileNotFoundError:
                continue
            if changed:
                log.warning(
                    "task %s/%s modified its input %s: dropped from the cache",
                    self.job,
                    self.task,
                    digest[:12],
                )
                self.store.evict(digest)

    async def _run_command(self) -> int:
        if self._stopped:
            raise OutputError("stopped before it started")
        env = self._command_env()
        if self.step is not None:
            return await self._run_claimed(env)
        return await self._spawn_command(env)

    def _command_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.sandbox),
            "TMPDIR": str(self.sandbox),
            "LANG": "C.UTF-8",
            "BGRID_JOB": self.job,
            "BGRID_TASK": self.task,
            "BGRID_ATTEMPT": str(self.attempt),
            "BGRID_WORKER": self.jobdata.worker,  # which peer ran it (a quorum's votes name it)
            **self.spec.env,
            reaper.MARKER: self.marker,  # last: the workflow's env cannot remove it
        }

    async def _run_claimed(self, env: dict[str, str]) -> int:
        """An external run's command, run by the step that claims it: its exit code."""
        assert self.step is not None
        for stream in ("stdout", "stderr"):  # the step writes them; the report reads them
            open(self.workdir / stream, "wb", opener=_private).close()
        self.step.offer(
            StepGranted(
                self.job,
                self.task,
                self.attempt,
                str(self.sandbox),
                self.spec.command,
                env,
                str(self.workdir / "stdout"),
                str(self.workdir / "stderr"),
                self.spec.limits.to_wire(),
            )
        )
        try:
            exited = await self.step.exited()
        except StepEnded as err:
            raise OutputError(str(err)) from None
        finally:
            # What its command left running must not outlive it (nor change the outputs):
            # the middleware's processes are not this daemon's descendants, hence by marker.
            await asyncio.to_thread(reaper.kill_marked_anywhere, self.marker)
            self._escapees_killed = True
        self._out_of_time = exited.out_of_time
        return exited.exit_code

    async def _spawn_command(self, env: dict[str, str]) -> int:
        with (
            open(self.workdir / "stdout", "wb", opener=_private) as out,
            open(self.workdir / "stderr", "wb", opener=_private) as err,
        ):
            try:
                # Its priority and umask from its first instruction: worker/spawn.py.
                self._proc = await self.spawner.start(
                    ["/bin/sh", "-c", self.spec.command],
                    cwd=self.sandbox,
                    env=env,
                    stdout=out,
                    stderr=err,
                    limits=self.spec.limits,
                )
            except OSError as failure:
                if self.spec.limits == Limits():
                    raise
                raise OutputError(
                    f"the command could not start under its limits "
                    f"({self.spec.limits.describe()}): {failure.strerror or failure}"
                ) from None
        if self._stopped:  # stop() came while it was spawned, and found no process to stop
            await self._end_processes(self._proc, grace=False)
        elif self._suspended:  # suspend() came while it was spawned: stop it now
            self._signal_group(signal.SIGSTOP)
        try:
            code = await asyncio.wait_for(self._proc.wait(), self.spec.limits.wall_s)
        except TimeoutError:
            self._out_of_time = True
            await self._end_processes(self._proc, grace=True)
            code = await self._proc.wait()
        # What the shell left running in the background must not outlive the task: it would
        # keep the owner's CPU busy after the job, and could change the sandbox while the
        # outputs are checked and moved into the store. Without outputs, those that left the
        # group can go with the next sweep (worker/leftovers.py).
        await self._end_processes(self._proc, grace=False, escapees=bool(self.spec.outputs))
        return code

    async def _end_processes(self, proc: TaskProcess, grace: bool, escapees: bool = True) -> None:
        """End the task's process group and, with `escapees`, every process carrying its
        marker (else the leftovers' sweep does)."""
        if grace and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                # A suspended (SIGSTOPped) group only acts on SIGTERM once continued.
                os.killpg(proc.pid, signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        # The shell may be gone while its children linger in the group: end them all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        # Those that left the group (setsid, double fork) still carry the marker.
        if escapees:
            await asyncio.to_thread(reaper.kill_marked, self.marker)
            self._escapees_killed = True
        reaper.reap_group(proc.pid)  # orphans of the task that ended by themselves

    def _stderr_tail(self) -> str:
        path = self.workdir / "stderr"
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - _STDERR_TAIL))
            return f.read().decode("utf-8", "replace")

    def _store_outputs(self) -> list[list[Any]]:
        stored = []
        root = self.sandbox.resolve()
        for rel in self.spec.outputs:
            path = self.sandbox / rel
            if not path.exists() and not path.is_symlink():
                raise OutputError(f"the command exited 0 but did not write its output {rel!r}")
            if path.is_symlink() or not path.is_file():
                raise OutputError(
                    f"output {rel!r} is not a regular file (symlink, directory or device): refused"
                )
            if root not in path.resolve().parents:
                raise OutputError(f"output {rel!r} lies outside the task directory: refused")
            self.store.admit(path.stat().st_size, f"output {rel!r}")
            ref = self.store.adopt(path, pin=True)  # pinned at once: the next output may evict
            self._adopted.append(ref.digest)
            stored.append([rel, ref.digest, ref.size])
        return stored

    def suspend(self) -> None:
        """Stop its process group (SIGSTOP): off the CPU at once, its memory kept, until
        `resume`. A run not spawned yet is stopped as soon as it is. An external run's
        command is the middleware's: it runs on (its wall-clock limit goes on too)."""
        self._suspended = True
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue its process group where it was (SIGCONT)."""
        self._suspended = False
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    async def stop(self, reason: str = "stopped") -> None:
        """Stop the command and all it started: SIGTERM, a grace period, then SIGKILL."""
        self._stopped = True
        if self._staging is not None:
            self._staging.cancel()  # inputs still on their way: they are not needed any more
        if self.step is not None:
            # Its step stops the command (its own grace period); what is left goes after ours.
            self.step.stop(reason)
            if self.step.claimed_by:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.step.connection_closed.wait(), STOP_GRACE_S)
                await asyncio.to_thread(reaper.kill_marked_anywhere, self.marker)
            return
        proc = self._proc
        if proc is None:
            return
        await self._end_processes(proc, grace=True)


def _private(path: str, flags: int) -> int:
    """An opener of files only the worker's user reads, whatever the daemon's umask, and of
    no file a link leads to (a log a previous task of a recycled directory replaced)."""
    fd = os.open(path, (flags | os.O_NOFOLLOW) & ~os.O_TRUNC, 0o600)
    try:
        if os.fstat(fd).st_nlink != 1:  # checked before truncating: the other name keeps it
            raise OSError(errno.EMLINK, f"{path} has another name: not a task's own log")
        os.fchmod(fd, 0o600)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_tail(path: Path, limit: int = MAX_LOG) -> tuple[bytes, int]:
    """The last `limit` bytes of a file and its size; (b"", 0) when there is none."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
            return f.read(limit), size
    except OSError:
        return b"", 0


class OutputError(Exception):
    """A task's outputs cannot be accepted; the message goes to the user's report."""
