"""The peer state machine: reservations are exclusive, leases expire, owners come first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bonjourgrid.worker import core
from bonjourgrid.worker.core import PeerState, WorkerCore

A, B = b"coord-a", b"coord-b"


@pytest.fixture
def peer() -> Iterator[WorkerCore]:
    w = WorkerCore(cpus=2, data_port=7000)
    yield w
    w.validate_state()


def sent(instructions: list[core.Instruction]) -> list[tuple[bytes, str]]:
    return [(i.client, i.msg_type) for i in instructions if isinstance(i, core.Send)]


def reserve(w: WorkerCore, client: bytes, job: str, now: float = 0.0) -> list[core.Instruction]:
    return w.handle(core.ReserveRequested(client, job, 10.0, "host"), now)


def run(
    w: WorkerCore, client: bytes, job: str, task: str, attempt: int = 1
) -> list[core.Instruction]:
    return w.handle(core.RunRequested(client, job, task, attempt, {"command": "true"}), 1.0)


def test_an_idle_peer_grants_a_reservation_and_advertises_it(peer: WorkerCore) -> None:
    out = reserve(peer, A, "job1")
    assert sent(out) == [(A, "reserved")]
    assert core.Advertise(PeerState.RESERVED, "job1") in out
    assert peer.state is PeerState.RESERVED


def test_two_coordinators_never_hold_the_same_peer(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    out = reserve(peer, B, "job2")
    assert sent(out) == [(B, "denied")]
    assert "job1" in out[0].fields["reason"]  # type: ignore[union-attr]
    assert peer.lease is not None and peer.lease.job == "job1"


def test_a_retried_reserve_from_the_holder_is_granted_again(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    assert sent(reserve(peer, A, "job1", now=5.0)) == [(A, "reserved")]


def test_the_lease_expires_without_heartbeats_and_stops_the_tasks(peer: WorkerCore) -> None:
    reserve(peer, A, "job1", now=0.0)
    run(peer, A, "job1", "t1")
    assert peer.handle(core.Tick(), 9.9) == []
    out = peer.handle(core.Tick(), 10.0)
    assert core.StopTask("job1", "t1", 1, "lease expired: its coordinator is gone") in out
    assert core.Advertise(PeerState.IDLE, None) in out
    assert peer.state is PeerState.IDLE and not peer.running


def test_heartbeats_renew_the_lease(peer: WorkerCore) -> None:
    reserve(peer, A, "job1", now=0.0)
    assert sent(peer.handle(core.HeartbeatReceived(A, "job1", 10.0), 8.0)) == [(A, "heartbeat_ack")]
    assert peer.handle(core.Tick(), 15.0) == []
    assert peer.state is PeerState.RESERVED


def test_a_stranger_cannot_renew_release_or_run(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    for event in (
        core.HeartbeatReceived(B, "job1", 10.0),
        core.ReleaseRequested(B, "job1"),
        core.RunRequested(B, "job1", "t", 1, {}),
    ):
        assert sent(peer.handle(event, 1.0)) == [(B, "denied")]
    assert peer.state is PeerState.RESERVED and not peer.running


def test_a_peer_runs_at_most_cpus_tasks(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    assert isinstance(run(peer, A, "job1", "t1")[0], core.StartTask)
    assert isinstance(run(peer, A, "job1", "t2")[0], core.StartTask)
    refused = run(peer, A, "job1", "t3")
    assert sent(refused) == [(A, "task_done")]
    assert "slots busy" in refused[0].fields["error"]  # type: ignore[union-attr]
    assert set(peer.running) == {"t1", "t2"}


def test_a_finished_task_is_reported_to_its_coordinator_once(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    report = {"task": "t1", "exit_code": 0}
    assert sent(peer.handle(core.TaskFinished("job1", "t1", 1, report), 2.0)) == [(A, "task_done")]
    assert peer.handle(core.TaskFinished("job1", "t1", 1, report), 2.0) == []


def test_release_stops_tasks_and_makes_the_peer_idle(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    out = peer.handle(core.ReleaseRequested(A, "job1"), 3.0)
    assert any(isinstance(i, core.StopTask) for i in out)
    assert sent(out) == [(A, "released")]
    assert peer.state is PeerState.IDLE
    assert sent(reserve(peer, B, "job2")) == [(B, "reserved")]


def test_the_owner_coming_back_preempts_the_job(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    out = peer.handle(core.OwnerActivity(active=True), 4.0)
    assert any(isinstance(i, core.StopTask) for i in out)
    assert sent(out) == [(A, "preempted")]  # the coordinator reschedules at once
    assert peer.state is PeerState.BUSY
    assert sent(reserve(peer, B, "job2")) == [(B, "denied")]
    peer.handle(core.OwnerActivity(active=False), 5.0)
    assert peer.state is PeerState.IDLE
