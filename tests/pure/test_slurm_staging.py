"""The slurm backend with runs staged on bgrid's workers: each run is staged before its sbatch,
its job runs the worker's `{dir}/task-step`, the worker reports finished runs (Slurm only the
failures), and a run no job will claim is dropped.

Slurm's client commands are played by `ScriptedSlurm`, a named fake that answers from a table
of job states, so the backend's bookkeeping is checked in milliseconds; the real daemons and
commands run in tests/lan/test_slurm_cluster.py, the real task-step in
tests/inproc/test_task_steps.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.backends.base import (
    BackendContext,
    CommandFailed,
    Commands,
    Completed,
    HeldPeer,
    ServiceSpec,
    ServiceStarted,
    TaskFailed,
    TaskRun,
)
from bonjourgrid.backends.slurm import SlurmBackend, template

PEER = HeldPeer("desk2", "10.0.0.2", cpus=2, ram=2**30, middleware=frozenset({"slurm"}))


class ScriptedSlurm(Commands):
    """Fake sbatch/squeue/scontrol/scancel/sinfo over `states` (job id -> state, ExitCode)."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        super().__init__(observer=lambda argv: log.append(("command", argv[0])))
        self.states: dict[str, tuple[str, str]] = {}
        self.refuse_sbatch = False

    async def run(self, argv: Sequence[str], *, check: bool = True, **_: Any) -> Completed:
        args = tuple(argv)
        self._note(args)
        out, code = "", 0
        match args[0]:
            case "sbatch" if self.refuse_sbatch:
                code = 1
            case "sbatch":
                job_id = str(100 + len(self.states))
                self.states[job_id] = ("PENDING", "0:0")
                out = f"{job_id}\n"
            case "squeue":
                ids = args[args.index("-j") + 1].split(",")
                out = "".join(f"{i}|n|{self.states[i][0]}|desk2|None\n" for i in ids)
            case "scontrol" if args[1] in {"update", "delete"}:
                pass  # draining and removing a node: nothing to read back
            case "scontrol":
                job_id = args[-1]
                state, exit_code = self.states[job_id]
                out = f"JobId={job_id} JobName=n JobState={state} ExitCode={exit_code}\n"
            case "scancel":
                for job_id in args[1:]:
                    self.states[job_id] = ("CANCELLED", "0:15")
            case "sinfo":
                out = f"{template.node_name(PEER.name)}|idle|none\n"
        if code and check:
            raise CommandFailed(f"{args[0]} exited {code}")
        return Completed(args, code, out, "")


class RecordingServices:
    def __init__(self) -> None:
        self.specs: list[ServiceSpec] = []

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted:
        self.specs.append(spec)
        return ServiceStarted(peer, spec.name, {}, f"/svc/{peer}/{spec.name}")

    async def stop_service(self, peer: str, name: str) -> None:
        return None


class RecordingStaging:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    async def stage(self, run: TaskRun) -> None:
        self.log.append(("stage", run.task, run.attempt))

    async def drop(self, task: str, attempt: int, reason: str) -> None:
        self.log.append(("drop", task, attempt, reason))


@pytest.fixture
def log() -> list[tuple[Any, ...]]:
    return []


@pytest.fixture
def slurm(log: list[tuple[Any, ...]]) -> ScriptedSlurm:
    return ScriptedSlurm(log)


@pytest.fixture
async def backend(tmp_path: Path, log: list[tuple[Any, ...]], slurm: ScriptedSlurm) -> SlurmBackend:
    context = BackendContext(
        job="j", root=tmp_path, state_dir=tmp_path / "state", commands=slurm,
        services=RecordingServices(), staging=RecordingStaging(log),
        # settle_s 0: Slurm's word on a failure is told at the next poll.
        options={"controller_port": "41817", "slurmd_port": "41818", "settle_s": "0"},
    )  # fmt: skip
    made = SlurmBackend(context)
    (made.directory / "scripts").mkdir(parents=True)  # deploy makes it (and the controller)
    await made.add_peer(PEER)
    log.clear()
    return made


async def test_a_run_is_staged_before_its_job_and_its_job_runs_the_workers_task_step(
    backend: SlurmBackend, log: list[tuple[Any, ...]], slurm: ScriptedSlurm
) -> None:
    services = backend.context.services
    assert isinstance(services, RecordingServices)
    slurmd = next(s for s in services.specs if s.name == "slurmd")
    assert slurmd.task_steps  # the worker writes {dir}/task-step for it

    await backend.submit(TaskRun("a", 1, "desk2", "true"))
    assert log == [("stage", "a", 1), ("command", "sbatch")]
    script = (backend.directory / "scripts" / "a.1.sh").read_text()
    assert script.endswith("exec /svc/desk2/slurmd/task-step --job j --task a --attempt 1\n")

    # Completed in Slurm: the worker's report (with the outputs) is the run's end, not this.
    slurm.states["100"] = ("COMPLETED", "0:0")
    assert await backend.poll() == []
    assert not [e for e in log if e[0] == "drop"]


async def test_runs_that_fail_or_are_cancelled_in_slurm_are_dropped_from_the_worker(
    backend: SlurmBackend, log: list[tuple[Any, ...]], slurm: ScriptedSlurm
) -> None:
    await backend.submit(TaskRun("b", 1, "desk2", "exit 3"))
    slurm.states["100"] = ("FAILED", "3:0")
    assert await backend.poll() == [TaskFailed("b", 1, "desk2", "exit 3", exit_code=3)]
    assert log[-1] == ("drop", "b", 1, "its Slurm job ended: FAILED")

    await backend.submit(TaskRun("c", 1, "desk2", "sleep 9"))
    await backend.cancel("c", 1, "not needed")
    assert log[-2:] == [("command", "scancel"), ("drop", "c", 1, "not needed")]

    slurm.refuse_sbatch = True
    with pytest.raises(CommandFailed):
        await backend.submit(TaskRun("d", 1, "desk2", "true"))
    assert log[-1] == ("drop", "d", 1, "sbatch refused its job")


async def test_a_released_peers_runs_are_not_reported_failed(
    backend: SlurmBackend, slurm: ScriptedSlurm
) -> None:
    """The worker reported the run (squeue has not shown its end yet) and the core released
    the peer: no `peer left` failure of a run that already ended comes out of the backend."""
    await backend.submit(TaskRun("a", 1, "desk2", "true"))
    slurm.states["100"] = ("COMPLETED", "0:0")  # ended; no poll has read it yet
    await backend.remove_peer("desk2", "released")
    assert [e for e in await backend.poll() if isinstance(e, TaskFailed)] == []
