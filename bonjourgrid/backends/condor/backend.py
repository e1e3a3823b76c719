"""The condor backend: a personal HTCondor pool over the recruited peers, or an existing pool.

Deployment: `condor_master` on the coordinator's host runs collector, negotiator and schedd
(spawned through `Commands`); each peer runs `condor_master` with a startd-only config as a
worker service run. One POOL key per job (PASSWORD + IDTOKENS) is written 0600 on the
coordinator and sent to the peers as a service secret.

Executor: the plan becomes a DAGMan DAG (`template.py`), submitted with
`htcondor2.Submit.from_dag` to the pool's schedd; task events come from DAGMan's node event
log (`events.py`). DAGMan holds the edges and the retries; HTCondor places the tasks.

Data does not go through bgrid's caches: HTCondor's own file transfer sends each task's
inputs from the submit directory and brings its outputs back there, where the next task's
transfer finds them (`data=False`: no prefetch, no peer-to-peer).

With `options["pool"] = "HOST:PORT"` nothing is deployed: the DAG goes to the schedd that
pool's collector knows ("burst to an existing pool").

Options read: `pool`, `coordinator` (the address the peers reach, default 127.0.0.1),
`collector_port` (default: a free port of the coordinator's address).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import htcondor2

from bonjourgrid.backends.base import (
    BackendContext,
    Capabilities,
    CommandFailed,
    HeldPeer,
    JobPlan,
    ServiceSpec,
    TaskEvent,
    TaskRun,
    free_port,
    wait_for,
)
from bonjourgrid.backends.condor import template
from bonjourgrid.backends.condor.events import EventLogReader, EventLogTail
from bonjourgrid.errors import ConfigError

_POLL_S = 0.5  # how often the event logs are read for new events
_DEPLOY_TIMEOUT_S = 60.0  # the coordinator's daemons have this long to write their addresses
_POOL_KEY_BYTES = 32


class CondorBackend:
    """HTCondor through its Python bindings; see the module docstring."""

    name: ClassVar[str] = "condor"
    capabilities: ClassVar[Capabilities] = Capabilities(
        middleware="condor",
        placement="middleware",
        dependencies="middleware",
        services=True,
        data=False,
    )

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.pool = context.options.get("pool") or None
        self.coordinator = context.options.get("coordinator", "127.0.0.1")
        self._collector_port = int(context.options.get("collector_port", "0") or 0)
        # Token-safe ASCII: HTCondor reads a POOL password up to its first NUL byte.
        self._pool_key = secrets.token_urlsafe(_POOL_KEY_BYTES).encode()
        self._peers: dict[str, HeldPeer] = {}
        self._reader: EventLogReader | None = None
        self._dagman_cluster: int | None = None
        self._schedd: Any = None

    # -- paths -------------------------------------------------------------------------------

    @property
    def dag_dir(self) -> Path:
        return self.context.state_dir / "dag"

    @property
    def log_dir(self) -> Path:
        return self.context.state_dir / "logs"

    @property
    def local_dir(self) -> Path:
        return self.context.state_dir / "condor"

    @property
    def collector_port(self) -> int:
        if not self._collector_port:
            self._collector_port = free_port(self.coordinator)
        return self._collector_port

    @property
    def collector_address(self) -> str:
        return self.pool or f"{self.coordinator}:{self.collector_port}"

    # -- executor: pure ----------------------------------------------------------------------

    def translate(self, plan: JobPlan) -> dict[str, str]:
        return template.job_files(plan, self.log_dir, self.local_dir, self.collector_port)

    # -- deployment ----------------------------------------------------------------------------

    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        if self.pool is not None:
            return  # an existing pool: its own machines run the tasks
        for sub in ("log", "spool", "execute", "passwords.d", "tokens.d"):
            (self.local_dir / sub).mkdir(parents=True, exist_ok=True)
        key_file = self.local_dir / template.POOL_KEY
        key_file.touch(mode=0o600)
        key_file.write_bytes(template.scramble_pool_key(self._pool_key))
        config = self.local_dir / "coordinator.config"
        config.write_text(
            template.coordinator_config(
                self.context.job, self.coordinator, self.collector_port, self.local_dir
            )
        )
        await self.context.commands.spawn(
            ["condor_master", "-f"],
            env={"CONDOR_CONFIG": str(config)},
            log=self.local_dir / "log" / "master.out",
        )
        await _wait_for_files(
            [
                self.local_dir / "log" / ".collector_address",
                self.local_dir / "log" / ".schedd_address",
            ],
            _DEPLOY_TIMEOUT_S,
        )
        for peer in peers:
            await self.add_peer(peer)

    def startd_service(self, peer: HeldPeer) -> ServiceSpec:
        """The startd a peer runs, as a worker service run."""
        return ServiceSpec(
            name=template.STARTD_SERVICE,
            argv=("env", f"CONDOR_CONFIG={{dir}}/{template.STARTD_CONFIG}", "condor_master", "-f"),
            files={
                template.STARTD_CONFIG: template.startd_config(
                    self.context.job, self.coordinator, self.collector_port, peer
                )
            },
            secrets={template.POOL_KEY: template.scramble_pool_key(self._pool_key)},
            ports=("startd",),
            ready_file=template.STARTD_READY,
        )

    async def add_peer(self, peer: HeldPeer) -> None:
        if self.pool is not None:
            return
        if self.context.services is None:
            raise ConfigError("the condor backend needs service runs on the peers to start startds")
        await self.context.services.start_service(peer.name, self.startd_service(peer))
        self._peers[peer.name] = peer

    async def remove_peer(self, peer: str, reason: str) -> None:
        # HTCondor itself requeues the jobs a lost startd ran (they go back to idle): no
        # event is owed here, the next execute event says where they run again.
        if self._peers.pop(peer, None) is not None and self.context.services is not None:
            await self.context.services.stop_service(peer, template.STARTD_SERVICE)

    async def teardown(self) -> None:
        if self._dagman_cluster is not None and self._schedd is not None:
            await asyncio.to_thread(self._remove, f"ClusterId == {self._dagman_cluster}")
        for name in list(self._peers):
            await self.remove_peer(name, "teardown")
        await self.context.commands.close()

    # -- executor --------------------------------------------------------------------------------

    async def submit(self, run: TaskRun) -> None:
        raise ConfigError(
            "the condor backend takes the whole DAG (submit_plan): DAGMan holds its edges"
        )

    async def submit_plan(self, plan: JobPlan) -> None:
        self.write_plan(plan)
        self._dagman_cluster = await asyncio.to_thread(self._submit_dag, plan.job)

    def write_plan(self, plan: JobPlan) -> Path:
        """Write the DAG and its submit files into the state directory and get ready to read
        its events; returns the DAG file."""
        self.dag_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.translate(plan).items():
            if name.startswith("condor/"):
                continue  # the pool's configs: deploy writes and sends those
            (self.dag_dir / name).write_text(text)
        self._reader = EventLogReader(
            {run.task: run.attempt for run in plan.runs},
            {peer.address: peer.name for peer in plan.peers},
        )
        return self.dag_dir / template.DAG_FILE

    def _submit_dag(self, job: str) -> int:
        """Blocking: find the schedd through the collector, submit DAGMan to it."""
        dag = self.dag_dir / template.DAG_FILE
        try:
            description = htcondor2.Submit.from_dag(str(dag), {"force": True, "batch-name": job})
        except htcondor2.HTCondorException as err:
            raise CommandFailed(
                f"DAGMan could not take {dag}: {err}; is HTCondor installed here "
                "(condor_dagman on PATH)?"
            ) from None
        # DAGMan's own files (its logs, the rescue DAG) are named relative to this.
        description["initialdir"] = str(self.dag_dir)
        self._schedd = _locate_schedd(self.collector_address)
        return int(self._schedd.submit(description).cluster())

    async def events(self) -> AsyncIterator[TaskEvent]:
        """Task events from DAGMan's node log, until DAGMan itself has left the queue."""
        if self._reader is None:
            raise ConfigError("events() before submit_plan(): nothing was submitted")
        reader = self._reader
        nodes = EventLogTail(self.dag_dir / template.NODES_LOG)
        dagman = EventLogTail(self.dag_dir / template.DAGMAN_LOG)
        try:
            while True:
                dagman_done = any(
                    e.type
                    in (htcondor2.JobEventType.JOB_TERMINATED, htcondor2.JobEventType.JOB_ABORTED)
                    for e in await asyncio.to_thread(dagman.read_new)
                )
                for event in await asyncio.to_thread(nodes.read_new):
                    for task_event in reader.feed(event):
                        yield task_event
                    if event.type == htcondor2.JobEventType.JOB_HELD:
                        # A held job waits forever; it failed: remove it, DAGMan retries.
                        constraint = f"ClusterId == {event.cluster}"
                        await asyncio.to_thread(self._remove, constraint)
                if dagman_done:
                    return
                await asyncio.sleep(_POLL_S)
        finally:
            nodes.close()
            dagman.close()

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        if self._reader is not None:
            self._reader.cancelled(task, attempt)
        if self._schedd is None or self._dagman_cluster is None:
            return
        constraint = (
            f"DAGManJobId == {self._dagman_cluster} && BgridTask == {_classad_string(task)}"
        )
        await asyncio.to_thread(self._remove, constraint)

    def _remove(self, constraint: str) -> None:
        self._schedd.act(htcondor2.JobAction.Remove, constraint)


def _classad_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _locate_schedd(collector: str) -> Any:
    try:
        ad = htcondor2.Collector(collector).locate(htcondor2.DaemonType.Schedd)
    except htcondor2.HTCondorException as err:
        raise CommandFailed(
            f"no schedd found through the collector at {collector}: {err}; "
            "is the pool up and does it let this host submit?"
        ) from None
    return htcondor2.Schedd(ad)


async def _wait_for_files(paths: Sequence[Path], timeout_s: float) -> None:
    def missing() -> str:
        return ", ".join(str(p) for p in paths if not p.exists())

    await wait_for(
        lambda: not missing(),
        timeout_s,
        lambda: (
            f"condor_master did not start the pool within {timeout_s:g} s ({missing()} "
            "missing); see its log next to them"
        ),
        _POLL_S,
    )
