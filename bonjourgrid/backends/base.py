"""The backend interface: the same recruitment, another middleware to run the DAG.

BonjourGrid's idea: the coordinator recruits idle peers over mDNS, then deploys a middleware
instance over them (Slurm, HTCondor, BOINC, XtremWeb) or runs tasks on its own workers
(`native`). Whatever the backend, the coordinator keeps the same brain: the pure scheduler
core decides what is ready, retries, journals and reports. The backend only turns
"run this task (on this peer)" into work, and says what became of it.

Shaped on what Parsl (executor vs provider) and dask-jobqueue (a job script per worker, one
place that runs the scheduler's commands) learned, a backend has two sides:

- a *deployment* side: `deploy` over the held peers, `add_peer`/`remove_peer` while the job
  runs, `teardown` at the end. Daemons a middleware needs on a peer are started there as
  *service runs* of the worker (`ServiceControl`), under the job's lease, and stop like tasks.
- an *executor* side: `translate` (pure: the middleware's own files, golden-file tested),
  `submit` one run, an async stream of typed `events`, and `cancel`.

Every external command a backend runs (`sbatch`, `squeue`, `condor_submit`, ...) goes through
`Commands.run`, the one place tests observe. Backends declare what they can do and which
middleware they need on a peer (`Capabilities`); recruitment only takes peers advertising
it in their TXT `mw`. Third-party backends register under the entry point group
`bonjourgrid.backends` (a class taking a `BackendContext`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ConfigError

if TYPE_CHECKING:
    from bonjourgrid.backends.worker_events import WorkerChannel

ENTRY_POINT_GROUP = "bonjourgrid.backends"


# -- what a backend declares --------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, and what it needs from a peer.

    middleware: the `mw` item a peer must advertise to be recruited ("slurm", "condor");
        "native" for our own workers.
    placement: "core" when the scheduler core picks each task's peer (the backend is told
        `TaskRun.peer`), "middleware" when the middleware does (peer is None).
    dependencies: "core" when the backend is handed ready tasks only, "middleware" when the
        middleware itself holds the DAG's edges (DAGMan).
    services: the backend starts daemons on the peers (worker service runs).
    resize: peers may join and leave while the job runs.
    data: inputs and outputs move through bgrid's caches (prefetch, peer to peer).
    """

    middleware: str
    placement: Literal["core", "middleware"] = "core"
    dependencies: Literal["core", "middleware"] = "core"
    services: bool = False
    resize: bool = True
    cancel: bool = True
    data: bool = True


# -- what a backend is handed ---------------------------------------------------------------


@dataclass(frozen=True)
class HeldPeer:
    """A recruited peer, as a backend sees it."""

    name: str
    address: str  # where the middleware reaches it (IP)
    cpus: int
    ram: int  # bytes
    middleware: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StagedInput:
    """One input of a run: where the task reads it, what it is, who can serve it."""

    path: str
    ref: FileRef
    sources: tuple[str, ...] = ()  # data endpoints holding it, best first


# The `ref` of an input that another run of the same plan makes: its content is not known
# yet when the whole DAG is handed over (`submit_plan`).
NOT_MADE_YET = FileRef("", 0)


@dataclass(frozen=True)
class TaskRun:
    """Run attempt `attempt` of `task`. `peer` is the core's choice (None when the
    middleware places tasks); `parents` are the tasks it waits for (for middlewares that
    hold the DAG's edges)."""

    task: str
    attempt: int
    peer: str | None
    command: str
    inputs: tuple[StagedInput, ...] = ()
    outputs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    cpus: int = 1
    ram: int = 0  # bytes the task asks for; 0: no request
    parents: tuple[str, ...] = ()
    retries: int = 0


@dataclass(frozen=True)
class JobPlan:
    """Everything `translate` needs: pure data, so the middleware's files are golden-tested."""

    job: str
    root: Path  # the submit directory
    peers: tuple[HeldPeer, ...]
    runs: tuple[TaskRun, ...]
    coordinator: str = "127.0.0.1"  # the coordinator's address as the peers reach it


# -- what a backend says back ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskStarted:
    task: str
    attempt: int
    peer: str


@dataclass(frozen=True)
class RunDetail:
    """What a run's executor said about it besides its end, for the job's report: bgrid
    workers send all of it; a middleware that knows less leaves the defaults."""

    fetch_s: float = 0.0  # seconds spent getting its inputs onto the peer
    bytes_fetched: int = 0  # input bytes the run moved itself (not prefetched)
    peer_to_peer: int = 0  # of those, bytes that came from other peers
    cache_hits: int = 0  # input bytes found in the peer's cache
    logs: bool = False  # the tails of its stdout and stderr below were sent
    stdout: bytes = b""
    stdout_size: int = 0  # bytes written in all (more than the tail: its head was dropped)
    stderr: bytes = b""
    stderr_size: int = 0


@dataclass(frozen=True)
class TaskFinished:
    """The run exited 0 and its outputs are stored (on `peer`'s cache, or `where` it says)."""

    task: str
    attempt: int
    peer: str
    outputs: tuple[tuple[str, FileRef], ...] = ()
    run_s: float = 0.0
    stderr_tail: str = ""
    detail: RunDetail = RunDetail()


@dataclass(frozen=True)
class TaskFailed:
    """The run failed: non-zero exit (exit_code), or never ran/was lost (exit_code None)."""

    task: str
    attempt: int
    peer: str
    reason: str
    exit_code: int | None = None
    stderr_tail: str = ""
    run_s: float = 0.0
    detail: RunDetail = RunDetail()


@dataclass(frozen=True)
class PeerGone:
    """The middleware lost a peer (node down, daemon died): its runs are lost with it."""

    peer: str
    reason: str


TaskEvent = TaskStarted | TaskFinished | TaskFailed | PeerGone


# -- the collaborators a backend is handed --------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """A long-lived daemon to run on a peer under the job's lease.

    argv and the config files may name `{dir}` (the service's private directory on the
    peer), `{port:NAME}` (a free TCP port the worker picks) and `{host}` (the peer's
    address); the worker substitutes them and reports the ports back. `secrets` are files
    written 0600 (a munge key, a pool password): they travel only on the job's CURVE channel.
    """

    name: str
    argv: tuple[str, ...]
    files: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    ports: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ready_file: str = ""  # the service is up once this file (relative to {dir}) exists
    # Its jobs run the job's external runs (RunStaging): the worker writes `{dir}/task-step`,
    # the command that claims one and runs it (worker/task_steps.py).
    task_steps: bool = False


@dataclass(frozen=True)
class ServiceStarted:
    peer: str
    name: str
    ports: Mapping[str, int]
    directory: str  # {dir} on the peer


class RunStaging(Protocol):
    """Runs staged on bgrid's own workers for a middleware's job to run (launch "external").

    `stage` sends the run to the worker on `run.peer`, which fetches its inputs into a sandbox
    (prefetch and peer-to-peer data as for any run) and waits for the middleware's job to
    claim it with `{dir}/task-step` of a `task_steps` service; the worker then stores its
    outputs and reports its end, outputs and logs included, as for a run it started itself.
    `drop` takes back a run no job will claim (cancelled, failed in the middleware); it does
    nothing once the worker has reported the run's end."""

    async def stage(self, run: TaskRun) -> None: ...

    async def drop(self, task: str, attempt: int, reason: str) -> None: ...


class ServiceControl(Protocol):
    """Start and stop service runs on held peers (the worker side of a deployment)."""

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted: ...

    async def stop_service(self, peer: str, name: str) -> None: ...


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(ConfigError):
    """An external command a backend ran exited non-zero (or was not found)."""


class Commands:
    """Every external command a backend runs goes through here: one place to log, time out,
    and observe (`history`, `observer`) in tests. Daemons on the coordinator's host are
    `spawn`ed and stopped with their whole process group at `close`."""

    def __init__(self, observer: Callable[[tuple[str, ...]], None] | None = None) -> None:
        self.history: list[tuple[str, ...]] = []
        self.observer = observer
        self._daemons: list[asyncio.subprocess.Process] = []

    def _note(self, argv: tuple[str, ...]) -> None:
        self.history.append(argv)
        if self.observer is not None:
            self.observer(argv)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> Completed:
        args = tuple(str(a) for a in argv)
        self._note(args)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **env} if env else None,
                cwd=cwd,
            )
        except FileNotFoundError as err:
            raise CommandFailed(f"{args[0]}: not found ({err}); is it installed?") from None
        try:
            out, errs = await asyncio.wait_for(proc.communicate(input), timeout)
        except (TimeoutError, asyncio.CancelledError) as err:
            # No answer in time, or the caller gave up: the command must not run on.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            if isinstance(err, asyncio.CancelledError):
                raise
            raise CommandFailed(f"{' '.join(args)}: no answer within {timeout:g} s") from None
        done = Completed(
            args, proc.returncode or 0, out.decode(errors="replace"), errs.decode(errors="replace")
        )
        if check and done.returncode != 0:
            raise CommandFailed(
                f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}"
            )
        return done

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> asyncio.subprocess.Process:
        """Start a daemon on this host in its own process group; `close` stops it, and it
        stops by itself if the coordinator dies."""
        args = tuple(str(a) for a in argv)
        self._note(args)
        out = open(log, "ab") if log is not None else asyncio.subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError as err:
            raise CommandFailed(f"{args[0]}: not found ({err}); is it installed?") from None
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self._daemons.append(proc)
        return proc

    async def close(self, grace_s: float = 3.0) -> None:
        """Stop every spawned daemon's process group: SIGTERM, then SIGKILL after grace."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self._daemons if p.returncode is None]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            if alive:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(p.wait() for p in alive)), grace_s)
        self._daemons.clear()


def free_port(address: str = "") -> int:
    """A TCP port free on `address` now, for a daemon a backend starts on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_for(
    until: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    failure: Callable[[], str],
    poll_s: float = 0.1,
) -> None:
    """Poll `until` (plain or async) until it holds; CommandFailed saying `failure()` if it
    does not within `timeout_s` (a daemon that did not come up, jobs that did not end)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        held = until()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() >= deadline:
            raise CommandFailed(failure())
        await asyncio.sleep(poll_s)


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the coordinator dies, even
    by `kill -9`, so no middleware daemon outlives its job (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


@dataclass
class BackendContext:
    """What a backend is handed at construction: it owns none of these."""

    job: str
    root: Path  # the submit directory
    state_dir: Path  # where the backend may write its files (configs, DAGs, logs)
    commands: Commands
    services: ServiceControl | None = None
    staging: RunStaging | None = None  # for backends that run bgrid-staged runs
    options: Mapping[str, str] = field(default_factory=dict)  # e.g. {"pool": "host:9618"}
    # The job's control links to its held bgrid workers (`worker_events.WorkerChannel`), for
    # backends whose runs report through bgrid workers (native).
    peers: WorkerChannel | None = None
    # The coordinator's address as the held peers reach it; set before `deploy`.
    address: str = "127.0.0.1"


# -- the interface ----------------------------------------------------------------------------


class Backend(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    # deployment side
    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        """Make the held peers ready to run tasks (start the middleware's daemons)."""

    async def add_peer(self, peer: HeldPeer) -> None:
        """A peer was recruited while the job runs."""

    async def remove_peer(self, peer: str, reason: str) -> None:
        """A peer left (released, lost, owner back): drain it; its runs come back as
        TaskFailed or PeerGone events."""

    async def teardown(self) -> None:
        """Stop everything deploy started; every peer goes back to idle."""

    # executor side
    def translate(self, plan: JobPlan) -> dict[str, str]:
        """The middleware's own files for `plan` (name -> text). Pure."""

    async def submit(self, run: TaskRun) -> None:
        """Hand one run to the middleware; what becomes of it comes out of `events`.
        Called per ready task when `capabilities.dependencies == "core"`."""

    async def submit_plan(self, plan: JobPlan) -> None:
        """Hand the whole DAG at once (`capabilities.dependencies == "middleware"`, e.g.
        DAGMan): every run of `plan`, with its parents; events follow per run."""

    def events(self) -> AsyncIterator[TaskEvent]:
        """Started/finished/failed runs and lost peers, as the middleware reports them."""

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        """Stop that run if it is still going (no event is owed for it afterwards)."""


def available_backends() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`; ConfigError listing the known ones."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            backend: type[Backend] = ep.load()
            return backend
    raise ConfigError(
        f"no backend named {name!r}; installed: {', '.join(available_backends()) or 'none'}"
    )
