"""The slurm backend's files and readings, as pure functions (golden-file tested).

Theory of operation (EC3's idea on a desktop LAN): a transient Slurm cluster per job.
`slurmctld` and `munged` run on the coordinator's host, `slurmd` and `munged` on each held
peer, all sharing one random munge key made for the job. Every path (state, spool, pids,
logs, sockets) is the job's own, so several jobs, or several test hosts sharing one
filesystem, never meet. Each task attempt is one `sbatch` job pinned to the peer the core
chose (`--nodelist`), with `--dependency=afterok:` on its parents' Slurm job ids. Its step
is `{slurmd's dir}/task-step`: the worker there staged the run's inputs from bgrid's caches,
and stores its outputs before the step exits 0 (worker/task_steps.py).

Found by running the daemons (Slurm 22.05, munge 0.5, tests/lan/test_slurm_cluster.py):
- slurmd 22.05 always initialises a cgroup plugin (there is no `CgroupPlugin=disabled`
  before 23.02), even with proctrack/linuxproc and task/none: it needs `/sys/fs/cgroup`
  mounted. (`ip netns exec` remounts /sys and hides it; `nsenter --net` does not.)
- `sacct` needs slurmdbd ("Slurm accounting storage is disabled"): runs are read with
  `squeue --states=all` (kept `MinJobAge` seconds after they end) and `scontrol show job`
  for the exit code, which squeue does not print.
- Peers that join later are *dynamic nodes* (`slurmd -Z --conf "CPUs=.. RealMemory=.."`):
  they work on 22.05 with select/cons_tres when `MaxNodeCount` is set from the start (it
  cannot change on reconfigure). `Port=` is not allowed in `--conf`, hence one SlurmdPort
  for the whole job, chosen by the coordinator.
- `batch_sched_delay` (3 s by default) delays each dependent job: set to 0.
- An sbatch job is never started at submit time: it waits for a scheduling pass, and
  slurmctld's main loop makes its first pass about 3 s after it starts, then one a second.
  The backfill thread at `bf_interval=1` (30 s by default) makes its own from the first
  second: the job's first runs start 2-3 s earlier (benchmarks/backend_overhead.py). Later
  runs still wait for the next pass: about 1 s per task on a peer, whatever else is tuned.
- slurmctld only runs where `gethostname()` is the SlurmctldHost name.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bonjourgrid.backends.base import (
    HeldPeer,
    PeerGone,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
)

PARTITION = "bgrid"
MIN_JOB_AGE_S = 86400  # a finished run stays listed (and its id valid for afterok) this long
SLURMD_TIMEOUT_S = 60  # a silent slurmd is DOWN after this; bgrid's heartbeats are faster
KILL_WAIT_S = 5  # SIGTERM to SIGKILL on scancel
SPARE_NODES = 64  # MaxNodeCount headroom for peers recruited after deploy (dynamic nodes)

_NODE_NAME = re.compile(r"[^a-z0-9-]+")
_JOB_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ClusterLayout:
    """Where one job's transient cluster lives. Paths are on the coordinator's host."""

    job: str
    controller_host: str  # gethostname() of the coordinator (slurmctld checks it)
    controller_address: str  # where the peers reach slurmctld
    controller_port: int
    slurmd_port: int
    user: str  # SlurmUser: who runs slurmctld
    state_dir: str  # the backend's directory for this job
    munge_socket: str  # the coordinator's munged socket (clients and slurmctld)

    @property
    def cluster(self) -> str:
        return "bg" + hashlib.sha256(self.job.encode()).hexdigest()[:8]


def node_name(peer: str) -> str:
    """A Slurm NodeName for `peer`: lowercase letters, digits and '-'; a name that had to be
    changed gets a short digest of the original, so two peers never share a node."""
    clean = _NODE_NAME.sub("-", peer.lower()).strip("-")[:40]
    if clean == peer and clean[:1].isalpha():
        return clean
    return f"{clean or 'peer'}-{hashlib.sha256(peer.encode()).hexdigest()[:6]}"


def mebibytes(ram: int) -> int:
    return max(1, ram // 2**20)


def node_line(peer: HeldPeer) -> str:
    return (
        f"NodeName={node_name(peer.name)} NodeAddr={peer.address} CPUs={max(1, peer.cpus)} "
        f"RealMemory={mebibytes(peer.ram)} State=UNKNOWN"
    )


def _common(layout: ClusterLayout, *, munge_socket: str, spool: str, logs: str) -> list[str]:
    return [
        f"# Transient cluster of bgrid job {layout.job}: generated, do not edit.",
        f"ClusterName={layout.cluster}",
        f"SlurmctldHost={layout.controller_host}({layout.controller_address})",
        f"SlurmctldPort={layout.controller_port}",
        f"SlurmdPort={layout.slurmd_port}",
        f"SlurmUser={layout.user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={layout.state_dir}/ctld-state",
        f"SlurmctldPidFile={layout.state_dir}/slurmctld.pid",
        f"SlurmctldLogFile={layout.state_dir}/slurmctld.log",
        f"SlurmdSpoolDir={spool}/spool",
        f"SlurmdPidFile={spool}/slurmd.pid",
        f"SlurmdLogFile={logs}/slurmd.log",
        # A desktop has no slurmdbd and no cgroup delegation: track processes by parentage,
        # no task containment, no accounting.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        # bgrid's core already packs tasks by RAM: memory is checked, not consumed (with
        # CR_Core_Memory a job without --mem would take the whole node).
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=kill_invalid_depend,batch_sched_delay=0,bf_interval=1",
        "ReturnToService=2",
        f"MinJobAge={MIN_JOB_AGE_S}",
        f"SlurmdTimeout={SLURMD_TIMEOUT_S}",
        f"KillWait={KILL_WAIT_S}",
        "MailProg=/bin/true",
        "PropagateResourceLimits=NONE",
        # Peers talk to the controller only, never through each other.
        "TreeWidth=65533",
        # A peer's slurm.conf lists only itself; the controller's lists every node.
        "DebugFlags=NO_CONF_HASH",
        # A peer may have fewer CPUs or less RAM free than it advertised an hour ago.
        "SlurmdParameters=config_overrides",
    ]


def controller_conf(layout: ClusterLayout, peers: Sequence[HeldPeer]) -> str:
    """slurm.conf for slurmctld and the client commands on the coordinator's host."""
    lines = _common(
        layout,
        munge_socket=layout.munge_socket,
        spool=f"{layout.state_dir}/slurmd",
        logs=layout.state_dir,
    )
    lines.append(f"MaxNodeCount={len(peers) + SPARE_NODES}")
    lines += [node_line(p) for p in sorted(peers, key=lambda p: p.name)]
    lines.append(_partition())
    return "\n".join(lines) + "\n"


def node_conf(layout: ClusterLayout, peer: HeldPeer | None, munge_socket: str) -> str:
    """slurm.conf for one peer's slurmd; `{dir}` is the slurmd service's directory there.

    `peer` None: a dynamic node (joined after deploy), whose line the controller makes.
    """
    lines = _common(layout, munge_socket=munge_socket, spool="{dir}", logs="{dir}")
    lines.append(f"MaxNodeCount={SPARE_NODES}")
    if peer is not None:
        lines.append(node_line(peer))
    lines.append(_partition())
    return "\n".join(lines) + "\n"


def _partition() -> str:
    return (
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=NO"
    )


# -- daemons ------------------------------------------------------------------------------


def munged_argv(directory: str, key_file: str) -> tuple[str, ...]:
    """munged in the foreground, every file under `directory`. --force: munged refuses to
    start as root without it (worker daemons run as root in the LAN tests)."""
    return (
        "munged",
        "--foreground",
        "--force",
        f"--socket={directory}/munge.socket",
        f"--key-file={key_file}",
        f"--pid-file={directory}/munged.pid",
        f"--log-file={directory}/munged.log",
        f"--seed-file={directory}/munged.seed",
        "--num-threads=2",
    )


def slurmctld_argv(conf: str) -> tuple[str, ...]:
    return ("slurmctld", "-D", "-f", conf)


def slurmd_argv(conf: str, peer: HeldPeer, *, dynamic: bool) -> tuple[str, ...]:
    argv: tuple[str, ...] = ("slurmd", "-D", "-f", conf, "-N", node_name(peer.name))
    if dynamic:
        argv += ("-Z", "--conf", f"CPUs={max(1, peer.cpus)} RealMemory={mebibytes(peer.ram)}")
    return argv


# -- one run as a batch job -------------------------------------------------------------


def slurm_job_name(job: str, task: str, attempt: int) -> str:
    return _JOB_NAME.sub("_", f"bgrid-{job}-{task}-{attempt}")[:200]


def task_step_argv(node_dir: str, job: str, run: TaskRun) -> tuple[str, ...]:
    """The command a batch job runs: the `task-step` script the worker wrote in its slurmd's
    directory, which claims the run the worker staged and runs its command itself (so Slurm
    runs and accounts it) with the peer's own bgrid (worker/task_steps.py)."""
    return (
        f"{node_dir}/task-step", "--job", job,
        "--task", run.task, "--attempt", str(run.attempt),
    )  # fmt: skip


def batch_script(
    job: str,
    run: TaskRun,
    *,
    node_dir: str,
    step: Sequence[str],
    parent_ids: Iterable[str] = (),
) -> str:
    """The sbatch script of one run: pinned to the core's peer, after its parents' jobs.

    `node_dir`: a directory of the job's on that peer (Slurm's own output goes there).
    """
    if run.peer is None:
        raise ValueError(f"task {run.task}: the slurm backend needs the core's placement")
    name = slurm_job_name(job, run.task, run.attempt)
    directives = [
        f"--job-name={name}",
        f"--nodelist={node_name(run.peer)}",
        f"--partition={PARTITION}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={max(1, run.cpus)}",
    ]
    if run.ram > 0:
        directives.append(f"--mem={mebibytes(run.ram)}M")
    parents = sorted(set(parent_ids), key=lambda i: (len(i), i))
    if parents:
        directives.append(f"--dependency=afterok:{':'.join(parents)}")
        directives.append("--kill-on-invalid-dep=yes")
    directives += [
        f"--chdir={node_dir}",
        f"--output={node_dir}/{name}.slurm.out",
        f"--error={node_dir}/{name}.slurm.err",
        "--no-requeue",  # bgrid's core retries, on a peer of its choice
    ]
    lines = ["#!/bin/sh", *(f"#SBATCH {d}" for d in directives)]
    lines.append(f"exec {shlex.join(step)}")
    return "\n".join(lines) + "\n"


# -- reading Slurm back -----------------------------------------------------------------------

SQUEUE_FORMAT = "%i|%j|%T|%N|%r"  # with --noheader; job names never hold '|'
SINFO_FORMAT = "%N|%T|%E"  # with --Node --noheader

ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                    "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"})  # fmt: skip
_FAILED_REASONS = {
    "FAILED": "the task failed",
    "CANCELLED": "cancelled in Slurm",
    "TIMEOUT": "time limit reached",
    "OUT_OF_MEMORY": "out of memory",
    "DEADLINE": "deadline reached",
    "BOOT_FAIL": "the node failed to boot",
    "PREEMPTED": "preempted",
}
_LOST_NODE_STATES = ("DOWN", "FAIL", "NOT_RESPONDING")
_NODE_FLAGS = "*~#!%$@^-"


@dataclass(frozen=True)
class JobRow:
    """One Slurm job as squeue or scontrol show it."""

    job_id: str
    name: str
    state: str  # JobState, e.g. RUNNING, COMPLETED, NODE_FAIL
    node: str  # NodeList ("" while pending)
    reason: str
    exit_code: int | None = None  # scontrol's ExitCode "code:signal"; None when unknown
    signal: int | None = None


@dataclass(frozen=True)
class NodeRow:
    name: str
    state: str  # upper case, flags stripped: IDLE, ALLOCATED, DOWN, DRAINED, ...
    flags: str  # sinfo's suffixes: "*" not responding, "~" powered off, "#" powering up...
    reason: str

    @property
    def responding(self) -> bool:
        return "*" not in self.flags


def parse_squeue(text: str) -> list[JobRow]:
    """Rows of `squeue --states=all --noheader -o SQUEUE_FORMAT`."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5:
            raise ValueError(f"squeue line {line!r}: want 5 '|'-separated fields")
        job_id, name, state, node, reason = (f.strip() for f in fields)
        rows.append(JobRow(job_id, name, state.split()[0], node, reason))
    return rows


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_key_values(line: str) -> dict[str, str]:
    """`Key=value Key2=value two` (scontrol -o) as a dict; a value runs to the next key."""
    marks = list(_KEY.finditer(line))
    values = {}
    for here, after in zip(marks, [*marks[1:], None], strict=True):
        end = after.start() if after is not None else len(line)
        values[here.group(1)] = line[here.end() : end].strip()
    return values


def parse_scontrol_jobs(text: str) -> list[JobRow]:
    """Rows of `scontrol show job --oneliner` (one job a line)."""
    rows = []
    for line in text.splitlines():
        if "JobId=" not in line:
            continue  # "No jobs in the system"
        kv = parse_key_values(line)
        code, sig = _exit_code(kv.get("ExitCode", ""))
        node = kv.get("NodeList", "")
        rows.append(JobRow(
            job_id=kv["JobId"], name=kv.get("JobName", ""),
            state=kv.get("JobState", "").split()[0] if kv.get("JobState") else "",
            node="" if node == "(null)" else node, reason=kv.get("Reason", ""),
            exit_code=code, signal=sig,
        ))  # fmt: skip
    return rows


def _exit_code(text: str) -> tuple[int | None, int | None]:
    code, _, sig = text.partition(":")
    if not code.isdigit():
        return None, None
    return int(code), int(sig) if sig.isdigit() else None


def parse_sinfo_nodes(text: str) -> list[NodeRow]:
    """Rows of `sinfo --Node --noheader -o SINFO_FORMAT` (a node once per partition)."""
    seen: dict[str, NodeRow] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, state, reason = [*line.split("|", 2), "", ""][:3]
        state = state.strip()
        bare = state.rstrip(_NODE_FLAGS)
        seen[name.strip()] = NodeRow(
            name=name.strip(), state=bare.upper(), flags=state[len(bare) :], reason=reason.strip()
        )
    return list(seen.values())


def node_lost(row: NodeRow) -> bool:
    return not row.responding or any(s in row.state for s in _LOST_NODE_STATES)


def node_ready(row: NodeRow) -> bool:
    return not row.flags and row.state in {"IDLE", "MIXED", "ALLOCATED", "COMPLETING"}


def run_outcome(row: JobRow, task: str, attempt: int, peer: str) -> list[TaskEvent]:
    """What a finished Slurm job means for bgrid (nothing while it is active).

    COMPLETED: the step exited 0, so the worker on the node has stored the outputs (their
    refs come with the worker's own task-done; this event carries none).
    """
    if row.state in ACTIVE:
        return []
    if row.state == "COMPLETED":
        return [TaskFinished(task, attempt, peer)]
    if row.state == "NODE_FAIL":
        return [
            PeerGone(peer, "node lost (Slurm: NODE_FAIL)"),
            TaskFailed(task, attempt, peer, "node lost (Slurm: NODE_FAIL)"),
        ]
    reason = _FAILED_REASONS.get(row.state, f"Slurm job state {row.state}")
    if row.state == "FAILED" and row.exit_code is not None:
        reason = f"exit {row.exit_code}"
    if row.reason and row.reason not in {"None", "NonZeroExitCode"}:
        reason += f" ({row.reason})"
    exit_code = row.exit_code if row.state == "FAILED" else None
    return [TaskFailed(task, attempt, peer, reason, exit_code=exit_code)]


def job_ids_of(rows: Iterable[JobRow]) -> Mapping[str, JobRow]:
    return {r.job_id: r for r in rows}
