"""The condor backend reads task events from real HTCondor event-log text, parsed by
HTCondor's own `JobEventLog` (fixtures and their sources: golden/condor/eventlogs/README.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra is not installed")

from bonjourgrid.backends.base import (  # noqa: E402
    BackendContext,
    CommandFailed,
    Commands,
    HeldPeer,
    JobPlan,
    ServiceSpec,
    ServiceStarted,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
)
from bonjourgrid.backends.condor import CondorBackend, template  # noqa: E402
from bonjourgrid.backends.condor.events import EventLogReader, EventLogTail  # noqa: E402

LOGS = Path(__file__).parent / "golden" / "condor" / "eventlogs"
EXEC_HOST = "10.136.81.233"  # the execute host of the real log


def read(name: str, reader: EventLogReader) -> list[object]:
    log = htcondor2.JobEventLog(str(LOGS / name))
    try:
        return [out for event in log.events(stop_after=0) for out in reader.feed(event)]
    finally:
        log.close()


def test_a_real_dagman_node_log_gives_started_then_finished() -> None:
    reader = EventLogReader({"Simple": 1}, {EXEC_HOST: "desk-2"})
    assert read("osg-school-simple-dag.nodes.log", reader) == [
        TaskStarted("Simple", 1, "desk-2"),
        TaskFinished("Simple", 1, "desk-2", run_s=5.0),
    ]
    assert reader.task_of(271101) == ("Simple", 1)


def test_an_unrecruited_execute_host_is_named_by_its_address() -> None:
    events = read("osg-school-simple-dag.nodes.log", EventLogReader())
    assert events[0] == TaskStarted("Simple", 1, EXEC_HOST)


def test_a_non_zero_exit_is_a_failure_with_its_code() -> None:
    events = read("osg-school-simple-dag-exit1.nodes.log", EventLogReader({"Simple": 3}))
    assert events[-1] == TaskFailed("Simple", 3, EXEC_HOST, "exited 1", exit_code=1)


def test_a_hold_is_one_failure_with_htcondors_reason_and_the_removal_adds_none() -> None:
    events = read("osg-school-simple-dag-held.nodes.log", EventLogReader())
    assert len(events) == 2
    failed = events[1]
    assert isinstance(failed, TaskFailed)
    assert failed.exit_code is None
    assert "held by HTCondor: Transfer input files failure" in failed.reason
    assert "code 13, subcode 2" in failed.reason


def test_a_cancelled_run_owes_no_event() -> None:
    reader = EventLogReader()
    reader.cancelled("Simple", 1)
    events = read("osg-school-simple-dag-exit1.nodes.log", reader)
    assert events == [TaskStarted("Simple", 1, EXEC_HOST)]


def test_the_tail_reads_only_what_was_appended(tmp_path: Path) -> None:
    text = (LOGS / "osg-school-simple-dag.nodes.log").read_text()
    head, rest = text.split("001 (271101", 1)
    path = tmp_path / "nodes.log"
    tail = EventLogTail(path)
    try:
        assert tail.read_new() == []  # no file yet: DAGMan has not written it
        path.write_text(head)
        assert next(e.type for e in tail.read_new()) == htcondor2.JobEventType.SUBMIT
        assert tail.read_new() == []
        with path.open("a") as out:
            out.write("001 (271101" + rest)
        kinds = [e.type for e in tail.read_new()]
        assert kinds[0] == htcondor2.JobEventType.EXECUTE
        assert kinds[-1] == htcondor2.JobEventType.JOB_TERMINATED
    finally:
        tail.close()


# -- the backend around the reader ----------------------------------------------------------


class RecordingServices:
    """Stands in for the workers' service runs (another part of bgrid): records the specs."""

    def __init__(self) -> None:
        self.started: list[tuple[str, ServiceSpec]] = []
        self.stopped: list[tuple[str, str]] = []

    async def start_service(self, peer: str, spec: ServiceSpec) -> ServiceStarted:
        self.started.append((peer, spec))
        return ServiceStarted(peer, spec.name, {"startd": 9711}, f"/srv/{peer}")

    async def stop_service(self, peer: str, name: str) -> None:
        self.stopped.append((peer, name))


def make_backend(tmp_path: Path, **options: str) -> tuple[CondorBackend, Commands]:
    commands = Commands()
    context = BackendContext(
        job="j1", root=tmp_path / "work", state_dir=tmp_path / "state", commands=commands,
        services=RecordingServices(), options={"collector_port": "9700", **options},
    )
    return CondorBackend(context), commands


PLAN = JobPlan("j1", Path("/work"), (HeldPeer("desk-2", EXEC_HOST, 4, 2**33),),
               (TaskRun("Simple", 1, None, "true"),))


async def test_events_follow_the_node_log_until_dagman_leaves_the_queue(tmp_path: Path) -> None:
    backend, _ = make_backend(tmp_path)
    backend.write_plan(PLAN)
    (backend.dag_dir / template.NODES_LOG).write_text(
        (LOGS / "osg-school-simple-dag.nodes.log").read_text()
    )
    # DAGMan's own log: a terminated event (the same real record) says it has finished.
    real = (LOGS / "osg-school-simple-dag.nodes.log").read_text()
    (backend.dag_dir / template.DAGMAN_LOG).write_text("005 (271101" + real.split("005 (271101")[1])
    got = [event async for event in backend.events()]
    assert got == [
        TaskStarted("Simple", 1, "desk-2"),
        TaskFinished("Simple", 1, "desk-2", run_s=5.0),
    ]


async def test_deploy_starts_condor_master_through_the_commands_seam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, commands = make_backend(tmp_path)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no HTCondor, even where it exists
    with pytest.raises(CommandFailed, match="condor_master: not found"):
        await backend.deploy(PLAN.peers)
    assert commands.history == [("condor_master", "-f")]
    key = backend.local_dir / template.POOL_KEY
    assert key.stat().st_mode & 0o777 == 0o600
    assert (backend.local_dir / "coordinator.config").read_text().startswith("# HTCondor")


async def test_a_peer_gets_a_startd_service_with_the_pool_key_as_a_secret(tmp_path: Path) -> None:
    backend, _ = make_backend(tmp_path)
    services = backend.context.services
    assert isinstance(services, RecordingServices)
    await backend.add_peer(PLAN.peers[0])
    [(peer, spec)] = services.started
    assert peer == "desk-2"
    assert spec.name == template.STARTD_SERVICE
    assert spec.argv[-2:] == ("condor_master", "-f")
    assert "NUM_CPUS = 4" in spec.files[template.STARTD_CONFIG]
    assert "{port:startd}" in spec.files[template.STARTD_CONFIG]
    assert spec.ports == ("startd",)
    assert spec.ready_file == template.STARTD_READY
    secret = spec.secrets[template.POOL_KEY]
    assert template.scramble_pool_key(secret).isascii()
    await backend.teardown()
    assert services.stopped == [("desk-2", template.STARTD_SERVICE)]


async def test_an_existing_pool_deploys_nothing(tmp_path: Path) -> None:
    backend, commands = make_backend(tmp_path, pool="pool.example.org:9618")
    await backend.deploy(PLAN.peers)
    assert commands.history == []
    assert backend.collector_address == "pool.example.org:9618"


async def test_submitting_without_htcondor_installed_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = make_backend(tmp_path)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CommandFailed, match="condor_dagman"):
        await asyncio.wait_for(backend.submit_plan(PLAN), 30)
