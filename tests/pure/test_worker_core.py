"""The peer state machine: reservations are exclusive, leases expire, owners come first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonjourgrid import protocol
from bonjourgrid.cache.store import FileRef
from bonjourgrid.worker import core
from bonjourgrid.worker.core import PeerState, WorkerCore

A, B = b"coord-a", b"coord-b"


@pytest.fixture
def peer() -> Iterator[WorkerCore]:
    w = WorkerCore(cpus=2, data_port=7000)
    yield w
    w.validate_state()


def sent(instructions: list[core.Instruction]) -> list[tuple[bytes, str]]:
    return [(i.client, i.message.TYPE) for i in instructions if isinstance(i, core.Send)]


def messages(instructions: list[core.Instruction]) -> list[protocol.Message]:
    return [i.message for i in instructions if isinstance(i, core.Send)]


def done(task: str, attempt: int = 1) -> protocol.TaskDone:
    return protocol.TaskDone("job1", task, attempt, 0, (), "", "", 0.0, 0.0, 0, (), 0)


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
    assert "job1" in out[0].message.reason  # type: ignore[union-attr]
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
    assert messages(refused) == [protocol.Refused("job1", "t3", 1, "all 2 slots busy")]
    assert set(peer.running) == {"t1", "t2"}


def test_a_finished_task_is_reported_to_its_coordinator_once(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    report = done("t1")
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


def test_the_owner_coming_back_preempts_the_job_at_once_with_no_vacate_time() -> None:
    peer = WorkerCore(cpus=2, data_port=7000, vacate_after_s=0)
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    out = peer.handle(core.OwnerActivity(active=True), 4.0)
    assert any(isinstance(i, core.StopTask) for i in out)
    assert sent(out) == [(A, "preempted")]  # the coordinator reschedules at once
    assert peer.state is PeerState.BUSY
    assert sent(reserve(peer, B, "job2")) == [(B, "denied")]
    peer.handle(core.OwnerActivity(active=False), 5.0)
    assert peer.state is PeerState.IDLE
    peer.validate_state()


# -- suspend, then vacate -----------------------------------------------------------------------


def test_the_owner_coming_back_suspends_the_runs_and_keeps_the_lease(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    peer.handle(core.TaskStarted("job1", "t1", 1), 1.0)
    out = peer.handle(core.OwnerActivity(active=True), 4.0)
    assert core.SuspendTasks("job1") in out
    assert not any(isinstance(i, core.StopTask | core.JobEnded) for i in out)
    assert core.Advertise(PeerState.BUSY, None) in out  # the owner's, as the LAN sees it
    (news,) = messages(out)
    assert isinstance(news, protocol.Suspension) and news.state == "suspended"
    assert peer.state is PeerState.SUSPENDED
    # The lease holds: heartbeats are answered and list the suspended run; others are denied.
    (ack,) = messages(peer.handle(core.HeartbeatReceived(A, "job1", 10.0), 8.0))
    assert ack == protocol.HeartbeatAck("job1", (("t1", 1),))
    assert sent(reserve(peer, B, "job2", now=9.0)) == [(B, "denied")]
    assert peer.handle(core.Tick(), 17.0) == []  # renewed at 8 s: expires at 18 s


def test_the_owner_leaving_within_vacate_after_resumes_the_runs(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    peer.handle(core.OwnerActivity(active=True), 2.0)
    out = peer.handle(core.OwnerActivity(active=False), 5.0)
    assert core.ResumeTasks("job1") in out
    assert core.Advertise(PeerState.RESERVED, "job1") in out
    assert [m.state for m in messages(out) if isinstance(m, protocol.Suspension)] == ["resumed"]
    assert peer.state is PeerState.RESERVED and peer.running == {"t1": 1}


def test_an_owner_who_stays_vacate_after_gets_the_peer_back() -> None:
    peer = WorkerCore(cpus=2, data_port=7000, vacate_after_s=30.0)
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    peer.handle(core.OwnerActivity(active=True), 2.0)
    peer.handle(core.HeartbeatReceived(A, "job1", 60.0), 20.0)
    assert peer.handle(core.Tick(), 31.9) == []
    out = peer.handle(core.Tick(), 32.0)
    assert any(isinstance(i, core.StopTask) and i.task == "t1" for i in out)
    assert sent(out) == [(A, "preempted")]  # the coordinator runs it elsewhere, no retry used
    assert "vacated" in messages(out)[0].reason  # type: ignore[attr-defined]
    assert peer.state is PeerState.BUSY and peer.lease is None
    peer.validate_state()


def test_a_suspended_peer_released_or_expired_stays_its_owners(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    peer.handle(core.OwnerActivity(active=True), 1.0)
    assert sent(peer.handle(core.ReleaseRequested(A, "job1"), 2.0)) == [(A, "released")]
    assert peer.state is PeerState.BUSY


def test_a_run_that_comes_while_suspended_is_taken_not_refused(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    peer.handle(core.OwnerActivity(active=True), 1.0)
    out = run(peer, A, "job1", "t1")  # refusing it would cost the task an attempt
    assert isinstance(out[0], core.StartTask)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["reserve", "run", "start", "finish", "owner", "away", "beat", "release", "tick"]
            ),
            st.sampled_from(["t1", "t2", "t3"]),
            st.floats(0.0, 20.0),
        ),
        max_size=40,
    ),
    st.sampled_from([0.0, 5.0, 600.0]),
)
def test_random_owners_and_jobs_keep_the_peer_consistent(
    steps: list[tuple[str, str, float]], vacate_after_s: float
) -> None:
    peer = WorkerCore(cpus=2, data_port=7000, vacate_after_s=vacate_after_s)
    now = 0.0
    for what, task, wait in steps:
        now += wait
        event: core.Event = {
            "reserve": core.ReserveRequested(A, "job1", 10.0, "host"),
            "run": core.RunRequested(A, "job1", task, 1, {}),
            "start": core.TaskStarted("job1", task, 1),
            "finish": core.TaskFinished("job1", task, 1, done(task)),
            "owner": core.OwnerActivity(active=True),
            "away": core.OwnerActivity(active=False),
            "beat": core.HeartbeatReceived(A, "job1", 10.0),
            "release": core.ReleaseRequested(A, "job1"),
            "tick": core.Tick(),
        }[what]
        if isinstance(event, core.OwnerActivity) and event.active == peer.owner_active:
            continue  # the daemon reports changes only
        before = peer.state
        out = peer.handle(event, now)
        peer.validate_state()
        if before is PeerState.RESERVED and peer.state is PeerState.SUSPENDED:
            assert core.SuspendTasks("job1") in out
        if before is PeerState.SUSPENDED and peer.state is PeerState.RESERVED:
            assert core.ResumeTasks("job1") in out
        if peer.state is PeerState.SUSPENDED:  # never longer than vacate_after past a tick
            assert peer.suspended_since is not None
            if isinstance(event, core.Tick):
                assert now < peer.suspended_since + vacate_after_s


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
def test_every_end_of_a_reservation_ends_its_job(event: core.Event, now: float) -> None:
    peer = WorkerCore(cpus=2, data_port=7000, vacate_after_s=0)
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
    report = protocol.Prefetched("job1", "ab" * 32, "coordinator", 3, 0.1, "")
    assert sent(peer.handle(core.PrefetchFinished("job1", report), 1.0)) == [(A, "prefetched")]
    peer.handle(core.ReleaseRequested(A, "job1"), 2.0)
    reserve(peer, B, "job2", now=3.0)
    assert peer.handle(core.PrefetchFinished("job1", report), 4.0) == []  # job1 is gone


# -- a run is acknowledged, refused with a reason, or assembled from its parts -----------------


def test_a_started_run_is_acknowledged_and_listed_in_heartbeat_acks(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    assert isinstance(run(peer, A, "job1", "t1", attempt=2)[0], core.StartTask)
    ack = peer.handle(core.HeartbeatReceived(A, "job1", 10.0), 1.0)
    assert messages(ack) == [protocol.HeartbeatAck("job1", ())]  # not started yet
    out = peer.handle(core.TaskStarted("job1", "t1", 2), 1.0)
    assert messages(out) == [protocol.Started("job1", "t1", 2)]
    ack = peer.handle(core.HeartbeatReceived(A, "job1", 10.0), 2.0)
    assert messages(ack) == [protocol.HeartbeatAck("job1", (("t1", 2),))]
    peer.handle(core.TaskFinished("job1", "t1", 2, done("t1", 2)), 3.0)
    ack = peer.handle(core.HeartbeatReceived(A, "job1", 10.0), 4.0)
    assert messages(ack) == [protocol.HeartbeatAck("job1", ())]


def test_a_run_that_cannot_start_is_refused_and_frees_its_slot(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    out = peer.handle(core.StartFailed("job1", "t1", 1, "a path is listed twice"), 1.0)
    assert messages(out) == [protocol.Refused("job1", "t1", 1, "a path is listed twice")]
    assert not peer.running
    assert peer.handle(core.TaskStarted("job1", "t1", 1), 1.0) == []  # too late: forgotten


def test_an_unreadable_run_is_refused_to_the_holder_and_denied_to_others(
    peer: WorkerCore,
) -> None:
    reserve(peer, A, "job1")
    out = peer.handle(core.RunUnreadable(A, "job1", "t1", 3, "command over 65536"), 1.0)
    assert messages(out) == [protocol.Refused("job1", "t1", 3, "command over 65536")]
    assert sent(peer.handle(core.RunUnreadable(B, "job1", "t1", 3, "x"), 1.0)) == [(B, "denied")]
    assert not peer.running


def test_a_run_in_parts_starts_when_its_last_part_is_in(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    assert peer.handle(core.RunRequested(A, "job1", "t1", 1, "head", parts=2), 1.0) == []
    assert peer.running == {"t1": 1}  # the slot is taken while the parts come
    assert peer.handle(core.RunPartReceived(A, "job1", "t1", 1, 1, "p1"), 1.0) == []
    out = peer.handle(core.RunPartReceived(A, "job1", "t1", 1, 2, "p2"), 1.0)
    assert out == [core.StartTask("job1", "t1", 1, "head", ("p1", "p2"))]


@pytest.mark.parametrize(
    "part",
    [
        core.RunPartReceived(A, "job1", "t1", 1, 2, "p2"),  # part 1 skipped
        core.RunPartReceived(A, "job1", "t1", 2, 1, "p1"),  # another attempt
        core.RunPartReceived(A, "job1", "t9", 1, 1, "p1"),  # no such run
    ],
    ids=["out-of-order", "wrong-attempt", "unknown-task"],
)
def test_a_part_out_of_place_is_refused(peer: WorkerCore, part: core.RunPartReceived) -> None:
    reserve(peer, A, "job1")
    peer.handle(core.RunRequested(A, "job1", "t1", 1, "head", parts=2), 1.0)
    out = peer.handle(part, 1.0)
    assert [type(m) for m in messages(out)] == [protocol.Refused]
    assert not any(isinstance(i, core.StartTask) for i in out)
    assert sent(peer.handle(core.RunPartReceived(B, "job1", "t1", 1, 1, "p1"), 1.0)) == [
        (B, "denied")
    ]


def test_the_end_of_a_lease_drops_runs_being_assembled(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    peer.handle(core.RunRequested(A, "job1", "t1", 1, "head", parts=2), 1.0)
    peer.handle(core.ReleaseRequested(A, "job1"), 2.0)
    assert not peer.assembling and not peer.running


def test_a_refused_started_run_is_stopped(peer: WorkerCore) -> None:
    reserve(peer, A, "job1")
    run(peer, A, "job1", "t1")
    peer.handle(core.TaskStarted("job1", "t1", 1), 1.0)
    out = peer.handle(core.RunUnreadable(A, "job1", "t1", 1, "a malformed duplicate"), 2.0)
    assert any(isinstance(i, core.StopTask) for i in out)
    assert not peer.running


def test_the_reports_of_a_run_are_typed_messages() -> None:
    ref = FileRef("cd" * 32, 1)
    report = protocol.TaskDone("job1", "t", 1, 0, (("o", ref),), "", "", 0.0, 0.0, 0, (), 0)
    assert protocol.from_fields(protocol.TaskDone, protocol.as_map(report)) == report
