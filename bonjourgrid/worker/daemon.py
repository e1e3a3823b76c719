"""`bgrid worker`: the asyncio shell around `WorkerCore`.

One process, one event loop. It owns the zmq sockets (control and data), the mDNS
advertisement, the local content store and the running tasks, and it is the only place
where the clock is read: `WorkerCore.handle` gets `now` from here.

Keys: the control socket admits the grid's coordinators; the data socket admits them and,
while a job holds the peer, that job's public key, which its other peers prove when they
fetch the intermediate files this peer made. This peer's own fetches for the job prove the
job's keypair too. `probe` is answered here, from the cache's index, in any state.

Service runs (a backend's middleware daemons) are `services` (worker/service_run.py
`ServiceRuns`); the core says when to start and stop them. External runs (a `run` with
launch "external", whose command a middleware's job runs through `bgrid task-step`) and the
sockets their claims come in on are `steps` (worker/task_steps.py `TaskSteps`). The
middleware this peer advertises in `mw` is worker/middleware.py's.

The owner first: `_watch_owner` samples the owner's activity every `_RUNNING_SAMPLE_S`
while tasks run (every `_IDLE_SAMPLE_S` otherwise, when only the advertised state follows
the owner: half the cost of an idle daemon's watch). The core answers the owner's return
with SuspendTasks (worker/core.py: suspend, then vacate), which this daemon carries out in
the same pass of the loop: every run's process group gets SIGSTOP, so the CPU is the
owner's again within one sample period and a signal. Runs started while suspended are
stopped as soon as their process exists (`suspended`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zeroconf import InterfaceChoice

from bonjourgrid import wire
from bonjourgrid.cache.local import SANDBOXES, CacheFullError, LocalCache
from bonjourgrid.cache.transfer import DataServer, Fetcher
from bonjourgrid.credentials import WorkerIdentity
from bonjourgrid.discovery.advertise import (
    Advertiser,
    advertised_addresses,
    open_zeroconf,
    resolve_interfaces,
)
from bonjourgrid.discovery.txt import PEER_SERVICE, PeerRecord, peer_txt
from bonjourgrid.discovery.txt import PeerState as AdvertisedState
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.fdlimit import raise_open_file_limit
from bonjourgrid.keys import INSECURE_FINGERPRINT, GridKey, Keypair
from bonjourgrid.protocol import (
    Cancel,
    Error,
    Heartbeat,
    Holding,
    Message,
    Prefetch,
    Prefetched,
    PrefetchFile,
    Probe,
    Release,
    Reserve,
    Run,
    RunPart,
    ServiceFailed,
    ServiceStart,
    ServiceStop,
    TaskDone,
    attempt_of,
    from_fields,
    service_of,
)
from bonjourgrid.units import MIB
from bonjourgrid.worker import core, reaper
from bonjourgrid.worker.core import PeerState, WorkerCore
from bonjourgrid.worker.idle import IdleSettings, OwnerMonitor
from bonjourgrid.worker.leftovers import Leftovers
from bonjourgrid.worker.middleware import detect_middleware
from bonjourgrid.worker.sandbox import FETCHED, JobData, RunSpec, Staging, TaskRun, run_spec
from bonjourgrid.worker.service_run import ServiceRuns
from bonjourgrid.worker.spawn import Spawner
from bonjourgrid.worker.task_steps import TaskSteps

log = logging.getLogger(__name__)

_TICK_S = 0.2  # how often leases are checked: a dead coordinator's peer is idle within this
# How often owner activity is sampled while tasks run: a returning owner has the CPU back
# (every task process group stopped) within this and a signal, under the 0.25 s the desktop
# policy promises; with sandbox.STOP_GRACE_S, one vacated has its memory back within a second.
_RUNNING_SAMPLE_S = 0.1
# ... and while none runs: then only the advertised state follows the owner.
_IDLE_SAMPLE_S = 0.2
# What the TXT record says of each state: a suspended peer is its owner's (`busy`), still
# held by its job through the lease.
_ADVERTISED: dict[PeerState, AdvertisedState] = {
    PeerState.IDLE: "idle",
    PeerState.BUSY: "busy",
    PeerState.RESERVED: "reserved",
    PeerState.SUSPENDED: "busy",
}
_STOP_RUNS_S = 2.0  # how long a stopping daemon waits for its stopped runs to finish


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    cpus: int
    ram_mib: int
    cost: float
    cache_dir: Path
    grid: GridKey | None  # None: --insecure
    interface: str | None = None  # an IPv4 address to serve on; None: every interface
    always_idle: bool = True  # False: the idle policy below decides when the owner is away
    idle: IdleSettings = field(default_factory=IdleSettings)
    cache_size: int | None = None  # bytes the local cache may hold; None: the disk is the bound
    # The keypair this peer proves and the grid's credential for it (credentials.py); None
    # with a grid: a fresh keypair no coordinator admits (tests that talk to it directly).
    identity: WorkerIdentity | None = None
    # What `mw` advertises (worker/middleware.py); None: detected from the programs installed.
    middleware: tuple[str, ...] | None = None
    # How long the owner may stay before suspended runs are vacated (worker/core.py); 0:
    # vacate at once, as the peer did before it could suspend.
    vacate_after_s: float = core.VACATE_AFTER_S


class WorkerDaemon:
    """A peer: advertises itself, grants reservations, runs tasks, serves its cache."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.ctx = zmq.asyncio.Context()
        self.keypair: Keypair | None = None
        if config.grid is not None:
            self.keypair = config.identity.keypair if config.identity else Keypair.generate()
        # Orphaned task processes come back to this process, which kills them with their task.
        reaper.become_subreaper()
        # Owns the directory (an flock) from here until run() ends: one daemon per cache.
        # Tasks a killed daemon left running in it are killed before their sandboxes go.
        self.store = LocalCache(
            config.cache_dir, config.cache_size, stop_leftovers=reaper.kill_marked_under
        )
        self.fetcher = Fetcher(self.ctx, self.keypair)
        self.staging = Staging(self.store, self.fetcher)
        self.spawner = Spawner()  # tasks' commands, at the lowest priority
        self.leftovers = Leftovers()  # finished tasks' escapees and sandboxes
        self.sandboxes = (self.store.root / SANDBOXES).resolve()  # where tasks run
        self.job: JobData | None = None  # the job that holds the reservation
        # Who may read this peer's cache: the grid's coordinators, and the job holding it.
        self.data_policy = wire.KeyPolicy({config.grid.public} if config.grid else set())
        self.data_server: DataServer | None = None
        self.runs: dict[tuple[str, str, int], tuple[TaskRun, asyncio.Task[None]]] = {}
        self.suspended = False  # the owner is back: runs are stopped (SIGSTOP) until resumed
        self.steps = TaskSteps()
        self.services = ServiceRuns(
            self.store.root / SANDBOXES,
            lambda: config.interface or _own_address(),
            self._apply,
            self.steps,
        )
        self.middleware = config.middleware or detect_middleware()
        self.core: WorkerCore | None = None
        self.advertiser: Advertiser | None = None
        self._control: zmq.asyncio.Socket | None = None
        self._control_port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then leave the LAN cleanly."""
        grid = self.config.grid
        # First: when the mDNS port is not ours (avahi), fail before anything else is open.
        zc = open_zeroconf(resolve_interfaces(self.config.interface))
        auth = None
        if grid is not None:
            # Only holders of the grid's secret key get past the CURVE handshake.
            control_policy = wire.KeyPolicy({grid.public})
            auth = wire.start_authenticator(
                self.ctx, {"control": control_policy, "data": self.data_policy}
            )
        bind_ip = self.config.interface or "0.0.0.0"
        control = wire.server_socket(self.ctx, self.keypair, "control", wire.MAX_CONTROL_FRAME)
        control_port = control.bind_to_random_port(f"tcp://{bind_ip}")
        data = wire.server_socket(self.ctx, self.keypair, "data", 4096)
        data_port = data.bind_to_random_port(f"tcp://{bind_ip}")
        self._control = control
        self._control_port = control_port
        self.core = WorkerCore(
            cpus=self.config.cpus, data_port=data_port, vacate_after_s=self.config.vacate_after_s
        )
        self.spawner.open()  # the task launcher starts with the daemon, not with its first task
        monitor = None if self.config.always_idle else await self._first_owner_sample()
        self.advertiser = Advertiser(
            zc,
            PEER_SERVICE,
            self.config.name,
            control_port,
            self._txt(self.core.state, None),
            addresses=[self.config.interface] if self.config.interface else None,
        )
        self.data_server = DataServer(
            data, self.store.locate, self.data_policy if grid is not None else None
        )
        background = [
            asyncio.create_task(
                wire.serve(control, "control", self._handle_control, refuse=self._unreadable)
            ),
            asyncio.create_task(self.data_server.serve_forever()),
            asyncio.create_task(self._tick()),
        ]
        if monitor is not None:
            background.append(asyncio.create_task(self._watch_owner(monitor)))
        try:
            await self.advertiser.start()
            log.info(
                "peer %s serving on port %d (grid %s)",
                self.config.name,
                control_port,
                grid.fingerprint if grid else INSECURE_FINGERPRINT,
            )
            self.ready.set()
            await stop.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await asyncio.gather(*(run.stop("the worker stops") for run, _ in self.runs.values()))
            # Their reports, then their sandboxes: what the next start would otherwise remove.
            stopping = [task for _, task in self.runs.values()]
            if stopping:
                await asyncio.wait(stopping, timeout=_STOP_RUNS_S)
            await self.leftovers.close()
            self.spawner.close()
            await self.services.close()
            await self.steps.close_all()
            if self.job is not None:
                prefetches = list(self.job.prefetches)
                self.job.end()
                await asyncio.gather(*prefetches, return_exceptions=True)
            await self.advertiser.stop()
            await zc.async_close()
            if auth is not None:
                auth.stop()
            self.fetcher.close()
            control.close(linger=0)
            data.close(linger=0)
            self.ctx.destroy(linger=0)
            self.store.close()

    def _txt(self, state: PeerState, job: str | None) -> dict[str, str]:
        grid = self.config.grid
        record = PeerRecord(
            name=self.config.name,
            addresses=(),
            port=self._control_port,
            state=_ADVERTISED[state],
            job=job,
            cpus=self.config.cpus,
            ram=self.config.ram_mib,
            disk=self.store.free_bytes() // MIB,
            cost=self.config.cost,
            arch=platform.machine() or "unknown",
            os=platform.system().lower() or "unknown",
            mw=self.middleware,
            key=self.keypair.public.decode() if self.keypair else "",
            grid=grid.fingerprint if grid else INSECURE_FINGERPRINT,
            cred=self.config.identity.credential if grid and self.config.identity else "",
        )
        return peer_txt(record)

    async def _handle_control(self, client: bytes, msg: Message) -> bytes | None:
        if isinstance(msg, Probe):  # a question about the cache, in any state: no event
            return wire.encode(Holding(tuple(self.store.holding(list(msg.digests)))))
        event = self._event(client, msg)  # a ProtocolError here is answered by wire.serve
        try:
            await self._apply(event)  # replies go out as the core's Send instructions
        except Exception:  # one bad message must never stop the peer serving
            log.exception("control: could not handle %s", type(event).__name__)
        return None

    async def _unreadable(self, client: bytes, frame: bytes, err: ProtocolError) -> bytes | None:
        """A frame that failed `decode`: a run it names is refused and a service it names
        failed (so its coordinator does not wait for them), anything else gets an `error`."""
        service = service_of(frame)
        if service is not None:
            return wire.encode(ServiceFailed(service[1], service[2], str(err)[:1000]))
        about = attempt_of(frame)
        if about is None or about[0] not in (Run.TYPE, RunPart.TYPE):
            return wire.encode(Error(str(err)[:1000]))
        _, job, task, attempt = about
        await self._apply(core.RunUnreadable(client, job, task, attempt, str(err)[:1000]))
        return None

    def _event(self, client: bytes, msg: Message) -> core.Event:
        match msg:
            case Reserve():
                keys = job_keys(msg)  # checked even under --insecure, where they are not used
                return core.ReserveRequested(client, msg.job, msg.lease_s, msg.coordinator, keys)
            case Heartbeat():
                return core.HeartbeatReceived(client, msg.job, msg.lease_s)
            case Release():
                return core.ReleaseRequested(client, msg.job)
            case Run():
                # The whole run is checked when its last part is in (StartTask: run_spec).
                return core.RunRequested(client, msg.job, msg.task, msg.attempt, msg, msg.parts)
            case RunPart():
                return core.RunPartReceived(client, msg.job, msg.task, msg.attempt, msg.part, msg)
            case Cancel():
                return core.CancelRequested(client, msg.job, msg.task)
            case Prefetch():
                return core.PrefetchRequested(client, msg.job, msg.files)
            case ServiceStart():
                return core.ServiceStartRequested(client, msg.job, msg.name, msg)
            case ServiceStop():
                return core.ServiceStopRequested(client, msg.job, msg.name)
        raise ProtocolError(f"a worker does not take {msg.TYPE!r} messages")

    async def _apply(self, event: core.Event) -> None:
        assert self.core is not None and self._control is not None
        for instruction in self.core.handle(event, time.monotonic()):
            match instruction:
                case core.Send(client, message):
                    await self._control.send_multipart([client, _encode_reply(message)])
                case core.Advertise(state, job):
                    assert self.advertiser is not None
                    await self.advertiser.update(self._txt(state, job))
                case core.StartTask(job, task, attempt, run, parts):
                    try:
                        self._start(job, task, attempt, run_spec(run, parts))
                    except (ProtocolError, OSError) as err:
                        log.warning("refused %s/%s: %s", job, task, err)
                        await self._apply(core.StartFailed(job, task, attempt, str(err)[:1000]))
                    else:
                        await self._apply(core.TaskStarted(job, task, attempt))
                case core.JobStarted(job, keys):
                    self._job_started(job, keys)
                case core.JobEnded(job, reason):
                    self.suspended = False  # the next job's runs start running
                    self._job_ended(job, reason)
                case core.StartPrefetch(job, files):
                    self._prefetch(job, files)
                case core.StopTask(job, task, attempt, reason):
                    entry = self.runs.pop((job, task, attempt), None)
                    if entry is not None:
                        # Stopping the command lets execute() finish and clean its sandbox;
                        # its report is dropped because the run is no longer registered.
                        log.info("stopping %s/%s: %s", job, task, reason)
                        self._keep(asyncio.create_task(entry[0].stop(reason)))
                case core.SuspendTasks(job):
                    self.suspended = True
                    for run, _ in self.runs.values():
                        run.suspend()
                    log.info("suspended %d run(s) of %s: the owner is back", len(self.runs), job)
                case core.ResumeTasks(job):
                    self.suspended = False
                    for run, _ in self.runs.values():
                        run.resume()
                    log.info("resumed %d run(s) of %s: the owner is away", len(self.runs), job)
                case core.StartService(job, _, spec):
                    self.services.start(job, spec)
                case core.StopService(job, name, reason):
                    self.services.stop(job, name, reason)

    def _job_started(self, job: str, keys: Keypair | None) -> None:
        grid = self.config.grid
        if grid is None:
            keys = None  # --insecure: no keys anywhere
        elif keys is not None and keys.public != grid.public:
            self.data_policy.allowed.add(keys.public)
        # Without a job keypair (a coordinator that sent none), fetch as this peer.
        self.job = JobData(job, keys or self.keypair, self.store, worker=self.config.name)
        self.leftovers.start_job(job)

    def _job_ended(self, job: str, reason: str) -> None:
        ended = self.job
        if ended is None or ended.name != job:
            return
        self.job = None
        grid = self.config.grid
        keys = ended.keypair
        if grid is not None and keys is not None and keys.public != grid.public:
            self.data_policy.allowed.discard(keys.public)  # its connections are refused too
            if keys is not self.keypair:
                self.fetcher.forget(keys)
        log.info(
            "job %s left (%s): %d pinned files released, %d prefetches cancelled",
            job,
            reason,
            len(ended.pins),
            len(ended.prefetches),
        )
        ended.end()
        # Its tasks' escapees and sandboxes go now: no later job's task runs in them.
        self.leftovers.end_job()
        self._keep(asyncio.create_task(self.leftovers.sweep()))

    def _prefetch(self, job: str, files: tuple[PrefetchFile, ...]) -> None:
        data = self.job
        if data is None or data.name != job:  # cannot happen: the core checked the holder
            return
        for file in files:
            data.keep(file.ref.digest)  # pinned before its bytes come: nothing evicts them
            task = self._keep(asyncio.create_task(self._prefetch_one(data, file)))
            data.prefetches.add(task)
            task.add_done_callback(data.prefetches.discard)

    async def _prefetch_one(self, job: JobData, file: PrefetchFile) -> None:
        ref = file.ref
        started = time.monotonic()
        source, moved, error = "", 0, ""
        try:
            how, label = await self.staging.obtain(
                ref,
                file.sources,
                job,
                self.staging.prefetch_slots,
                f"prefetched file {ref.digest[:12]}",
                prefetch=True,
            )
            if how == FETCHED:
                source, moved = label, ref.size
        except CacheFullError as err:
            error = err.strerror or str(err)
        except (TransferError, OSError) as err:
            error = str(err)
        except Exception as err:  # a report always goes back, whatever happened
            log.exception("prefetch of %s failed in the worker", ref.digest[:12])
            error = f"the worker could not prefetch it: {type(err).__name__}: {err}"
        if error and not self.store.holds(ref.digest):  # a pin on nothing helps nobody
            job.let_go(ref.digest)
        report = Prefetched(
            job.name, ref.digest, source, moved, time.monotonic() - started, error[:10_000]
        )
        await self._apply(core.PrefetchFinished(job.name, report))

    def _start(self, job: str, task: str, attempt: int, spec: RunSpec) -> None:
        assert self.job is not None and self.job.name == job  # the core checked the holder
        # Names from the wire never become paths: a fresh directory per attempt.
        # One of this job's swept, clean work directories (worker/leftovers.py), else a new one
        # named by 128 random bits: unique and unguessable without mkdtemp's retry loop.
        workdir = self.leftovers.take()
        if workdir is None:
            self.sandboxes.mkdir(exist_ok=True)
            workdir = self.sandboxes / f"task-{secrets.token_hex(16)}"
            workdir.mkdir(mode=0o700)
        # An external run's command comes with the `bgrid task-step` that claims it.
        step = self.steps.expect(job, task, attempt) if spec.launch == "external" else None
        run = TaskRun(
            self.job, task, attempt, spec, workdir, self.staging, self.spawner, self.leftovers, step
        )
        if self.suspended:  # taken while the owner is here: its process starts stopped
            run.suspend()

        async def execute() -> None:
            report = task_done(await run.execute())
            if self.runs.pop((job, task, attempt), None) is not None:
                await self._apply(core.TaskFinished(job, task, attempt, report))
                if step is not None:  # reported: its step may exit (0: outputs stored)
                    step.settle(report)

        self.runs[(job, task, attempt)] = (run, self._keep(asyncio.create_task(execute())))

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Hold a reference to a fire-and-forget task until it ends (asyncio keeps weak ones)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            await self._apply(core.Tick())

    async def _first_owner_sample(self) -> OwnerMonitor:
        """The owner monitor, after one sample: a peer whose owner is at the desk starts busy."""
        assert self.core is not None
        monitor = OwnerMonitor(self.config.idle, grid_root=os.getpid())
        log.info("owner policy: %s", monitor.describe())
        await asyncio.sleep(_IDLE_SAMPLE_S)  # the first load figure needs an interval
        if await monitor.owner_active(time.monotonic()):
            log.info("owner active at start: %s", monitor.policy.why)
            # Before the first advertisement: its only instruction, Advertise, is moot.
            self.core.handle(core.OwnerActivity(True), time.monotonic())
        return monitor

    async def _watch_owner(self, monitor: OwnerMonitor) -> None:
        assert self.core is not None
        failing = False
        while True:
            await asyncio.sleep(_RUNNING_SAMPLE_S if self.runs else _IDLE_SAMPLE_S)
            try:
                # Service runs are the grid's too (a slurmd and the jobs it starts): their
                # CPU is not the owner's load.
                grid_busy = bool(self.runs or self.services)
                active = await monitor.owner_active(time.monotonic(), grid_busy)
                if active != self.core.owner_active:
                    log.info("owner %s: %s", "back" if active else "away", monitor.policy.why)
                    await self._apply(core.OwnerActivity(active))
                failing = False
            except Exception:  # a failed probe must not leave the owner unwatched for good
                if not failing:  # once per failing spell, not five times a second
                    log.exception("owner activity: the sample failed")
                failing = True


def task_done(report: dict[str, Any]) -> TaskDone:
    """The `task_done` for a run's report (TaskRun.execute), checked as the coordinator will."""
    try:
        return from_fields(TaskDone, report)
    except ProtocolError as err:  # a report always goes back: a failed one, then
        log.exception("task report of %s is malformed", report.get("task"))
        fields = {**report, "outputs": [], "fetched": [], "stderr_tail": ""}
        fields.update(stdout=b"", stderr=b"", stdout_size=0, stderr_size=0)
        fields.update(exit_code=-1, error=f"the worker made a malformed report: {err}")
        return from_fields(TaskDone, fields)


def _encode_reply(message: Message) -> bytes:
    try:
        return wire.encode(message)
    except ProtocolError as err:
        if not isinstance(message, TaskDone):
            raise
        # Too big for a frame (a run that fetched more files than a frame can list):
        # the bytes moved still add up, the per-file list goes.
        log.warning(
            "task_done of %s: %s; sent without its list of fetched files", message.task, err
        )
        return _encode_shrinking_logs(dataclasses.replace(message, fetched=()))


def _encode_shrinking_logs(message: TaskDone) -> bytes:
    """`message`, its logs cut to their last bytes until it fits a frame (many outputs)."""
    keep = len(message.stdout) + len(message.stderr)
    while True:
        try:
            return wire.encode(message)
        except ProtocolError:
            if keep == 0:
                raise
            keep //= 4
            message = dataclasses.replace(
                message,
                stdout=_last(message.stdout, keep // 2),
                stderr=_last(message.stderr, keep // 2),
            )


def _last(data: bytes, count: int) -> bytes:
    return data[max(0, len(data) - count) :]


def job_keys(msg: Reserve) -> Keypair | None:
    """The job keypair of a decoded `reserve` (None when both halves are ""); ProtocolError.
    Each half is a CURVE key or "" (checked at decode); here, that they belong together."""
    public, secret = msg.job_public, msg.job_secret
    if public == secret == "":
        return None
    if not (public and secret):
        raise ProtocolError("job_public and job_secret must both be given, or both empty")
    try:
        matches = zmq.curve_public(secret.encode()) == public.encode()
    except zmq.ZMQError:
        matches = False
    if not matches:
        raise ProtocolError("job_secret is not the secret half of job_public")
    return Keypair(public.encode(), secret.encode())


def _own_address() -> str:
    """The address a service's `{host}` names on a peer serving every interface: the first it
    advertises (a routable one before a link-local one)."""
    return advertised_addresses(InterfaceChoice.All)[0]


def default_cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bonjourgrid" / f"worker-{name}"


async def serve(config: WorkerConfig) -> None:
    """Run a worker daemon until SIGTERM or SIGINT."""
    raise_open_file_limit()  # a LAN's idle connections must not starve tasks of descriptors
    stop = asyncio.Event()
    parent = os.environ.get(reaper.PARENT_PID_ENV, "")
    if parent.isdigit() and not reaper.stop_with_parent(int(parent)):
        log.warning("the process that started this worker is gone: stopping")
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await WorkerDaemon(config).run(stop)
