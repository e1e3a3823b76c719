"""External runs on a real worker daemon on 127.0.0.1, claimed by real `bgrid task-step`s.

This test plays the coordinator (runs with launch "external", a service run with
task_steps as the slurm backend's slurmd) and the middleware: it runs the `{dir}/task-step`
script the worker wrote, as a Slurm batch job would, in a subprocess of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
import zmq.asyncio

from bonjourgrid import keys, wire
from bonjourgrid.worker import task_step, task_steps
from bonjourgrid.worker.daemon import WorkerConfig
from bonjourgrid.worker.task_steps import NOT_STORED_EXIT, SCRIPT, SOCKET
from tests.inproc.test_service_runs import running
from tests.inproc.test_worker_daemon import REPLY_S, Coordinator, Peer
from tests.waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("quick_timing")]

STEP_S = 20.0  # a step (a Python start, a claim, a short command) is done by then
JOB = "job-1"
# The service a slurmd stands for: up at once, lives until stopped.
SERVICE = {"name": "slurmd", "argv": ["sh", "-c", "touch ready; exec sleep 3600"],
           "ready_file": "ready", "task_steps": True}  # fmt: skip


@dataclass
class Node:
    """A reserved peer with a task-step service, as the slurm backend leaves it."""

    peer: Peer
    coordinator: Coordinator
    sock: Any  # the control connection holding the lease
    directory: Path  # the service's {dir}

    async def run(
        self, task: str, command: str, attempt: int = 1, limits: Any = None, **files: Any
    ) -> None:
        """Send an external run; returns once it is acknowledged (`started`)."""
        fields = self.coordinator.run_fields(JOB, task, command, attempt=attempt, **files)
        fields["limits"] = limits or {}
        await self.sock.send(wire.pack_raw("run", **fields, launch="external"))
        ack = await self.coordinator.ask(self.sock, "heartbeat", job=JOB, lease_s=30.0)
        assert ack["t"] == "heartbeat_ack" and [task, attempt] in ack["running"], ack
        assert (task, attempt) in self.coordinator.started

    async def step(self, task: str, attempt: int = 1, job: str = JOB) -> asyncio.subprocess.Process:
        """`{dir}/task-step` as a batch job runs it, in a subprocess."""
        return await asyncio.create_subprocess_exec(
            str(self.directory / SCRIPT), "--job", job, "--task", task, "--attempt", str(attempt),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SLURMD_NODENAME": "node-7"},
        )  # fmt: skip

    async def report(self) -> dict[str, Any]:
        return await self.coordinator.recv(self.sock, STEP_S)


async def finished(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """The step's exit status and what it said on stderr."""
    _, err = await asyncio.wait_for(proc.communicate(), STEP_S)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def processes_named(word: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if word in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest_asyncio.fixture
async def node(tmp_path: Path, zctx: zmq.asyncio.Context) -> AsyncIterator[Node]:
    config = WorkerConfig(
        name=f"steps-{uuid.uuid4().hex[:8]}", cpus=2, ram_mib=512, cost=0.0,
        cache_dir=tmp_path / "cache", grid=keys.ephemeral_grid_key(), interface="127.0.0.1",
        middleware=("native", "slurm"),
    )  # fmt: skip
    async with running(config) as peer:
        coordinator = Coordinator(zctx, peer, tmp_path / "submit")
        try:
            sock = await coordinator.reserve(JOB)
            up = await coordinator.ask(sock, "service_start", job=JOB, **SERVICE)
            assert up["t"] == "service_up", up
            yield Node(peer, coordinator, sock, Path(up["directory"]))
        finally:
            await coordinator.close()


async def test_a_claimed_run_runs_in_its_sandbox_and_its_outputs_are_reported(
    node: Node,
) -> None:
    # The socket and the script the batch jobs run: this worker's only.
    sock_mode = (node.directory / SOCKET).stat().st_mode
    assert stat.S_ISSOCK(sock_mode) and stat.S_IMODE(sock_mode) == 0o600
    assert os.access(node.directory / SCRIPT, os.X_OK)

    ref = node.coordinator.serve("in.txt", b"hello slurm\n")
    command = "tr a-z A-Z < in.txt > out.txt; echo $SLURMD_NODENAME $BGRID_TASK; pwd >&2"
    await node.run("upper", command, inputs={"in.txt": ref}, outputs=("out.txt",))
    # Staged, not run: the command waits for its step.
    (sandbox,) = (node.peer.daemon.store.root / "sandboxes").glob("task-*/sandbox")
    await wait_until(lambda: (sandbox / "in.txt").exists(), REPLY_S, "the input staged")
    assert not (sandbox / "out.txt").exists()

    step = await node.step("upper")
    done = await node.report()
    assert done["t"] == "task_done" and done["exit_code"] == 0 and done["error"] == "", done
    expected = b"HELLO SLURM\n"
    digest = hashlib.sha256(expected).hexdigest()
    assert done["outputs"] == [["out.txt", digest, len(expected)]]
    assert done["stdout"] == b"node-7 upper\n"  # the middleware's env, then the task's
    assert done["stderr"].decode().strip() == str(sandbox)
    assert await finished(step) == (0, "")
    assert node.peer.daemon.store.holds(digest)  # consumers fetch it from this peer
    ack = await node.coordinator.ask(node.sock, "heartbeat", job=JOB, lease_s=30.0)
    assert ack["running"] == []


async def test_a_failing_command_fails_the_run_and_its_step_with_its_exit_code(
    node: Node,
) -> None:
    await node.run("bad", "echo broken >&2; exit 3", outputs=("out.txt",))
    step = await node.step("bad")
    done = await node.report()
    assert done["t"] == "task_done" and done["exit_code"] == 3 and done["outputs"] == []
    assert done["stderr_tail"] == "broken\n"
    code, said = await finished(step)
    assert code == 3 and "exited 3" in said


async def test_the_step_keeps_the_runs_wall_clock_limit(node: Node) -> None:
    marker = f"7000.{uuid.uuid4().int % 10**9}"
    await node.run("late", f"sleep {marker}", limits={"wall_s": 1})
    step = await node.step("late")
    done = await node.report()
    assert "exceeded its wall-clock limit of 1 s" in done["error"], done
    assert (await finished(step))[0] == 128 + signal.SIGTERM
    assert not processes_named(marker)


async def test_outputs_that_cannot_be_stored_fail_the_step(node: Node) -> None:
    await node.run("lazy", "true", outputs=("out.txt",))
    step = await node.step("lazy")
    done = await node.report()
    assert done["exit_code"] == 0 and "did not write its output 'out.txt'" in done["error"]
    code, said = await finished(step)
    assert code == NOT_STORED_EXIT and "did not write its output" in said  # no afterok


async def test_a_claim_that_comes_before_its_run_waits_for_it(node: Node) -> None:
    step = await node.step("early")  # the batch job started before the worker read the run
    await node.run("early", "echo on time")
    done = await node.report()
    assert done["exit_code"] == 0 and done["stdout"] == b"on time\n", done
    assert await finished(step) == (0, "")


async def test_claims_that_cannot_be_granted_are_refused_with_their_reason(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_steps, "UNSTAGED_WAIT_S", 0.3)  # a run that never comes
    code, said = await finished(await node.step("never-sent"))
    assert code == task_step.REFUSED_EXIT
    assert "no run 'never-sent' attempt 1 of job job-1 was staged on this peer" in said

    code, said = await finished(await node.step("t", job="job-2"))
    assert code == task_step.REFUSED_EXIT and "serves job job-1's runs" in said

    # Claimed once: a second claim of the same run is refused while the first runs it.
    marker = f"7000.{uuid.uuid4().int % 10**9}"
    await node.run("long", f"sleep {marker}")
    first = await node.step("long")
    await wait_until(lambda: processes_named(marker), STEP_S, "the first claim running it")
    code, said = await finished(await node.step("long"))
    assert code == task_step.REFUSED_EXIT and "is already claimed, by the step of pid" in said

    # Cancelled before any claim: its claim is refused, saying so.
    await node.run("dropped", "true")
    await node.sock.send(wire.pack_raw("cancel", job=JOB, task="dropped"))
    await wait_until(
        lambda: ("job-1", "dropped", 1) not in node.peer.daemon.steps.staged,
        REPLY_S,
        "the cancelled run dropped",
    )
    code, said = await finished(await node.step("dropped"))
    assert code == task_step.REFUSED_EXIT
    assert "can no longer be claimed: it ended (stopped: cancelled)" in said

    # Cancelled while claimed: the step is told to stop, its command goes.
    await node.sock.send(wire.pack_raw("cancel", job=JOB, task="long"))
    code, said = await finished(first)
    assert code == 128 + signal.SIGTERM and "stopped: cancelled" in said
    await wait_until(lambda: not processes_named(marker), STEP_S, "the command gone")


@pytest.mark.parametrize("how", ["killed", "scancel"])
async def test_a_step_that_dies_or_is_cancelled_fails_the_attempt_and_its_command_goes(
    node: Node, how: str
) -> None:
    marker = f"7000.{uuid.uuid4().int % 10**9}"
    # The command also starts a process that leaves its group: the marker still finds it.
    await node.run("slow", f"setsid sleep {marker} & sleep {marker}")
    step = await node.step("slow")
    await wait_until(lambda: len(processes_named(marker)) == 2, STEP_S, "the command running")
    step.send_signal(signal.SIGKILL if how == "killed" else signal.SIGTERM)
    done = await node.report()
    assert done["t"] == "task_done" and done["task"] == "slow" and done["outputs"] == []
    if how == "killed":
        assert done["exit_code"] == -1 and "the batch job's step died" in done["error"], done
    else:  # Slurm's scancel: SIGTERM to the step, passed on to the command's group
        assert done["exit_code"] == -signal.SIGTERM, done
        assert (await finished(step))[0] == 128 + signal.SIGTERM
    await wait_until(lambda: not processes_named(marker), STEP_S, "the command's processes gone")
    await step.wait()


async def test_the_socket_and_the_script_go_with_their_service(node: Node) -> None:
    reply = await node.coordinator.ask(node.sock, "service_stop", job=JOB, name="slurmd")
    assert reply["t"] == "service_exited"
    assert not (node.directory / SOCKET).exists() and not (node.directory / SCRIPT).exists()
    assert node.peer.daemon.steps._servers == {}
