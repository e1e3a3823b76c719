"""The slurm backend: a transient Slurm cluster over the recruited peers, one job per run.

Deployment: a per-job munge key; `munged` + `slurmctld` on the coordinator's host
(`Commands.spawn`), `munged` + `slurmd` on each peer as two service runs of its worker (the
key travels as a secret on the job's CURVE channel). Peers recruited later join as Slurm
dynamic nodes. Execution: each ready run is an `sbatch` job pinned to the core's peer, with
afterok on its parents' Slurm ids; `squeue`/`scontrol`/`sinfo` are polled for what became
of them (no `sacct`: it needs slurmdbd). Every command goes through `context.commands`.

Data: before its `sbatch`, each run is staged on its peer's worker (`context.staging`,
launch "external"): the inputs come through bgrid's caches (prefetch, peer to peer), and the
batch job's step, `{slurmd's dir}/task-step`, claims the sandbox and runs the command. The
worker then stores the outputs and reports the run (outputs, exit code, logs): with staging,
that report is the run's story, and Slurm's readings add only the endings the worker cannot
see (a job cancelled or never started: dependency never satisfied, node failure), after
which the staged run is dropped. Without staging (a stand-in step, tests), Slurm's readings
are the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bonjourgrid.backends.base import (
    BackendContext,
    Capabilities,
    CommandFailed,
    Completed,
    HeldPeer,
    JobPlan,
    PeerGone,
    ServiceControl,
    ServiceSpec,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
    free_port,
    wait_for,
)
from bonjourgrid.backends.slurm import template
from bonjourgrid.errors import ConfigError

UP_S = 60.0  # deploy fails if the daemons are not up by then
POLL_S = 1.0  # squeue/sinfo polling period while the job runs
SETTLE_S = 8.0  # see `settle_s`: longer than a worker's default peer timeout (5 s)
_MUNGE_KEY_BYTES = 1024
_MUNGED = "slurm-munged"  # service run names on the peers
_SLURMD = "slurmd"


@dataclass
class _Submitted:
    task: str
    attempt: int
    peer: str
    started: bool = False
    done: bool = False


class SlurmBackend:
    """bgrid's core places and orders the runs; Slurm runs and accounts them."""

    name: ClassVar[str] = "slurm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        middleware="slurm", placement="core", dependencies="core", services=True, data=True
    )

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.directory = context.state_dir / "slurm"
        options = context.options
        self.layout = template.ClusterLayout(
            job=context.job,
            controller_host=options.get("controller_host", socket.gethostname()),
            controller_address=options.get("address", "127.0.0.1"),
            controller_port=int(options.get("controller_port", 0)) or free_port(),
            # One SlurmdPort for the whole job: dynamic nodes cannot have their own Port=.
            slurmd_port=int(options.get("slurmd_port", 0)) or free_port(),
            user=getpass.getuser(),
            state_dir=str(self.directory),
            munge_socket=str(self.directory / "munge" / "munge.socket"),
        )
        self.conf = self.directory / "slurm.conf"
        self.poll_s = float(options.get("poll_s", POLL_S))
        self.up_s = float(options.get("up_s", UP_S))
        # With staging, how long a failure Slurm saw waits before it is told: the workers
        # have their say first (a dead worker is a lost peer, not a failed attempt).
        self.settle_s = float(options.get("settle_s", SETTLE_S))
        self._settling: list[tuple[float, TaskEvent]] = []
        self._env = {"SLURM_CONF": str(self.conf)}
        self._key = b""
        self._peers: dict[str, HeldPeer] = {}
        self._node_dirs: dict[str, str] = {}  # the slurmd service's {dir} on each peer
        self._runs: dict[str, _Submitted] = {}  # by Slurm job id
        self._ids: dict[tuple[str, int], str] = {}  # (task, attempt) -> Slurm job id
        self._last_id: dict[str, str] = {}  # task -> Slurm id of its latest attempt
        self._lost: set[str] = set()  # peers already reported gone
        self._pending: list[TaskEvent] = []  # events owed outside the poll (remove_peer)
        self._closed = False

    # -- deployment ----------------------------------------------------------------------

    @property
    def _services(self) -> ServiceControl:
        if self.context.services is None:
            raise ConfigError("the slurm backend starts slurmd on the peers: it needs workers")
        return self.context.services

    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        if not peers:
            raise ConfigError("the slurm backend needs at least one held peer")
        if "address" not in self.context.options:  # known only once peers are held
            self.layout = dataclasses.replace(self.layout, controller_address=self.context.address)
        (self.directory / "munge").mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / "ctld-state").mkdir(mode=0o700, exist_ok=True)
        (self.directory / "scripts").mkdir(exist_ok=True)
        self._key = secrets.token_bytes(_MUNGE_KEY_BYTES)
        key = self.directory / "munge" / "munge.key"
        key.touch(mode=0o600)
        key.write_bytes(self._key)
        key.chmod(0o400)
        commands = self.context.commands
        await commands.spawn(
            template.munged_argv(str(self.directory / "munge"), str(key)),
            log=self.directory / "munged.out",
        )
        await self._wait(lambda: Path(self.layout.munge_socket).exists(), "munged's socket")
        self.conf.write_text(template.controller_conf(self.layout, peers))
        await commands.spawn(template.slurmctld_argv(str(self.conf)),
                             log=self.directory / "slurmctld.out")  # fmt: skip
        await asyncio.gather(*(self._start_node(p, dynamic=False) for p in peers))
        await self._wait_nodes_ready([p.name for p in peers])

    async def _start_node(self, peer: HeldPeer, *, dynamic: bool) -> None:
        munged = await self._services.start_service(peer.name, ServiceSpec(
            name=_MUNGED,
            argv=template.munged_argv("{dir}", "{dir}/munge.key"),
            secrets={"munge.key": self._key},
            ready_file="munge.socket",
        ))  # fmt: skip
        conf = template.node_conf(
            self.layout, None if dynamic else peer, f"{munged.directory}/munge.socket"
        )
        slurmd = await self._services.start_service(peer.name, ServiceSpec(
            name=_SLURMD,
            argv=template.slurmd_argv("{dir}/slurm.conf", peer, dynamic=dynamic),
            files={"slurm.conf": conf},
            ready_file="slurmd.pid",
            task_steps=True,  # its jobs claim the runs staged there: {dir}/task-step
        ))  # fmt: skip
        self._peers[peer.name] = peer
        self._node_dirs[peer.name] = slurmd.directory

    async def add_peer(self, peer: HeldPeer) -> None:
        """A dynamic node (`slurmd -Z`): no reconfigure or restart of slurmctld."""
        await self._start_node(peer, dynamic=True)
        await self._wait_nodes_ready([peer.name])

    async def remove_peer(self, peer: str, reason: str) -> None:
        """Drain its node, cancel its runs (bgrid's core retries them elsewhere: a Slurm
        requeue would wait for the same `--nodelist` forever), stop its daemons."""
        node = template.node_name(peer)
        await self._scontrol("update", f"nodename={node}", "state=drain", f"reason={reason}",
                             check=False)  # fmt: skip
        cancelled = []
        for job_id, run in self._runs.items():
            if run.peer == peer and not run.done:
                run.done = True
                cancelled.append(job_id)
                if self.context.staging is None:
                    # With staging the core already knows: a released peer runs nothing
                    # the core waits for (squeue may not have seen those runs end yet),
                    # and a lost one's runs went back to the ready queue.
                    self._pending.append(
                        TaskFailed(run.task, run.attempt, peer, f"peer left: {reason}")
                    )
        await self._cancel_and_wait(cancelled)
        for job_id in cancelled:
            with contextlib.suppress(Exception):  # the peer may be gone, its runs with it
                await self._drop(self._runs[job_id], f"peer left: {reason}")
        self._peers.pop(peer, None)
        self._node_dirs.pop(peer, None)
        for name in (_SLURMD, _MUNGED):
            with contextlib.suppress(Exception):  # the peer may be gone already
                await self._services.stop_service(peer, name)
        await self._scontrol("delete", f"nodename={node}", check=False)  # dynamic nodes only

    async def teardown(self) -> None:
        self._closed = True
        live = [i for i, r in self._runs.items() if not r.done]
        if live and self.conf.exists():
            await self._cancel_and_wait(live)
        for peer in list(self._peers):
            for name in (_SLURMD, _MUNGED):
                with contextlib.suppress(Exception):
                    await self._services.stop_service(peer, name)
        self._peers.clear()
        await self.context.commands.close()

    # -- execution -----------------------------------------------------------------------

    def translate(self, plan: JobPlan) -> dict[str, str]:
        """slurm.conf and one batch script per run (parents' ids as `<task>` placeholders:
        real ids exist only once the parents are submitted)."""
        files = {"slurm.conf": template.controller_conf(self.layout, plan.peers)}
        for run in plan.runs:
            node_dir = f"{{dir:{run.peer}}}"
            step = template.task_step_argv(node_dir, plan.job, run)
            name = template.slurm_job_name(plan.job, run.task, run.attempt)
            files[f"{name}.sh"] = template.batch_script(
                plan.job, run, node_dir=node_dir, step=step,
                parent_ids=[f"<{p}>" for p in run.parents],
            )  # fmt: skip
        return files

    async def submit(self, run: TaskRun) -> None:
        if run.peer is None or run.peer not in self._node_dirs:
            raise ConfigError(f"task {run.task}: peer {run.peer!r} is not in the Slurm cluster")
        node_dir = self._node_dirs[run.peer]
        script = template.batch_script(
            self.context.job, run, node_dir=node_dir,
            step=template.task_step_argv(node_dir, self.context.job, run),
            parent_ids=[self._last_id[p] for p in run.parents if p in self._last_id],
        )  # fmt: skip
        path = self.directory / "scripts" / f"{run.task}.{run.attempt}.sh"
        path.write_text(script)
        staging = self.context.staging
        if staging is not None:  # its inputs move now, while its parents may still run
            await staging.stage(run)
        try:
            done = await self._slurm(["sbatch", "--parsable", str(path)])
        except CommandFailed:
            if staging is not None:
                await staging.drop(run.task, run.attempt, "sbatch refused its job")
            raise
        job_id = done.stdout.strip().split(";")[0]
        self._runs[job_id] = _Submitted(run.task, run.attempt, run.peer)
        self._ids[(run.task, run.attempt)] = job_id
        self._last_id[run.task] = job_id

    async def submit_plan(self, plan: JobPlan) -> None:
        raise ConfigError("the slurm backend takes ready runs one by one (dependencies: core)")

    async def _cancel_and_wait(self, job_ids: Sequence[str]) -> None:
        """scancel, then wait until Slurm has killed them: slurmstepd leaves slurmd's process
        group, so stopping slurmd first would leave the task running on the peer."""
        if not job_ids:
            return
        await self._slurm(["scancel", *job_ids], check=False)

        async def ended() -> bool:
            out = await self._slurm(["squeue", "--states=all", "--noheader", "-j",
                                     ",".join(job_ids), "-o", template.SQUEUE_FORMAT],
                                    check=False)  # fmt: skip
            rows = template.parse_squeue(out.stdout) if out.returncode == 0 else []
            # A job on a node whose slurmd is gone never leaves COMPLETING: nothing to wait for.
            here = {template.node_name(p) for p in self._peers if p not in self._lost}
            return not any(r.state in template.ACTIVE and (r.node in here or not r.node)
                           for r in rows)  # fmt: skip

        with contextlib.suppress(ConfigError):  # a dead controller kills nothing more
            await self._wait(ended, f"Slurm jobs {', '.join(job_ids)} killed")

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        job_id = self._ids.get((task, attempt))
        if job_id is None or self._runs[job_id].done:
            return
        self._runs[job_id].done = True  # no event owed for it any more
        await self._slurm(["scancel", job_id], check=False)
        await self._drop(self._runs[job_id], reason)

    async def events(self) -> AsyncIterator[TaskEvent]:
        while not self._closed:
            for event in await self.poll():
                yield event
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> list[TaskEvent]:
        """One look at squeue and sinfo: what happened since the last look, and the
        failures Slurm saw that have settled."""
        events = await self._look()
        now = asyncio.get_running_loop().time()
        events += [event for due, event in self._settling if due <= now]
        self._settling = [(due, event) for due, event in self._settling if due > now]
        return events

    async def _look(self) -> list[TaskEvent]:
        events, self._pending = self._pending, []
        events += await self._lost_peers()
        live = [i for i, r in self._runs.items() if not r.done]
        if not live:
            return events
        out = await self._slurm(["squeue", "--states=all", "--noheader", "-j", ",".join(live),
                                 "-o", template.SQUEUE_FORMAT])  # fmt: skip
        for row in template.parse_squeue(out.stdout):
            run = self._runs.get(row.job_id)
            if run is None or run.done:
                continue
            if not run.started and row.state not in {"PENDING", "CONFIGURING"}:
                run.started = True
                if self.context.staging is None:  # else the worker's `started` said it
                    events.append(TaskStarted(run.task, run.attempt, run.peer))
            if row.state in template.ACTIVE:
                continue
            details = await self._slurm(["scontrol", "show", "job", "--oneliner", row.job_id])
            (final,) = template.parse_scontrol_jobs(details.stdout) or [row]
            run.done = True
            events += await self._outcome(run, final)
        return events

    async def _outcome(self, run: _Submitted, row: template.JobRow) -> list[TaskEvent]:
        """What an ended Slurm job means; with staging, the worker reports a finished run
        (with its outputs) and Slurm only the failures, after which the run is dropped."""
        events = template.run_outcome(row, run.task, run.attempt, run.peer)
        if self.context.staging is None:
            return events
        failed: list[TaskEvent] = [e for e in events if not isinstance(e, TaskFinished)]
        if any(isinstance(e, TaskFailed) for e in failed):
            await self._drop(run, f"its Slurm job ended: {row.state}")
        # The worker that staged the run reports how a claimed run ended; Slurm's word
        # counts for what it cannot see (a job never started), so it comes after a while:
        # if the worker died, its peer is lost by then and this event is stale.
        due = asyncio.get_running_loop().time() + self.settle_s
        self._settling += [(due, event) for event in failed]
        return []

    async def _drop(self, run: _Submitted, reason: str) -> None:
        """The staged run on the worker: no job will claim it any more."""
        if self.context.staging is not None:
            await self.context.staging.drop(run.task, run.attempt, reason)

    async def _lost_peers(self) -> list[TaskEvent]:
        if not self._peers:
            return []
        nodes = await self._nodes()
        events: list[TaskEvent] = []
        for peer in self._peers:
            row = nodes.get(template.node_name(peer))
            if row is not None and template.node_lost(row) and peer not in self._lost:
                self._lost.add(peer)
                events.append(PeerGone(peer, f"node lost (Slurm: {row.state} {row.reason})"))
        return events

    # -- commands ------------------------------------------------------------------------

    async def _slurm(self, argv: Sequence[str], *, check: bool = True) -> Completed:
        return await self.context.commands.run(argv, env=self._env, check=check)

    async def _scontrol(self, *args: str, check: bool = True) -> Completed:
        return await self._slurm(["scontrol", *args], check=check)

    async def _nodes(self) -> dict[str, template.NodeRow]:
        try:
            done = await self.context.commands.run(
                ["sinfo", "--Node", "--noheader", "-o", template.SINFO_FORMAT], env=self._env
            )
        except CommandFailed:
            return {}  # slurmctld not answering yet
        return {n.name: n for n in template.parse_sinfo_nodes(done.stdout)}

    async def _wait_nodes_ready(self, peers: Sequence[str]) -> None:
        wanted = {template.node_name(p) for p in peers}

        async def ready() -> bool:
            nodes = await self._nodes()
            return all(n in nodes and template.node_ready(nodes[n]) for n in wanted)

        await self._wait(ready, f"Slurm nodes {sorted(wanted)} up")

    async def _wait(self, until: Callable[[], bool | Awaitable[bool]], what: str) -> None:
        await wait_for(
            until,
            self.up_s,
            lambda: f"{what}: not within {self.up_s:g} s; see the logs in {self.directory}",
        )
