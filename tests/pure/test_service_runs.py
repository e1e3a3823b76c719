"""Service runs, pure: what a `service_start` may carry, the placeholders a worker fills in,
and how the peer's state machine admits, reports and stops them with the lease."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bonjourgrid import protocol as p
from bonjourgrid import wire
from bonjourgrid.errors import ProtocolError
from bonjourgrid.worker import core
from bonjourgrid.worker.core import MAX_SERVICES, PeerState, WorkerCore
from bonjourgrid.worker.service_run import substitute

A, B = b"coord-a", b"coord-b"

START: dict[str, Any] = {
    "job": "job-1",
    "name": "munge",
    "argv": ["munged", "-F", "--socket={dir}/munge.socket", "--listen={host}:{port:m}"],
    "files": {"etc/munge.conf": "port={port:m}\n{not a placeholder}\n"},
    "secrets": {"munge.key": b"\x00" * 1024},
    "ports": ["m"],
    "env": {"MUNGE_DIR": "{dir}"},
    "ready_file": "munge.socket",
}


def decode_start(**changes: Any) -> p.ServiceStart:
    message = wire.decode(wire.pack_raw("service_start", **{**START, **changes}))
    assert isinstance(message, p.ServiceStart)
    return message


def test_a_service_start_round_trips_with_its_files_secrets_and_ports() -> None:
    message = decode_start()
    assert message.argv[0] == "munged" and message.ports == ("m",)
    assert message.secrets == {"munge.key": b"\x00" * 1024}
    assert wire.decode(wire.encode(message)) == message


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"name": "../etc"}, "is not a service name"),
        ({"name": ""}, "is not a service name"),
        ({"argv": []}, "is empty: give the daemon's command line"),
        ({"argv": ["", "-F"]}, "starts with an empty word"),
        ({"argv": ["munged", "a\x00b"]}, "NUL"),
        ({"argv": ["x"] * 2000}, "more than 1024 items"),
        ({"files": {"/etc/passwd": "x"}}, "would escape the task directory"),
        ({"files": {"../up": "x"}}, "would escape the task directory"),
        ({"files": {"a//b": "x"}}, "is not normalized"),
        ({"files": {"a": 3}}, "must be a string"),
        ({"secrets": {"k": "text"}}, "must be bytes"),
        ({"secrets": {"k": b"x" * 70_000}}, "more than 65536"),
        ({"secrets": {f"k{i}": b"x" for i in range(65)}}, "more than 64 files"),
        ({"secrets": {"etc/munge.conf": b"x"}}, "is both a config file and a secret"),
        ({"ports": ["m", "m"]}, "names a port twice"),
        ({"ports": ["1st"]}, "is not a port name"),
        ({"ports": []}, "names {port:m} but asks for no port 'm'"),
        ({"env": {"X": "{port:other}"}}, "names {port:other} but asks for no port 'other'"),
        ({"ready_file": "../ready"}, "would escape the task directory"),
        ({"ready_file": "munge.key"}, "is one of the files sent with it"),
    ],
)
def test_a_bad_service_start_is_refused_with_the_reason(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_start(**changes)
    assert says in str(err.value)


def test_a_sender_cannot_build_a_service_start_naming_an_undeclared_port() -> None:
    with pytest.raises(ProtocolError, match=r"names \{port:http\} but asks for no port"):
        p.ServiceStart("job-1", "web", ("python3", "-m", "http.server", "{port:http}"))


def test_service_replies_are_checked() -> None:
    with pytest.raises(ProtocolError, match=r"out of range 1\.\.65535"):
        wire.decode(wire.pack_raw("service_up", job="j", name="s", ports={"a": 0}, directory="/"))
    with pytest.raises(ProtocolError, match="must be true or false"):
        wire.decode(
            wire.pack_raw("service_exited", job="j", name="s", exit_code=0, stopped=1, log_tail="")
        )


def test_placeholders_are_substituted_and_other_braces_left_alone() -> None:
    text = '{dir}/x {host}:{port:http} {"json": {port}} {port:} {dir'
    assert substitute(text, "/d", "10.0.0.2", {"http": 8080}) == (
        '/d/x 10.0.0.2:8080 {"json": {port}} {port:} {dir'
    )


# -- the peer's state machine ----------------------------------------------------------------


@pytest.fixture
def peer() -> Iterator[WorkerCore]:
    # The owner's return vacates at once: these tests are about what ends a lease.
    w = WorkerCore(cpus=1, data_port=7000, vacate_after_s=0)
    w.handle(core.ReserveRequested(A, "job-1", 10.0, "host"), 0.0)
    yield w
    w.validate_state()


def sent(out: list[core.Instruction]) -> list[tuple[bytes, p.Message]]:
    return [(i.client, i.message) for i in out if isinstance(i, core.Send)]


def start(w: WorkerCore, name: str = "munge", client: bytes = A) -> list[core.Instruction]:
    return w.handle(core.ServiceStartRequested(client, "job-1", name, object()), 1.0)


def up(w: WorkerCore, name: str = "munge") -> list[core.Instruction]:
    report = p.ServiceUp("job-1", name, {"m": 5000}, "/d")
    return w.handle(core.ServiceIsUp("job-1", name, report), 1.0)


def ended(w: WorkerCore, name: str = "munge", stopped: bool = False) -> list[core.Instruction]:
    report = p.ServiceExited("job-1", name, -15 if stopped else 1, stopped, "log")
    return w.handle(core.ServiceEnded("job-1", name, report), 2.0)


def test_the_holder_starts_a_service_and_hears_when_it_is_up(peer: WorkerCore) -> None:
    out = start(peer)
    assert next(i for i in out if isinstance(i, core.StartService)).name == "munge"
    assert sent(out) == []  # nothing until it is ready
    assert sent(up(peer)) == [(A, p.ServiceUp("job-1", "munge", {"m": 5000}, "/d"))]
    assert peer.services == {"munge": "up"}


def test_only_the_holder_may_start_or_stop_a_service(peer: WorkerCore) -> None:
    out = start(peer, client=B)
    assert [m.TYPE for _, m in sent(out)] == ["denied"] and peer.services == {}
    start(peer)
    out = peer.handle(core.ServiceStopRequested(B, "job-1", "munge"), 1.0)
    assert [m.TYPE for _, m in sent(out)] == ["denied"] and peer.services == {"munge": "starting"}


def test_a_name_already_running_and_too_many_services_are_refused(peer: WorkerCore) -> None:
    start(peer)
    ((_, reply),) = sent(start(peer))
    assert isinstance(reply, p.ServiceFailed) and "already runs here" in reply.reason
    for i in range(MAX_SERVICES - 1):
        start(peer, f"s{i}")
    ((_, reply),) = sent(start(peer, "one-more"))
    assert isinstance(reply, p.ServiceFailed) and f"{MAX_SERVICES} services" in reply.reason


def test_services_take_no_task_slot(peer: WorkerCore) -> None:
    start(peer)
    out = peer.handle(core.RunRequested(A, "job-1", "t", 1, {}), 1.0)
    assert any(isinstance(i, core.StartTask) for i in out)


def test_a_service_that_fails_to_start_is_reported_and_forgotten(peer: WorkerCore) -> None:
    start(peer)
    out = peer.handle(core.ServiceStartFailed("job-1", "munge", "munged: not found"), 1.0)
    assert sent(out) == [(A, p.ServiceFailed("job-1", "munge", "munged: not found"))]
    assert peer.services == {}


def test_a_stop_is_answered_once_its_process_group_is_gone(peer: WorkerCore) -> None:
    start(peer)
    up(peer)
    out = peer.handle(core.ServiceStopRequested(A, "job-1", "munge"), 1.0)
    assert out == [core.StopService("job-1", "munge", "stopped by its coordinator")]
    assert peer.handle(core.ServiceStopRequested(A, "job-1", "munge"), 1.0) == []  # once
    assert up(peer) == []  # a late report of the stopped run is dropped
    ((_, reply),) = sent(ended(peer, stopped=True))
    assert isinstance(reply, p.ServiceExited) and reply.stopped
    assert peer.services == {}


def test_stopping_a_service_that_is_not_running_says_so(peer: WorkerCore) -> None:
    ((_, reply),) = sent(peer.handle(core.ServiceStopRequested(A, "job-1", "munge"), 1.0))
    assert isinstance(reply, p.ServiceFailed) and "no service named 'munge'" in reply.reason


def test_a_service_that_dies_on_its_own_is_reported(peer: WorkerCore) -> None:
    start(peer)
    up(peer)
    ((_, reply),) = sent(ended(peer))
    assert isinstance(reply, p.ServiceExited) and not reply.stopped and reply.exit_code == 1
    assert peer.services == {}


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (core.ReleaseRequested(A, "job-1"), "released by its coordinator"),
        (core.Tick(), "lease expired: its coordinator is gone"),
        (core.OwnerActivity(True), "the owner came back"),
    ],
)
def test_whatever_ends_the_lease_stops_its_services(
    peer: WorkerCore, event: core.Event, why: str
) -> None:
    start(peer, "munge")
    up(peer, "munge")
    start(peer, "slurmd")
    out = peer.handle(event, 11.0)
    stops = [i for i in out if isinstance(i, core.StopService)]
    assert stops == [core.StopService("job-1", n, why) for n in ("munge", "slurmd")]
    assert peer.services == {} and peer.state is not PeerState.RESERVED
    # What the stopped runs report afterwards goes nowhere: the lease is gone.
    assert ended(peer, "munge", stopped=True) == []


def test_a_malformed_service_message_still_says_which_service_it_is_about() -> None:
    frame = wire.pack_raw("service_start", **{**START, "argv": []})
    assert p.service_of(frame) == ("service_start", "job-1", "munge")
    assert p.service_of(wire.pack_raw("service_start", job="job-1", name="../x")) is None
    assert p.service_of(wire.pack_raw("run", job="job-1", name="munge")) is None
