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


# -- what a reservation owns: the job's keys, pins and prefetches -------------------------------


def test_a_reservation_starts_its_job_before_it_is_granted(peer: WorkerCore) -> None:
    out = peer.handle(core.ReserveRequested(A, "job1", 10.0, "host", keys="job1-keys"), 0.0)
    started = out.index(core.JobStarted("job1", "job1-keys"))
    granted = next(i for i, x in enumerate(out) if isinstance(x, core.Send))
    assert started < granted  # the job's key opens the data server before anyone learns of it
    retried = peer.handle(core.ReserveRequested(A, "job1", 10.0, "host", keys="other"), 1.0)
    assert not any(isinstance(i, core.JobStarted) for i in retried)


@pytest.mark.parametrize(
    ("event", "now"),
    [
        (core.ReleaseRequested(A, "job1"), 1.0),
        (core.Tick(), 10.0),
        (core.OwnerActivity(active=True), 1.0),
    ],
    ids=["release", "lease-expiry", "preemption"],
)
def test_every_end_of_a_reservation_ends_its_job(
    peer: WorkerCore, event: core.Event, now: float
) -> None:
    reserve(peer, A, "job1")
    ended = [i for i in peer.handle(event, now) if isinstance(i, core.JobEnded)]
    assert [e.job for e in ended] == ["job1"]


def test_only_the_holder_may_prefetch(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    assert peer.handle(core.PrefetchRequested(A, "job1", ("f",)), 1.0) == [
        core.StartPrefetch("job1", ("f",))
    ]
    for stranger in (core.PrefetchRequested(B, "job1", ()), core.PrefetchRequested(B, "job2", ())):
        assert sent(peer.handle(stranger, 1.0)) == [(B, "denied")]


def test_a_prefetch_is_reported_to_its_job_while_the_job_holds_the_peer(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    report = {"job": "job1", "digest": "d", "source": "coordinator", "bytes": 3}
    assert sent(peer.handle(core.PrefetchFinished("job1", report), 1.0)) == [(A, "prefetched")]
    peer.handle(core.ReleaseRequested(A, "job1"), 2.0)
    reserve(peer, B, "job2", now=3.0)
    assert peer.handle(core.PrefetchFinished("job1", report), 4.0) == []  # job1 is gone
