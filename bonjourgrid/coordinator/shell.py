"""`bgrid submit`: the coordinator born in the submitting process.

One asyncio loop drives `SchedulerCore`: every message from a peer, every finished output
collection and every timer becomes an event on one queue; the loop hands it to the core
with the time and carries out the instructions that come back. Nothing else changes the
job's state, so the order of events is the whole story of a run. Finished tasks go to the
job's journal (`journal.py`, for `--resume`) on their way through; `bgrid cancel` arrives
on a job-control socket of its own (`cancel.py`).

What the Coordinator owns and holds:
- the scheduler core (`core.py`, pure; itself composed of a ready queue and a data planner);
- the `PeerPool` (`peers.py`): recruitment, the control links to the held peers, heartbeats,
  release. It puts PeerJoined/PeerLost/PeerRunning straight into the event queue and hands
  every other message to `_route`;
- the backend (`backends/`, `native` by default), which turns a core `Dispatch` (as a
  `TaskRun`) into work and a `StopRun` into a cancel. Task messages of bgrid workers reach it
  through a `WorkerChannel`; its typed task events come back through `_from_backend`, the
  one place they become core events;
- the data plane, for every backend that moves data through bgrid's caches: the data server
  (here) and the `DataMover` (`dataflow.py`: sources, prefetch orders, the collection of
  outputs into the submit directory);
- the pre and post scripts of the tasks (`scripts.py`), run here when the core says
  (`RunScript`), their end fed back as a `ScriptEnded` once what they left in the submit
  directory is hashed and served; and the stdout/stderr copies of a task that ended;
- the journal, the logs, the progress display, and the job's advertisement (claimed in
  the background once peers are recruited: its name probe never holds the first dispatch;
  a job over before it is claimed is never shown).
The path of a worker's task message: the pool's link reader decodes it, `_route` delivers
it into the `WorkerChannel`, the backend's `events` turns it into a task event
(`WorkerEvents`), `_pump_backend_events` turns that into a core event on the queue. One
queue hop more than a direct put, the price of the backend seam; a burst is drained in one
wake-up of the pump. Heartbeat acks and prefetch reports go straight onto the queue.

A middleware that holds the DAG's edges (`capabilities.dependencies == "middleware"`,
DAGMan) gets the whole DAG once deployed (`middleware_run.py`), and the core only follows
its news (`placement="middleware"`): no Dispatch, Prefetch or Collect. It moves its own
data; a finished run's outputs are hashed in the submit directory on their way to the core,
one event at a time, so that a child's start never overtakes its parents' ends.

Node rules (the workflow's priority, category, retry_unless_exit, abort_on, final, noop)
go to the core as `NodeRules` (`node_rules`); the shell's part is small: a noop task that
needs nothing is settled by a first Tick before any peer is recruited, the final task's run
gets BGRID_DAG_STATUS and BGRID_FAILED_COUNT (`final_env`) in its environment, and the
report carries `Finished.exit_code()`, which `bgrid submit` exits with.

The report (`report.py`) is built from a `ReportInputs` record made at the end. The remote
cache that stages the inputs is `stage.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.backends.base import (
    Backend,
    BackendContext,
    Commands,
    PeerGone,
    RunDetail,
    StagedInput,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
)
from bonjourgrid.backends.native import NativeBackend
from bonjourgrid.backends.worker_events import Unreadable, WorkerChannel
from bonjourgrid.cache.store import FileIndex, FileRef
from bonjourgrid.cache.transfer import DataServer, Fetcher
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.cancel import JOBCTL_DOMAIN, serve_job_control
from bonjourgrid.coordinator.copies import SpeculationSettings
from bonjourgrid.coordinator.dataflow import DataMover, remove_stale_partials
from bonjourgrid.coordinator.deployment import Deployment
from bonjourgrid.coordinator.journal import (
    DoneRecord,
    JournalWriter,
    ResumePlan,
    journal_path,
    task_digest,
)
from bonjourgrid.coordinator.logs import LogKeeper, job_stem
from bonjourgrid.coordinator.middleware_run import job_plan, with_outputs
from bonjourgrid.coordinator.peers import STALL_S, PeerPool, Timeouts, address_towards
from bonjourgrid.coordinator.prefetch import DataOptions
from bonjourgrid.coordinator.progress import REFRESH_S, Display, PeerNow, Snapshot, notes_of
from bonjourgrid.coordinator.recruit import JobNeeds
from bonjourgrid.coordinator.report import ReportInputs, build_report
from bonjourgrid.coordinator.scripts import ScriptRunner
from bonjourgrid.coordinator.services import PeerServices
from bonjourgrid.coordinator.stage import deferrable_sources, hash_deferred, stage_sources
from bonjourgrid.dag import Workflow
from bonjourgrid.discovery.advertise import Advertiser, open_zeroconf, resolve_interfaces
from bonjourgrid.discovery.browse import PeerBrowser
from bonjourgrid.discovery.txt import JOB_SERVICE, JobRecord, JobState, job_txt
from bonjourgrid.errors import ConfigError, StageError
from bonjourgrid.keys import GridKey, Keypair
from bonjourgrid.protocol import (
    Denied,
    Message,
    Preempted,
    Prefetched,
    Refused,
    ServiceExited,
    ServiceFailed,
    ServiceUp,
    Started,
    Suspension,
    TaskDone,
)
from bonjourgrid.requirements import Requirement

log = logging.getLogger(__name__)

PROGRESS_S = 0.5  # how often the job's advertised progress may change


class Coordinator:
    """Runs one workflow on peers it recruits, then hands every peer back."""

    def __init__(
        self,
        workflow: Workflow,
        needs: JobNeeds,
        grid: GridKey | None,
        interface: str | None = None,
        expected_peers: int | None = None,
        timeouts: Timeouts | None = None,
        resume: ResumePlan | None = None,
        workflow_digest: str = "",
        data: DataOptions | None = None,
        speculation: SpeculationSettings | None = None,
        quorum: int = 1,
        display: Display | None = None,
        backend: Callable[[BackendContext], Backend] = NativeBackend,
        backend_options: dict[str, str] | None = None,
    ) -> None:
        rules, caps = node_rules(workflow)
        placed_by = getattr(backend, "capabilities", NativeBackend.capabilities).dependencies
        if placed_by == "middleware" and (rules or caps):  # refused before anything opens
            name = next(iter(rules), "")
            raise ConfigError(
                f"backend {getattr(backend, 'name', backend)!r} places the runs itself, so bgrid "
                "cannot apply priority, category, retry_unless_exit, abort_on, final or noop"
                + (f" (task {name!r} sets some)" if name else " (the workflow sets categories)")
                + "; run the workflow on bgrid's own workers, or write those rules for the "
                "middleware"
            )
        self.workflow = workflow
        self.display = display  # what the user sees while it runs (progress.py)
        self.needs = needs
        self.grid = grid
        self.interface = interface
        self.expected_peers = expected_peers  # --local: stop browsing once these are seen
        self.timeouts = timeouts or Timeouts()
        self.resume = resume
        self.workflow_digest = workflow_digest
        self.data = data or DataOptions()
        self.journal: JournalWriter | None = None
        self.job = job_id(workflow.name)
        self.logs = LogKeeper(workflow.root, self.job)  # every attempt's stdout and stderr
        self.scripts = ScriptRunner(workflow, self.logs)  # pre and post scripts (scripts.py)
        self.ctx = zmq.asyncio.Context()
        self.keypair = Keypair.generate() if grid is not None else None
        self.client_keys = grid.keypair() if grid is not None else None
        # The job's own key: its peers fetch from each other and from us with it, and only
        # while they are reserved by this job (`reserve` hands it over, encrypted).
        self.job_keys = Keypair.generate() if grid is not None else None
        self.index = FileIndex()
        self.source_refs: dict[str, FileRef] = {}
        self.fetcher = Fetcher(self.ctx, self.client_keys)
        self.data_policy = wire.KeyPolicy({self.job_keys.public} if self.job_keys else set())
        # Every change of the job's state reaches the core through this queue (`_drive`).
        self.events: asyncio.Queue[core.Event] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pool = PeerPool(
            job=self.job,
            needs=needs,
            timeouts=self.timeouts,
            ctx=self.ctx,
            client_keys=self.client_keys,
            job_keys=self.job_keys,
            sink=self._from_pool,
            spawn=self._spawn,
            cancel=self.cancel,
            route=self._route,
            interface=interface,
            expected_peers=expected_peers,
            resume=resume,
        )
        # A middleware that holds the DAG's edges places the runs; the core follows it. Read
        # off the backend's class: the core is built before the backend.
        capabilities = getattr(backend, "capabilities", NativeBackend.capabilities)
        self.middleware_dag = capabilities.dependencies == "middleware"
        if self.middleware_dag and capabilities.data:
            raise ConfigError(
                f"backend {getattr(backend, 'name', backend)!r}: a middleware that holds the "
                "DAG's edges must move the tasks' files itself (capabilities.data=False)"
            )
        scripted = [n for n, t in workflow.tasks.items() if t.pre is not None or t.post is not None]
        if self.middleware_dag and scripted:
            raise ConfigError(
                f"backend {getattr(backend, 'name', backend)!r} places the runs itself: it "
                f"cannot run pre or post scripts (task {scripted[0]!r}); use the native backend"
            )
        quorums = {  # a task's own `quorum:` wins over --quorum
            name: quorum if spec.quorum is None else spec.quorum
            for name, spec in workflow.tasks.items()
            if (quorum if spec.quorum is None else spec.quorum) > 1
        }
        if self.middleware_dag and quorums:
            raise ConfigError(
                f"backend {getattr(backend, 'name', backend)!r} places the runs itself: it "
                f"cannot run a quorum (task {next(iter(quorums))!r}); use the native backend"
            )
        self.core = core.SchedulerCore(
            (
                (name, list(workflow.graph.predecessors(name)), spec.require or "", spec.retries)
                for name, spec in workflow.tasks.items()
            ),
            matches=lambda text, attrs: Requirement.parse(text).matches(attrs),
            done={name: r.outputs for name, r in resume.kept.items()} if resume else None,
            data=task_data(workflow, self.data.fetch_all),
            prefetch=self.data.prefetch,
            ack_timeout_s=self.timeouts.run_ack_s,
            placement="middleware" if self.middleware_dag else "core",
            rules=rules,
            category_caps=caps,
            speculation=None if self.middleware_dag else speculation,
            quorum=quorums,
        )
        self._has_noops = any(rule.noop for rule in rules.values())
        self.bytes = {"from_coordinator": 0, "peer_to_peer": 0, "cache_hits": 0, "to_submitter": 0}
        self.mover = DataMover(
            job=self.job,
            root=workflow.root,
            index=self.index,
            fetcher=self.fetcher,
            keypair=self.keypair,
            links=self.pool.links,
            at_coordinator=self.core.files.at_coordinator,
            bytes_moved=self.bytes,
            sink=self.events.put_nowait,
        )
        # The backend runs the tasks the core places; bgrid workers' task messages reach it
        # through the channel, its task events come back to the core in `_from_backend`.
        self.channel = WorkerChannel(self.pool.send, self.mover.sources)
        self.commands = Commands()
        # Our own workers: the native backend, and for a middleware backend the stagers of
        # its runs (launch "external": inputs in, outputs and logs out through bgrid).
        workers_context = BackendContext(
            job=self.job,
            root=workflow.root,
            state_dir=workflow.root / ".bgrid" / "backend",
            commands=self.commands,
            peers=self.channel,
        )
        self.workers = NativeBackend(workers_context)
        self.services = PeerServices(self.job, self._send_to_peer)
        self.backend: Backend = self.workers
        if backend is not NativeBackend:
            # A short private directory: a middleware's unix sockets must fit 108 bytes.
            self.backend_dir = Path(tempfile.mkdtemp(prefix=f"bgrid-{self.job[:16]}-"))
            self.backend_context = dataclasses.replace(
                workers_context,
                state_dir=self.backend_dir,
                services=self.services,
                staging=self.workers,
                # A middleware's word on a run comes after the workers had theirs: a
                # worker gone is a lost peer (no retry used), not a failed attempt.
                options={
                    "settle_s": f"{self.timeouts.peer_timeout_s + self.timeouts.heartbeat_s:g}",
                    **(backend_options or {}),
                },
            )
            self.backend = backend(self.backend_context)
        if (self.backend.capabilities.dependencies == "middleware") != self.middleware_dag:
            raise ConfigError(
                f"backend {self.backend.name!r} declares its capabilities on its instance "
                "only: declare them on its class (the coordinator reads them before building it)"
            )
        self.deployment = Deployment(
            self.backend,
            self.services,
            self.pool.used,
            self.events.put_nowait,
            self._spawn,
            self.pool.release,
        )
        self.started = 0.0
        self.started_at = 0.0
        # What the run is doing, for a user who stops it (submit.py's signal handling).
        self.phase = "starting"
        self._data_server: DataServer | None = None
        self._browser: PeerBrowser | None = None  # set once the run starts
        # Contents a resumed job hopes to find in peers' caches (intermediates of kept tasks).
        self._wanted_from_caches: dict[str, int] = {}
        self._jobctl_port = 0
        self._wake_at: float | None = None  # when the pending Tick fires (retry backoffs)
        self._wake: asyncio.TimerHandle | None = None

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Recruit, run, release; the report (DESIGN.md's format)."""
        self.started = time.monotonic()
        self.started_at = started_at = time.time()
        display = self.display
        shown = asyncio.create_task(self._show_progress(display)) if display else None
        finished: core.Finished | None = None
        try:
            finished = await self._run_to_the_end()
        finally:
            if display is not None and shown is not None:
                shown.cancel()
                await asyncio.gather(shown, return_exceptions=True)
                # The last word, every count final (`phase` stays: an interruption names it).
                display.update(self.snapshot(finished.status if finished else "stopped"))
        return build_report(self._report_inputs(finished, started_at))

    async def _run_to_the_end(self) -> core.Finished | None:
        remove_stale_partials(self.mover.partial_dir)
        if self.core.pending():  # a resume with nothing left to run moves nothing
            self.phase = "staging inputs"
            await self._stage_inputs()
        self.journal = self._start_journal()
        try:
            if self._has_noops and self.core.pending():
                await self._apply(core.Tick())  # noop tasks that need nothing are done now
            if self.core.pending():
                finished = await self._run_on_grid()
            else:  # every task was kept from the journal: no peer is needed
                await self._apply(core.Tick())
                finished = self.core.finished
                self.fetcher.close()
                self.ctx.destroy(linger=0)
        finally:
            self.journal.close()
            self.logs.close()
        return finished

    def _start_journal(self) -> JournalWriter:
        path = journal_path(self.workflow)
        try:
            return JournalWriter.start(
                path,
                job=self.job,
                workflow=self.workflow.name,
                digest=self.workflow_digest,
                started=self.started_at,
                lease_s=self.timeouts.lease_s,
                carried=self.resume.kept.values() if self.resume else (),
                local=self.expected_peers is not None,  # --local: the caches go with it
            )
        except OSError as err:
            raise ConfigError(
                f"cannot write the job journal {path}: {err}; the submit directory must be "
                "writable (outputs come back there too)"
            ) from None

    async def _run_on_grid(self) -> core.Finished | None:
        # First: when the mDNS port is not ours (avahi), fail before anything else is open.
        zc = open_zeroconf(resolve_interfaces(self.interface))
        policies = {"data": self.data_policy}
        if self.grid is not None:
            # Only holders of the grid's secret key may stop the job (`bgrid cancel`).
            policies[JOBCTL_DOMAIN] = wire.KeyPolicy({self.grid.public})
        auth = wire.start_authenticator(self.ctx, policies) if self.grid is not None else None
        bind = f"tcp://{self.interface or '0.0.0.0'}"
        data_sock = wire.server_socket(self.ctx, self.keypair, "data", 4096)
        self.mover.port = data_sock.bind_to_random_port(bind)
        data_server = self._data_server = DataServer(data_sock, self.index.locate)
        # The job-control socket proves the grid's own key: `bgrid cancel` pins it, so a
        # spoofed job record cannot pass for this coordinator (cancel.py).
        grid_keys = self.grid.keypair() if self.grid is not None else None
        jobctl = wire.server_socket(self.ctx, grid_keys, JOBCTL_DOMAIN, wire.MAX_CONTROL_FRAME)
        self._jobctl_port = jobctl.bind_to_random_port(bind)
        browser = self._browser = PeerBrowser(zc)
        advert: Advertiser | None = None
        advertising: asyncio.Task[None] | None = None
        finished: core.Finished | None = None
        try:
            self._spawn(data_server.serve_forever())
            self._spawn(self._pump_backend_events(self.workers))
            if self.backend is not self.workers and not self.middleware_dag:
                self._spawn(self._pump_backend_events(self.backend))
            await browser.start()
            self.phase = "recruiting peers"
            await self.pool.recruit(browser, self.needs.workers_max, initial=True)
            if self.backend is not self.workers:
                self.phase = f"deploying {self.backend.name} over the peers"
                if self.pool.used:
                    first = next(iter(self.pool.used.values()))
                    if first.addresses:
                        self.backend_context.address = address_towards(first.addresses[0])
            await self.deployment.deploy()
            if self.middleware_dag:
                await self._submit_plan()
            self.events.put_nowait(core.PeersSettled())
            advert = Advertiser(
                zc, JOB_SERVICE, self.job, self._jobctl_port, self._job_txt("running")
            )
            self._spawn(serve_job_control(jobctl, self.job, self.cancel))
            # The advertisement (for `bgrid status` and `bgrid cancel`) claims its name in the
            # background: its probe must not hold the first dispatch.
            advertising = self._spawn(self._advertise(advert))
            self._spawn(self.pool.heartbeats())
            self._spawn(self._replenish(browser))
            self._spawn(self._advertise_progress(advert))
            self.phase = "running tasks"
            finished = await self._drive()
        finally:
            await self.deployment.teardown()
            await self.pool.release_all()
            await self.commands.close()
            if self.backend is not self.workers:
                shutil.rmtree(self.backend_dir, ignore_errors=True)
            self.bytes["from_coordinator"] = data_server.bytes_served
            if advertising is not None and not advertising.done():
                # A job over before its name was claimed was never shown: nothing to withdraw.
                advertising.cancel()
                await asyncio.gather(advertising, return_exceptions=True)
            if advert is not None:
                with contextlib.suppress(Exception):
                    await advert.update(self._job_txt(_job_state(finished)))
                await advert.stop()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await browser.stop()
            await zc.async_close()
            if auth is not None:
                auth.stop()
            if self._wake is not None:
                self._wake.cancel()
            self.fetcher.close()
            jobctl.close(linger=500)  # let a `cancelling` answer leave
            data_sock.close(linger=0)
            self.ctx.destroy(linger=0)
        return finished

    async def _stage_inputs(self) -> None:
        """The remote cache: every source input hashed (or downloaded), served from here."""
        known = dict(self.resume.source_refs) if self.resume else {}
        # Big inputs never hashed before are hashed while the job runs: the tasks that read
        # none of them go first (a DAG-holding middleware takes the whole plan at once: no).
        deferred = [] if self.middleware_dag else deferrable_sources(self.workflow, known)
        staged = await stage_sources(self.workflow, known, deferred=deferred)
        self.source_refs = {path: item.ref for path, item in staged.items()}
        for item in staged.values():
            self.index.add(item.path, item.ref)
        self.core.add_sources(self.source_refs)
        if deferred:
            self.core.hold_sources(deferred)
            log.info("hashing %d big input(s) while the job runs", len(deferred))
            self._spawn(self._hash_deferred(deferred))
        # Outputs kept from an earlier run were just re-hashed: served from where they are
        # (a kept intermediate may be absent: only kept tasks read it).
        for record in self.resume.kept.values() if self.resume else ():
            for path, ref in record.outputs:
                if (self.workflow.root / path).is_file():
                    self.index.add(self.workflow.root / path, ref)
                    self.core.add_sources({path: ref})
                else:
                    self._wanted_from_caches[ref.digest] = ref.size
        self.pool.seek(
            {ref.digest: ref.size for ref in self.source_refs.values()}, self._wanted_from_caches
        )

    async def _hash_deferred(self, paths: list[str]) -> None:
        """Hash the held inputs, then let their readers run (core.SourcesHashed); a file that
        can no longer be read fails the job with staging's words."""
        try:
            refs = await hash_deferred(self.workflow, paths)
        except StageError as err:
            self.events.put_nowait(core.CancelRequested(str(err)))
            return
        for path, ref in refs.items():
            self.source_refs[path] = ref
            self.index.add(self.workflow.root / path, ref)  # served before anyone asks
        self.events.put_nowait(core.SourcesHashed(refs))

    async def _drive(self) -> core.Finished:
        while self.core.finished is None:
            event = await self.events.get()
            # Events that arrived together (peers joining at the start) are placed together.
            await self._apply(event, schedule=self.events.empty())
        return self.core.finished

    async def _pump_backend_events(self, backend: Backend, hash_outputs: bool = False) -> None:
        """A backend's task events, into the core's queue, in their order. `hash_outputs`:
        the backend brought a finished run's outputs to the submit directory."""
        put = self.events.put_nowait
        from_backend = self._from_backend
        root, specs = self.workflow.root, self.workflow.tasks
        async for event in backend.events():
            core_event = from_backend(event)
            if hash_outputs and isinstance(core_event, core.TaskReported):
                outputs = specs[core_event.task].outputs if core_event.task in specs else ()
                core_event = await with_outputs(core_event, root, outputs)
            if core_event is not None:
                put(core_event)

    async def _submit_plan(self) -> None:
        """The whole DAG to a middleware that holds its edges, then its news to the core."""
        kept = {n for n, t in self.core.tasks.items() if t.status is core.TaskStatus.DONE}

        def known(path: str) -> FileRef | None:
            producer = self.workflow.producer.get(path)
            if producer is None:
                return self.source_refs.get(path)
            return dict(self.core.tasks[producer].outputs).get(path)

        plan = job_plan(
            self.workflow,
            self.job,
            self.deployment.deployed(),
            kept,
            known,
            self.backend_context.address,
        )
        log.info("handing %d task(s) to %s with their edges", len(plan.runs), self.backend.name)
        await self.backend.submit_plan(plan)
        self._spawn(self._pump_backend_events(self.backend, hash_outputs=True))

    def _from_backend(self, event: TaskEvent) -> core.Event | None:
        """The one place where a backend's task event becomes a core event (None: handled
        here). What a run's report adds for the job's report (logs, bytes) is kept here."""
        match event:
            case TaskStarted(task=task, attempt=attempt, peer=peer) if self.middleware_dag:
                return core.RunPlaced(peer, task, attempt)
            case TaskStarted(task=task, attempt=attempt, peer=peer):
                return core.RunStarted(peer, task, attempt)
            case TaskFinished(task=task, attempt=attempt, peer=peer, detail=detail):
                self._keep_detail(peer, task, attempt, detail)
                self.bytes["cache_hits"] += detail.cache_hits
                return core.TaskReported(
                    peer,
                    task,
                    attempt,
                    0,
                    "",
                    event.outputs,
                    event.stderr_tail,
                    detail.fetch_s,
                    event.run_s,
                    detail.bytes_fetched,
                )
            case TaskFailed(task=task, attempt=attempt, peer=peer, exit_code=None):
                # It never ran (refused, unreadable, could not be sent) or was lost.
                log.warning("attempt %d of %s failed on %s: %s", attempt, task, peer, event.reason)
                return core.AttemptFailed(peer, task, attempt, event.reason)
            case TaskFailed(task=task, attempt=attempt, peer=peer, detail=detail):
                self._keep_detail(peer, task, attempt, detail)
                return core.TaskReported(
                    peer,
                    task,
                    attempt,
                    event.exit_code or 0,
                    event.reason,
                    (),
                    event.stderr_tail,
                    detail.fetch_s,
                    event.run_s,
                    detail.bytes_fetched,
                )
            case PeerGone(peer=peer, reason=reason):
                self.pool.lose(peer, reason)  # the core hears PeerLost from the pool
        return None

    def _keep_detail(self, peer: str, task: str, attempt: int, detail: RunDetail) -> None:
        """A run's logs into the submit directory (logs.py), and the bytes it moved."""
        self.bytes["peer_to_peer"] += detail.peer_to_peer
        if self.middleware_dag:
            ours = task in self.workflow.tasks
        else:
            ours = self._runs_on(peer, task, attempt)
        if not detail.logs or not ours:
            # Logs only for an attempt this peer runs (the middleware's word is trusted), so
            # the task name is one of the workflow's (a file name).
            return
        try:
            self.logs.keep(
                task, attempt, detail.stdout, detail.stdout_size, detail.stderr, detail.stderr_size
            )
        except OSError as err:  # a full disk loses the logs, not the job
            log.warning("cannot keep the logs of %s in %s: %s", task, self.logs.dir, err)

    def _route(self, peer: str, message: Message | Unreadable) -> bool:
        """Where a peer's message goes (the pool's reader): task messages to the backend's
        channel, prefetch reports to the core. False once the peer is gone with it."""
        match message:
            case Started() | Refused() | TaskDone():
                self.channel.deliver(peer, message)
            case ServiceUp() | ServiceFailed() | ServiceExited():
                self.services.deliver(peer, message)
            case Prefetched():
                self.events.put_nowait(self.mover.prefetched(peer, message))
            case Suspension(state=state, reason=reason):
                suspended = state == "suspended"
                self.events.put_nowait(core.PeerSuspended(peer, suspended, reason))
            case Unreadable(task=task, attempt=attempt, reason=why):
                if not self._runs_on(peer, task, attempt):
                    self.pool.lose(peer, why)  # about a run it does not have
                    return False
                self.channel.deliver(peer, message)
            case Preempted() | Denied():
                # Behind its task messages: a run it finished before leaving counts.
                self.channel.deliver(peer, message)
                return False
            case _:
                log.info("peer %s sent an unexpected %r message", peer, message.TYPE)
        return True

    async def _replenish(self, browser: PeerBrowser) -> None:
        """Elastic: recruit again while ready tasks wait; give up when none can ever run."""
        stalled_since: float | None = None
        while True:
            await asyncio.sleep(self.timeouts.heartbeat_s)
            if self.core.wanted_peers() and len(self.pool.links) < self.needs.workers_max:
                await self.pool.recruit(browser, self.core.wanted_peers())
            stuck = self.core.unplaceable()
            if stuck and not any(p.running for p in self.core.peers.values()):
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > STALL_S:
                    self.cancel(
                        f"no recruited peer can run {', '.join(stuck[:5])} (and no idle "
                        "peer of the grid fits): check the tasks' `require`"
                    )
            else:
                stalled_since = None

    async def _advertise(self, advert: Advertiser) -> None:
        """Claim the job's name on the LAN and announce it. A job that cannot be advertised
        could not be found by `bgrid status` nor stopped by `bgrid cancel`: it stops."""
        try:
            await advert.start()
        except ConfigError as err:
            self.cancel(f"cannot advertise the job: {err}")

    async def _advertise_progress(self, advert: Advertiser) -> None:
        """Keep the job's TXT record (what `bgrid status` shows) current, at most twice a second."""
        while True:
            await asyncio.sleep(PROGRESS_S)
            await advert.update(self._job_txt("running"))  # a no-op when nothing changed

    async def _apply(self, event: core.Event, schedule: bool = True) -> None:
        """Hand one event to the core and carry out its instructions.

        Every change of the job's state passes here, in order: the journal (for `--resume`)
        records a finished task before any instruction that follows from it goes out.
        """
        now = time.monotonic() - self.started
        instructions = self.core.handle(event, now, schedule)
        if self.display is not None:
            notes = notes_of(event, instructions, self.core.tasks)
            if notes:
                snapshot = self.snapshot()
                for note in notes:
                    self.display.note(note, snapshot)
        for instruction in instructions:
            match instruction:
                case core.Dispatch(task, peer, attempt):
                    await self._dispatch(task, peer, attempt)
                case core.Prefetch(peer, files, why):
                    await self.mover.prefetch(peer, files, why)
                case core.RunScript():
                    self._spawn(self._run_script(instruction))
                case core.StopRun(task, peer, attempt, reason):
                    log.debug("stopping %s on %s: %s", task, peer, reason)
                    await self.backend.cancel(task, attempt, reason)
                case core.Notice(message, detail):
                    log.log(logging.DEBUG if detail else logging.INFO, "%s", message)
                case core.Collect(task, peer, attempt, outputs):
                    self._spawn(self.mover.collect(task, peer, attempt, outputs))
                case core.Release(peer):
                    self._spawn(self.deployment.release(peer))
                case core.Recruit(count, reason):
                    if self._browser is not None and len(self.pool.links) < self.needs.workers_max:
                        log.info("recruiting %d more peer(s): %s", count, reason)
                        self._spawn(self.pool.recruit(self._browser, count))
                case core.TaskDone(task, peer, attempts, outputs):
                    self._journal_done(task, peer, attempts, outputs)
                    self._copy_streams(task)
                case core.TaskFailed(task, error, attempts):
                    if self.journal is not None:
                        self.journal.failed(task, error, attempts)
                    self._copy_streams(task)
                case core.Finished(status, reason):
                    if self.journal is not None:
                        self.journal.end(status, reason)
        self._arm_wakeup()

    async def _show_progress(self, display: Display) -> None:
        while True:
            display.update(self.snapshot())
            await asyncio.sleep(REFRESH_S)

    def snapshot(self, phase: str | None = None) -> Snapshot:
        """The job as the user sees it now (progress.py): counters and one entry per peer."""
        counts = self.core.counts
        served = self._data_server.bytes_served if self._data_server is not None else 0
        bytes_ = self.bytes
        return Snapshot(
            job=self.job,
            phase=phase or self.phase,
            elapsed_s=time.monotonic() - self.started,
            total=len(self.core.tasks),
            done=counts[core.TaskStatus.DONE],
            running=counts[core.TaskStatus.RUNNING] + counts[core.TaskStatus.COLLECTING],
            failed=counts[core.TaskStatus.FAILED],
            skipped=counts[core.TaskStatus.SKIPPED],
            kept=len(self.resume.kept) if self.resume else 0,
            peers=tuple(
                PeerNow(name, slots.cpus, tuple(sorted(slots.running | slots.collecting)))
                for name, slots in sorted(self.core.peers.items())
            ),
            bytes_moved=max(served, bytes_["from_coordinator"])
            + bytes_["peer_to_peer"]
            + bytes_["to_submitter"],
        )

    def _journal_done(
        self, task: str, peer: str | None, attempts: int, outputs: tuple[tuple[str, FileRef], ...]
    ) -> None:
        if self.journal is None:
            return
        spec = self.workflow.tasks[task]
        # An input its pre would have made is unknown when the pre skipped the task.
        inputs = tuple(
            (path, self._input_ref(path))
            for path in spec.inputs
            if path in self.source_refs or path in self.workflow.producer
        )
        self.journal.done(DoneRecord(task, task_digest(spec), inputs, outputs, peer, attempts))

    def _report_inputs(self, finished: core.Finished | None, started_at: float) -> ReportInputs:
        return ReportInputs(
            job=self.job,
            workflow=self.workflow,
            finished=finished,
            started_at=started_at,
            tasks=self.core.tasks,
            story=self.core.story,
            logs=self.logs,
            peers=tuple(self.pool.used.values()),
            bytes=dict(self.bytes),
            prefetch=self.data.prefetch.policy,
            journal=self.journal.path if self.journal is not None else None,
            resume=self.resume,
            copies=self.core.copies_made,
            quorum=self.core.quorum_votes,
            outvoted=self.core.outvoted,
            distrusted=tuple(self.core.distrusted),
        )

    async def _run_script(self, order: core.RunScript) -> None:
        """A pre or post script (scripts.py); what it leaves in the submit directory is
        served from there before the core hears of its end."""
        ended = await self.scripts.run(order, self.core.counts[core.TaskStatus.FAILED])
        root = self.workflow.root
        for path, ref in ended.sources.items():
            self.source_refs[path] = ref
            self.index.add(root / path, ref)
        for path, ref in ended.outputs:
            self.index.add(root / path, ref)
        self.events.put_nowait(ended)

    def _copy_streams(self, task: str) -> None:
        """A task that ended: its last attempt's stdout/stderr copied where it asks (`stdout:`,
        `stderr:`), an empty file when it wrote nothing (or never ran). With copies of it
        (speculation, quorum), the attempt whose outputs were kept: not the last started."""
        spec = self.workflow.tasks[task]
        if spec.stdout is None and spec.stderr is None:
            return
        attempts = self.logs.kept.get(task)
        kept_attempt = self.core.tasks[task].attempts
        if attempts and kept_attempt not in attempts:
            kept_attempt = max(attempts)
        last = attempts[kept_attempt] if attempts else None
        for target, kept in (
            (spec.stdout, last.stdout if last else None),
            (spec.stderr, last.stderr if last else None),
        ):
            if target is None:
                continue
            where = self.workflow.root / target
            try:  # at most MAX_LOG bytes (logs.py): quick enough to do in line
                where.parent.mkdir(parents=True, exist_ok=True)
                if kept is not None:
                    shutil.copyfile(kept, where)
                else:
                    where.write_bytes(b"")
            except OSError as err:  # a full disk loses the copy, not the job
                log.warning("cannot copy the output of %s to %s: %s", task, where, err)

    def _arm_wakeup(self) -> None:
        """Have a Tick reach the core when its next retry backoff ends."""
        wake = self.core.next_wakeup()
        if wake == self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at, self._wake = wake, None
        if wake is not None:
            delay = max(0.0, wake - (time.monotonic() - self.started))
            self._wake = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._wake_at, self._wake = None, None
        self.events.put_nowait(core.Tick())

    def cancel(self, reason: str) -> None:
        """Stop the job (Ctrl-C, `bgrid cancel`): peers are released, the report says why."""
        self.events.put_nowait(core.CancelRequested(reason))

    def _from_pool(self, event: core.Event) -> None:
        """What the pool reports goes through the deployment (peers join the core once the
        backend can run tasks on them)."""
        self.deployment.from_pool(event)

    async def _send_to_peer(self, peer: str, message: Message) -> None:
        """One message on a held peer's control link (service runs)."""
        if not await self.pool.send(peer, message):
            raise ConnectionError(f"the job holds no link to peer {peer}")

    def _runs_on(self, peer: str, task: str, attempt: int) -> bool:
        """Whether attempt `attempt` of `task` runs on `peer`, as far as the core knows."""
        state = self.core.tasks.get(task)
        return (
            state is not None
            and state.status is core.TaskStatus.RUNNING
            and state.peer == peer
            and state.attempts == attempt
        )

    def _input_ref(self, path: str) -> FileRef:
        producer = self.workflow.producer.get(path)
        if producer is None:
            return self.source_refs[path]
        return dict(self.core.tasks[producer].outputs)[path]

    async def _dispatch(self, task: str, peer: str, attempt: int) -> None:
        """Hand the run to the backend: its inputs with their contents and where to get them."""
        spec = self.workflow.tasks[task]
        sources = self.core.sources
        inputs = []
        for path in spec.inputs:
            ref = self._input_ref(path)
            inputs.append(StagedInput(path, ref, tuple(sources(ref.digest, peer))))
        env = spec.env
        if spec.final:  # what became of the others, as DAGMan's $DAG_STATUS, $FAILED_COUNT
            env = {**env, **final_env(self.core)}
        await self.backend.submit(
            TaskRun(
                task,
                attempt,
                peer,
                spec.command,
                tuple(inputs),
                spec.outputs,
                env,
                spec.limits,
                retries=spec.retries,
            )
        )

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """A background task died of an error: said, and the job stops rather than hang."""
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        log.error("coordinator task %s failed", task.get_coro(), exc_info=err)
        self.cancel(f"internal error in the coordinator: {type(err).__name__}: {err}")

    def _job_txt(self, state: JobState) -> dict[str, str]:
        counts = self.core.counts
        return job_txt(
            JobRecord(
                name=self.job,
                addresses=(),
                port=self._jobctl_port or 1,
                job=self.job,
                state=state,
                tasks=len(self.core.tasks),
                done=counts[core.TaskStatus.DONE],
                failed=counts[core.TaskStatus.FAILED],
                running=counts[core.TaskStatus.RUNNING],
                peers=len(self.pool.links),
                user=_user(),
                started=self.started_at,
                key=self.grid.public.decode() if self.grid else "",
            )
        )


def task_data(workflow: Workflow, fetch_all: bool) -> dict[str, core.TaskData]:
    """Each task's files for the core; a task whose outputs are final (no task reads one),
    kept (`keep: true`), or all of them (--fetch-all) has them collected."""
    finals = set(workflow.final_outputs())
    return {
        name: core.TaskData(
            spec.inputs,
            spec.outputs,
            # a post script reads them in the submit directory
            collect=fetch_all
            or spec.keep
            or spec.post is not None
            or any(o in finals for o in spec.outputs),
            pre=spec.pre is not None,
            post=spec.post is not None,
            pre_skip=spec.pre_skip,
        )
        for name, spec in workflow.tasks.items()
    }


def node_rules(workflow: Workflow) -> tuple[dict[str, core.NodeRules], dict[str, int]]:
    """The node semantics of the tasks that have some, and the category caps, for the core."""
    rules = {}
    for name, spec in workflow.tasks.items():
        rule = core.NodeRules(
            priority=spec.priority,
            category=spec.category or "",
            unless_exit=spec.retry_unless_exit,
            abort_exit=spec.abort_on.exit if spec.abort_on else None,
            abort_status=spec.abort_on.status if spec.abort_on else 1,
            final=spec.final,
            noop=spec.noop,
        )
        if rule != _NO_RULES:
            rules[name] = rule
    caps = {name: cap for name, cap in workflow.categories.items() if cap is not None}
    return rules, caps


_NO_RULES = core.NodeRules()


def final_env(scheduler: core.SchedulerCore) -> dict[str, str]:
    """The final task's view of the job: BGRID_DAG_STATUS 0 when every other task succeeded
    (1 when one failed or the job was aborted), BGRID_FAILED_COUNT the tasks that failed."""
    failed = scheduler.counts[core.TaskStatus.FAILED]
    status = 1 if failed or scheduler.abort is not None else 0
    return {"BGRID_DAG_STATUS": str(status), "BGRID_FAILED_COUNT": str(failed)}


def job_id(workflow_name: str) -> str:
    """A LAN-unique job name that fits a TXT value and a DNS label: `<workflow>-<6 hex>`."""
    return f"{job_stem(workflow_name)}-{secrets.token_hex(3)}"


def _job_state(finished: core.Finished | None) -> JobState:
    if finished is None or finished.reason.startswith("cancelled"):
        return "cancelled"
    return "succeeded" if finished.status == "succeeded" else "failed"


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"
