"""A real transient Slurm cluster on the test LAN, from the slurm backend's generated files.

No bgrid coordinator yet: this test does by hand what `SlurmBackend.deploy` asks of the
coordinator's host and of the peers' workers (munged + slurmctld on host 1, munged + slurmd
on the peers, `{dir}` filled in as a worker fills in a service run's), then runs a chain of
batch jobs with afterok dependencies and reads them back with the backend's parsers.

Every host shares this machine's filesystem: each daemon gets its own directory under a
short temporary root (munge's socket path must fit a sun_path of 108 bytes).

Daemons start with `nsenter --net`, not `ip netns exec`: the latter remounts /sys, and
slurmd 22.05 always wants a cgroup plugin, hence /sys/fs/cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from bonjourgrid.backends.base import (
    BackendContext,
    Commands,
    Completed,
    HeldPeer,
    ServiceSpec,
    ServiceStarted,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
)
from bonjourgrid.backends.slurm import SlurmBackend, template
from tests.waiting import async_wait_until, wait_until

from .conftest import _live_lan
from .netns import Host, Lan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(cmd) is None for cmd in ("slurmctld", "slurmd", "munged", "nsenter")),
        reason="needs slurm-wlm and munge (apt-get install slurm-wlm munge)",
    ),
]

UP_S = 30.0  # daemons started and every node idle by then
RUN_S = 30.0  # a chain of three short jobs done by then
_COMMAND_S = 20.0
_STOP_S = 10.0


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Generator[Lan, None, None]:
    """Host 1: the coordinator's host; hosts 2 and 3: peers at deploy; host 4 joins later."""
    yield from _live_lan(4, tmp_path_factory)


@dataclass
class Daemon:
    name: str
    host: Host
    proc: subprocess.Popen[Any]
    log: Path


class Cluster:
    """The daemons of one transient cluster, started the way the backend deploys them."""

    def __init__(self, lan: Lan, root: Path) -> None:
        self.lan = lan
        self.root = root
        self.controller = lan.hosts[0]
        self.daemons: list[Daemon] = []
        self.key = secrets.token_bytes(1024)  # the job's munge key
        self.layout = template.ClusterLayout(
            job="chain",
            controller_host=socket.gethostname(),  # every namespace shares the UTS name
            controller_address=self.controller.ip,
            controller_port=6817,  # a fresh namespace: every port is free
            slurmd_port=6818,
            user="root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
            state_dir=str(root / "ctld"),
            munge_socket=str(root / "ctld-munge" / "munge.socket"),
        )
        self.conf = root / "ctld" / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}

    def directory(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def start(self, name: str, host: Host, argv: Sequence[str]) -> Daemon:
        log = host.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{host.name}", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = Daemon(name, host, proc, log)
        self.daemons.append(daemon)
        return daemon

    def start_munged(self, name: str, host: Host) -> Path:
        """munged with the job's key, as a service run: key 0600 in its own directory."""
        directory = self.directory(name)
        key = directory / "munge.key"
        key.write_bytes(self.key)
        key.chmod(0o600)
        self.start(name, host, template.munged_argv(str(directory), str(key)))
        socket_path = directory / "munge.socket"
        wait_until(socket_path.exists, UP_S, lambda: f"{name} socket\n{self.logs()}")
        return socket_path

    def start_peer(self, peer: HeldPeer, host: Host, *, dynamic: bool = False) -> Path:
        """munged + slurmd on a peer: the two service runs of `SlurmBackend.deploy`."""
        munge = self.start_munged(f"{host.name}-munged", host)
        slurmd_dir = self.directory(f"{host.name}-slurmd")
        conf_text = template.node_conf(self.layout, None if dynamic else peer, str(munge))
        conf = slurmd_dir / "slurm.conf"
        conf.write_text(conf_text.replace("{dir}", str(slurmd_dir)))
        self.start(
            f"{host.name}-slurmd", host, template.slurmd_argv(str(conf), peer, dynamic=dynamic)
        )
        return slurmd_dir

    def start_controller(self, peers: Sequence[HeldPeer]) -> None:
        self.start_munged("ctld-munge", self.controller)
        self.directory("ctld")
        self.conf.write_text(template.controller_conf(self.layout, peers))
        self.start("slurmctld", self.controller, template.slurmctld_argv(str(self.conf)))

    def client(self, *argv: str) -> str:
        """A Slurm client command on the coordinator's host; its stdout."""
        done = self.controller.run(list(argv), timeout=_COMMAND_S, env=self.env)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}\n{self.logs()}")
        return done.stdout

    def nodes(self) -> dict[str, template.NodeRow]:
        done = self.controller.run(
            ["sinfo", "--Node", "--noheader", "-o", template.SINFO_FORMAT],
            timeout=_COMMAND_S,
            env=self.env,
        )
        return {n.name: n for n in template.parse_sinfo_nodes(done.stdout)}

    def jobs(self) -> dict[str, template.JobRow]:
        out = self.client("squeue", "--states=all", "--noheader", "-o", template.SQUEUE_FORMAT)
        return {row.job_id: row for row in template.parse_squeue(out)}

    def job_details(self, job_id: str) -> template.JobRow:
        (row,) = template.parse_scontrol_jobs(self.client("scontrol", "show", "job", "-o", job_id))
        return row

    def submit(self, script: str) -> str:
        """`sbatch --parsable` with the script on stdin; the Slurm job id."""
        done = self.controller.run(
            ["sbatch", "--parsable"], timeout=_COMMAND_S, input=script, env=self.env
        )
        if done.returncode != 0:
            pytest.fail(f"sbatch exited {done.returncode}: {done.stderr}\n{self.logs()}")
        return done.stdout.strip().split(";")[0]

    def logs(self) -> str:
        parts = []
        for d in self.daemons:
            status = "running" if d.proc.poll() is None else f"exit {d.proc.returncode}"
            text = d.log.read_text(errors="replace").splitlines()[-15:] if d.log.exists() else []
            parts.append(f"--- {d.name} [{status}]\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM every daemon (slurmd first, munged last), SIGKILL what outlives grace."""
        order = sorted(self.daemons, key=lambda d: "munged" in d.name or "munge" in d.name)
        for daemon in order:
            if daemon.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.proc.pid, signal.SIGTERM)
        for daemon in order:
            try:
                daemon.proc.wait(timeout=_STOP_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(timeout=_STOP_S)


def _processes_under(root: Path) -> list[str]:
    """Command lines of live processes that name a path under `root` (our daemons)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(root) in cmdline:
            found.append(f"{proc.pid}: {cmdline}")
    return found


@pytest.fixture
def cluster(lan: Lan) -> Generator[Cluster, None, None]:
    root = Path(tempfile.mkdtemp(prefix="bgslurm-"))  # short: munge socket paths
    made = Cluster(lan, root)
    try:
        yield made
    finally:
        made.stop()
        shutil.rmtree(root, ignore_errors=True)


def _held(host: Host, name: str) -> HeldPeer:
    return HeldPeer(
        name=name, address=host.ip, cpus=1, ram=512 * 2**20, middleware=frozenset({"slurm"})
    )


def _run(task: str, peer: str) -> TaskRun:
    return TaskRun(task=task, attempt=1, peer=peer, command="(by hand)", ram=64 * 2**20)


def test_a_transient_cluster_runs_a_chain_drains_a_node_takes_a_new_one_and_goes_away(
    lan: Lan, cluster: Cluster
) -> None:
    h2, h3, h4 = lan.hosts[1:]
    # Names a desktop may have: the backend makes Slurm node names of them.
    p2, p3, p4 = _held(h2, "Alice's PC"), _held(h3, "bob"), _held(h4, "carol.local")
    cluster.start_controller([p2, p3])
    dirs = {p2.name: cluster.start_peer(p2, h2), p3.name: cluster.start_peer(p3, h3)}
    n2, n3 = template.node_name(p2.name), template.node_name(p3.name)

    wait_until(
        lambda: {n for n, row in cluster.nodes().items() if template.node_ready(row)} == {n2, n3},
        UP_S,
        lambda: f"both nodes idle; sinfo says {cluster.nodes()}\n{cluster.logs()}",
    )

    # A chain a -> b -> c over both peers: each step appends where it ran to its parent's file.
    results = cluster.directory("results")
    ids: dict[str, str] = {}
    chain = [("a", p2, ()), ("b", p3, ("a",)), ("c", p2, ("b",))]
    for task, peer, parents in chain:
        parent_file = f"{results}/{parents[0]}.txt" if parents else "/dev/null"
        step = (
            "sh",
            "-c",
            f'{{ cat {parent_file}; echo "{task} $SLURMD_NODENAME"; }} > {results}/{task}.txt',
        )
        script = template.batch_script(
            "chain", _run(task, peer.name), node_dir=str(dirs[peer.name]), step=step,
            parent_ids=[ids[p] for p in parents],
        )  # fmt: skip
        ids[task] = cluster.submit(script)
    # and a run that fails, with a child that can never run.
    failing = template.batch_script(
        "chain", _run("bad", p3.name), node_dir=str(dirs[p3.name]), step=("sh", "-c", "exit 3")
    )
    ids["bad"] = cluster.submit(failing)
    orphan = template.batch_script(
        "chain", _run("orphan", p2.name), node_dir=str(dirs[p2.name]), step=("true",),
        parent_ids=[ids["bad"]],
    )  # fmt: skip
    ids["orphan"] = cluster.submit(orphan)

    def settled() -> bool:
        jobs = cluster.jobs()
        return all(i in jobs and jobs[i].state not in template.ACTIVE for i in ids.values())

    wait_until(
        settled, RUN_S, lambda: f"every job ended; squeue: {cluster.jobs()}\n{cluster.logs()}"
    )

    jobs = cluster.jobs()
    assert {t: jobs[ids[t]].state for t in ("a", "b", "c")} == dict.fromkeys("abc", "COMPLETED")
    assert {t: jobs[ids[t]].node for t in ("a", "b", "c")} == {"a": n2, "b": n3, "c": n2}
    assert (results / "c.txt").read_text().split("\n") == [f"a {n2}", f"b {n3}", f"c {n2}", ""]
    assert jobs[ids["a"]].name == template.slurm_job_name("chain", "a", 1)

    outcome = {t: template.run_outcome(cluster.job_details(ids[t]), t, 1, "peer") for t in ids}
    assert outcome["c"] == [TaskFinished("c", 1, "peer")]
    assert outcome["bad"] == [TaskFailed("bad", 1, "peer", "exit 3", exit_code=3)]
    (orphaned,) = outcome["orphan"]
    assert isinstance(orphaned, TaskFailed) and orphaned.exit_code is None
    assert "DependencyNeverSatisfied" in orphaned.reason, orphaned

    # A peer leaves: its node is drained, with bgrid's reason.
    cluster.client("scontrol", "update", f"nodename={n3}", "state=drain", "reason=peer left")
    wait_until(
        lambda: cluster.nodes()[n3].state in {"DRAINED", "DRAIN"},
        UP_S,
        lambda: f"{n3} drained; sinfo says {cluster.nodes()}",
    )
    assert cluster.nodes()[n3].reason == "peer left"

    # A peer joins after deploy: a dynamic node, and a job runs on it.
    n4 = template.node_name(p4.name)
    dirs[p4.name] = cluster.start_peer(p4, h4, dynamic=True)
    wait_until(
        lambda: n4 in cluster.nodes() and template.node_ready(cluster.nodes()[n4]),
        UP_S,
        lambda: f"{n4} joined; sinfo says {cluster.nodes()}\n{cluster.logs()}",
    )
    step = ("sh", "-c", f"ip -4 -o addr show eth0 > {results}/joined.txt")
    joined = cluster.submit(
        template.batch_script(
            "chain", _run("joined", p4.name), node_dir=str(dirs[p4.name]), step=step
        )
    )
    wait_until(
        lambda: cluster.jobs()[joined].state == "COMPLETED",
        RUN_S,
        lambda: f"job on the new node done; squeue: {cluster.jobs()}\n{cluster.logs()}",
    )
    assert f" {h4.ip}/" in (results / "joined.txt").read_text()

    # The job ends: every daemon goes, nothing of ours keeps running.
    cluster.stop()
    assert [d.name for d in cluster.daemons if d.proc.poll() is None] == []
    wait_until(
        lambda: _processes_under(cluster.root) == [],
        _STOP_S,
        lambda: f"no daemon left; still running: {_processes_under(cluster.root)}",
    )


# -- the backend itself, on the same kind of cluster ----------------------------------------


class NamespaceCommands(Commands):
    """A test seam: the coordinator's commands run in host 1's network namespace."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.prefix = ("nsenter", f"--net=/run/netns/{host.name}")

    async def run(self, argv: Sequence[str], **kw: Any) -> Completed:
        return await super().run([*self.prefix, *argv], **kw)

    async def spawn(self, argv: Sequence[str], **kw: Any) -> asyncio.subprocess.Process:
        return await super().spawn([*self.prefix, *argv], **kw)


class NamespaceServices:
    """What a worker does with a service run (its {dir}, files, secrets 0600, ready file,
    the `task-step` script of a task_steps service), done here in the peer's namespace: a
    stand-in for the worker (tests/inproc/test_task_steps.py runs the real one)."""

    def __init__(self, hosts: dict[str, Host], root: Path, task_step: str) -> None:
        self.hosts = hosts
        self.root = root
        self.task_step = task_step  # the `{dir}/task-step` it writes
        self.running: dict[tuple[str, str], subprocess.Popen[Any]] = {}

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted:
        host = self.hosts[peer]
        directory = self.root / f"{host.name}-{spec.name}"
        directory.mkdir(mode=0o700, parents=True)
        for name, text in spec.files.items():
            (directory / name).write_text(text.replace("{dir}", str(directory)))
        for name, data in spec.secrets.items():
            (directory / name).touch(mode=0o600)
            (directory / name).write_bytes(data)
        if spec.task_steps:
            (directory / "task-step").write_text(self.task_step)
            (directory / "task-step").chmod(0o700)
        argv = [a.replace("{dir}", str(directory)) for a in spec.argv]
        with (host.logs / f"{spec.name}.log").open("ab") as log:
            self.running[(peer, spec.name)] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{host.name}", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        ready = directory / spec.ready_file
        await async_wait_until(ready.exists, UP_S, f"{spec.name} on {peer} ready")
        return ServiceStarted(peer, spec.name, {}, str(directory))

    async def stop_service(self, peer: str, name: str) -> None:
        proc = self.running.pop((peer, name))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.to_thread(proc.wait, _STOP_S)

    def stop_all(self) -> None:
        for proc in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(_STOP_S)
        self.running.clear()


# Stand-in for the worker's `{dir}/task-step` script (which claims a staged run: this test has
# no worker): it records which run ran on which node, and fails the runs named fail*.
_TASK_STEP = """#!/bin/sh
# task-step --job J --task T --attempt A
echo "$4 $6 $SLURMD_NODENAME" >> {results}/$4.txt
case "$4" in fail*) exit 4;; slow*) sleep 60;; esac
"""


async def test_the_backend_deploys_runs_resizes_and_tears_down(lan: Lan) -> None:
    root = Path(tempfile.mkdtemp(prefix="bgslurm-"))
    h1, h2, h3, h4 = lan.hosts
    results = root / "results"
    results.mkdir()
    p2, p3, p4 = _held(h2, "desk2"), _held(h3, "desk3"), _held(h4, "late one")
    hosts = {"desk2": h2, "desk3": h3, "late one": h4}
    services = NamespaceServices(hosts, root, _TASK_STEP.replace("{results}", str(results)))
    context = BackendContext(
        job="bk", root=root, state_dir=root / "coord", commands=NamespaceCommands(h1),
        services=services, options={"address": h1.ip, "poll_s": "0.2"},
    )  # fmt: skip
    backend = SlurmBackend(context)
    seen: list[TaskEvent] = []

    async def collect() -> None:
        async for event in backend.events():
            seen.append(event)

    def ended(task: str) -> TaskEvent | None:
        return next((e for e in seen if isinstance(e, TaskFinished | TaskFailed)
                     and e.task == task), None)  # fmt: skip

    collector: asyncio.Task[None] | None = None
    try:
        await backend.deploy([p2, p3])
        collector = asyncio.create_task(collect())
        await backend.submit(TaskRun("a", 1, "desk2", "(step)"))
        await async_wait_until(lambda: ended("a"), RUN_S, lambda: f"a ended: {seen}")
        await backend.submit(TaskRun("b", 1, "desk3", "(step)", parents=("a",)))
        await backend.submit(TaskRun("fail", 1, "desk2", "(step)"))
        await backend.submit(TaskRun("slow", 1, "desk3", "(step)"))
        await async_wait_until(
            lambda: ended("b") and ended("fail") and TaskStarted("slow", 1, "desk3") in seen,
            RUN_S,
            lambda: f"b and fail ended, slow started: {seen}",
        )
        assert ended("a") == TaskFinished("a", 1, "desk2")
        assert ended("b") == TaskFinished("b", 1, "desk3")
        assert ended("fail") == TaskFailed("fail", 1, "desk2", "exit 4", exit_code=4)
        assert (results / "b.txt").read_text() == "b 1 desk3\n"
        await backend.cancel("slow", 1, "not needed")

        await backend.add_peer(p4)
        await backend.submit(TaskRun("late", 1, "late one", "(step)"))
        await async_wait_until(lambda: ended("late"), RUN_S, lambda: f"late ended: {seen}")
        assert (results / "late.txt").read_text().split()[-1] == template.node_name("late one")

        await backend.submit(TaskRun("slow", 2, "desk3", "(step)"))
        await async_wait_until(
            lambda: TaskStarted("slow", 2, "desk3") in seen, RUN_S, lambda: f"{seen}"
        )
        await backend.remove_peer("desk3", "owner back")
        await async_wait_until(lambda: ended("slow"), RUN_S, lambda: f"slow lost: {seen}")
        assert ended("slow") == TaskFailed("slow", 2, "desk3", "peer left: owner back")
        assert not [e for e in seen if isinstance(e, TaskFailed) and e.attempt == 1
                    and e.task == "slow"]  # fmt: skip
    finally:
        await backend.teardown()
        if collector is not None:
            await asyncio.wait_for(collector, _STOP_S)
        services.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    assert services.running == {}
    await async_wait_until(
        lambda: _processes_under(root) == [],
        _STOP_S,
        lambda: f"no daemon left; still running: {_processes_under(root)}",
    )
