"""The condor backend against live HTCondor daemons: a personal pool on 127.0.0.1 (collector,
negotiator and schedd from `deploy`, one startd as a peer's service run), the diamond DAG
submitted with `Submit.from_dag`, its events read from DAGMan's node log.

Runs wherever HTCondor is installed (`condor_master` on PATH); these development machines
have none, so here it is skipped with that reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("condor_master") is None,
        reason="condor_master not on PATH: no HTCondor daemons on this machine",
    ),
]

htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra is not installed")

from bonjourgrid.backends.base import (  # noqa: E402
    BackendContext,
    Commands,
    HeldPeer,
    JobPlan,
    ServiceSpec,
    ServiceStarted,
    StagedInput,
    TaskFailed,
    TaskFinished,
    TaskRun,
)
from bonjourgrid.backends.condor import CondorBackend  # noqa: E402
from bonjourgrid.cache.store import FileRef  # noqa: E402


class LocalServices:
    """Service runs on this host, as a worker would run them (files, secrets 0600, the
    placeholders filled in), spawned through the same Commands so teardown stops them."""

    def __init__(self, root: Path, commands: Commands) -> None:
        self.root = root
        self.commands = commands

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted:
        directory = self.root / peer / spec.name
        directory.mkdir(parents=True)
        port = 9711

        def fill(text: str) -> str:
            return (text.replace("{dir}", str(directory)).replace("{host}", "127.0.0.1")
                    .replace("{port:startd}", str(port)))

        for name, text in spec.files.items():
            (directory / name).write_text(fill(text))
        for name, data in spec.secrets.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_bytes(data)
        for sub in ("log", "execute", "spool"):
            (directory / sub).mkdir(exist_ok=True)
        await self.commands.spawn([fill(a) for a in spec.argv], log=directory / "service.out")
        return ServiceStarted(peer, spec.name, {"startd": port}, str(directory))

    async def stop_service(self, peer: str, name: str) -> None:
        pass  # Commands.close stops the process group


async def test_a_diamond_runs_in_a_personal_pool(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    commands = Commands()
    context = BackendContext(
        job="live1", root=work, state_dir=tmp_path / "state", commands=commands,
        services=LocalServices(tmp_path / "peers", commands),
    )
    backend = CondorBackend(context)
    ref = FileRef("0" * 64, 0)
    plan = JobPlan(
        "live1", work, (HeldPeer("desk-1", "127.0.0.1", cpus=2, ram=2 * 1024**3),),
        (
            TaskRun("a", 1, None, "echo a > a.txt", outputs=("a.txt",)),
            TaskRun("b", 1, None, "cat a.txt > b.txt", inputs=(StagedInput("a.txt", ref),),
                    outputs=("b.txt",), parents=("a",)),
            TaskRun("c", 1, None, "cat a.txt > c.txt", inputs=(StagedInput("a.txt", ref),),
                    outputs=("c.txt",), parents=("a",)),
            TaskRun("d", 1, None, "cat b.txt c.txt > d.txt",
                    inputs=(StagedInput("b.txt", ref), StagedInput("c.txt", ref)),
                    outputs=("d.txt",), parents=("b", "c")),
        ),
    )
    try:
        await backend.deploy(plan.peers)
        await backend.submit_plan(plan)
        events = [event async for event in backend.events()]
    finally:
        await backend.teardown()
    assert not [e for e in events if isinstance(e, TaskFailed)], events
    assert {e.task for e in events if isinstance(e, TaskFinished)} == {"a", "b", "c", "d"}
    assert (work / "d.txt").read_text() == "a\na\n"
