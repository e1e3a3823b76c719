"""The TXT schema: what peers and jobs advertise, and how untrusted TXT data is judged."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonjourgrid.discovery import (
    JobRecord,
    PeerRecord,
    format_job_table,
    format_peer_table,
    job_json,
    job_txt,
    parse_job,
    parse_peer,
    peer_json,
    peer_txt,
)
from bonjourgrid.discovery.txt import SEQ_KEY
from bonjourgrid.errors import ProtocolError

KEY = "rq:rA]Xh#5LE=3e^s*dK^Nj1ewBRcp<]R6o{<Q!+"  # 40 characters of Z85
assert len(KEY) == 40

PEER = PeerRecord(
    name="lab-12",
    addresses=("10.77.0.2", "192.168.1.12"),
    port=5555,
    state="idle",
    job=None,
    cpus=8,
    ram=8192,
    disk=20480,
    cost=0.25,
    arch="x86_64",
    os="linux",
    mw=("native", "condor"),
    key=KEY,
    grid="3f9a1c2b7d",
)
JOB = JobRecord(
    name="montage-small",
    addresses=("10.77.0.1",),
    port=6000,
    job="montage-small",
    state="running",
    tasks=12,
    done=5,
    failed=1,
    running=3,
    peers=4,
    user="alice",
    started=1_732_630_000.25,
)


def wire(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


def peer_props(**changes: bytes | None) -> dict[bytes, bytes | None]:
    props = wire(peer_txt(PEER))
    for key, value in changes.items():
        props[key.encode()] = value
    return props


def test_peer_round_trips_through_txt() -> None:
    parsed = parse_peer(PEER.name, PEER.addresses, PEER.port, wire(peer_txt(PEER)))
    assert parsed == PEER
    assert parsed.endpoint() == "tcp://10.77.0.2:5555"


def test_reserved_peer_with_extra_attributes_round_trips() -> None:
    peer = dataclasses.replace(
        PEER, state="reserved", job="montage-small", cost=1e-05, extra={"gpu": "a100"}
    )
    assert parse_peer(peer.name, peer.addresses, peer.port, wire(peer_txt(peer))) == peer


def test_insecure_peer_without_key_round_trips() -> None:
    peer = dataclasses.replace(PEER, key="", grid="insecure", mw=())
    assert parse_peer(peer.name, peer.addresses, peer.port, wire(peer_txt(peer))) == peer


def test_every_txt_entry_fits_in_255_bytes() -> None:
    for key, value in peer_txt(PEER).items():
        assert len(key.encode()) + 1 + len(value.encode()) < 255


def test_attrs_expose_every_txt_key_for_requirements() -> None:
    peer = dataclasses.replace(PEER, extra={"gpu": "a100"})
    attrs = peer.attrs()
    assert attrs["ram"] == "8192" and attrs["cpus"] == "8" and attrs["arch"] == "x86_64"
    assert attrs["gpu"] == "a100" and attrs["mw"] == "native,condor"


def test_sequence_number_and_key_case_are_not_part_of_the_record() -> None:
    props = {k.upper(): v for k, v in peer_props().items()}
    props[SEQ_KEY.encode()] = b"41"
    assert parse_peer(PEER.name, PEER.addresses, PEER.port, props) == PEER


def test_idle_peer_advertising_a_job_is_read_without_it() -> None:
    assert parse_peer("lab-12", ["10.0.0.2"], 5555, peer_props(job=b"old-job")) == (
        dataclasses.replace(PEER, addresses=("10.0.0.2",))
    )


def test_job_round_trips_through_txt() -> None:
    assert parse_job(JOB.name, JOB.addresses, JOB.port, wire(job_txt(JOB))) == JOB


MISSING = object()
MALFORMED_PEERS: list[tuple[str, dict[str, bytes | object | None]]] = [
    ("missing state", {"state": MISSING}),
    ("missing version", {"v": MISSING}),
    ("missing key", {"key": MISSING}),
    ("wrong version", {"v": b"2"}),
    ("boolean attribute for a number", {"cpus": None}),
    ("non-numeric cpus", {"cpus": b"eight"}),
    ("negative ram", {"ram": b"-1"}),
    ("signed cpus", {"cpus": b"+8"}),
    ("underscored number", {"disk": b"1_000"}),
    ("arabic-indic digits", {"cpus": "٨".encode()}),
    ("zero cpus", {"cpus": b"0"}),
    ("huge cpus", {"cpus": b"99999999"}),
    ("huge ram", {"ram": b"9999999999999999"}),
    ("NaN cost", {"cost": b"nan"}),
    ("infinite cost", {"cost": b"inf"}),
    ("overflowing cost", {"cost": b"1e999"}),
    ("negative cost", {"cost": b"-0.5"}),
    ("unknown state", {"state": b"sleeping"}),
    ("reserved without job", {"state": b"reserved"}),
    ("job that is no name", {"state": b"reserved", "job": b"a job; rm -rf"}),
    ("short key", {"key": b"abc"}),
    ("key outside Z85", {"key": b"~" * 40}),
    ("secure peer without key", {"key": b""}),
    ("grid with spaces", {"grid": b"my grid"}),
    ("arch with escape", {"arch": b"x86\x1b[31m"}),
    ("non-UTF-8 value", {"os": b"linux\xff"}),
    ("unprintable value", {"extra": b"a\x00b"}),
    ("value over 255 bytes", {"os": b"l" * 300}),
    ("bad middleware list", {"mw": b"native,,condor"}),
    ("non-ASCII key", {"gpü": b"1"}),
    ("record over 1300 bytes", {f"x{i}": b"v" * 200 for i in range(8)}),
]


@pytest.mark.parametrize(
    "changes", [c for _, c in MALFORMED_PEERS], ids=[n for n, _ in MALFORMED_PEERS]
)
def test_malformed_peer_txt_is_ignored(changes: dict[str, bytes | object | None]) -> None:
    props = wire(peer_txt(PEER))
    for key, value in changes.items():
        if value is MISSING:
            del props[key.encode()]
        else:
            assert value is None or isinstance(value, bytes)
            props[key.encode()] = value
    assert parse_peer("lab-12", ["10.0.0.2"], 5555, props) is None


@pytest.mark.parametrize(
    ("name", "addresses", "port"),
    [
        ("lab-12", [], 5555),  # nowhere to connect
        ("lab-12", ["::1"], 5555),
        ("lab-12", ["10.0.0.300"], 5555),
        ("lab-12", ["10.0.0.2"], 0),
        ("lab-12", ["10.0.0.2"], 70000),
        ("", ["10.0.0.2"], 5555),
        ("lab\x1b[2J", ["10.0.0.2"], 5555),
        ("x" * 64, ["10.0.0.2"], 5555),
    ],
)
def test_peer_with_bad_service_fields_is_ignored(
    name: str, addresses: list[str], port: int
) -> None:
    assert parse_peer(name, addresses, port, peer_props()) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"state": b"paused"},
        {"done": b"13"},  # more than the job's 12 tasks
        {"tasks": MISSING},
        {"started": b"nan"},
        {"user": b"al ice"},
        {"v": b"0"},
    ],
)
def test_malformed_job_txt_is_ignored(changes: dict[str, bytes | object]) -> None:
    props = wire(job_txt(JOB))
    for key, value in changes.items():
        if value is MISSING:
            del props[key.encode()]
        else:
            assert isinstance(value, bytes)
            props[key.encode()] = value
    assert parse_job(JOB.name, JOB.addresses, JOB.port, props) is None


def test_records_refuse_to_be_built_inconsistent() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        dataclasses.replace(PEER, state="reserved")
    with pytest.raises(ProtocolError, match="cost"):
        dataclasses.replace(PEER, cost=math.inf)
    with pytest.raises(ProtocolError, match="255"):
        dataclasses.replace(PEER, extra={"note": "n" * 260})


txt_bytes = st.binary(max_size=300)


@given(
    name=st.text(max_size=80),
    addresses=st.lists(st.text(max_size=20), max_size=3),
    port=st.integers(-10, 70000),
    properties=st.dictionaries(txt_bytes, st.none() | txt_bytes, max_size=20),
)
def test_parse_peer_never_raises_on_arbitrary_input(
    name: str, addresses: list[str], port: int, properties: dict[bytes, bytes | None]
) -> None:
    parse_peer(name, addresses, port, properties)
    parse_job(name, addresses, port, properties)


@given(
    key=st.sampled_from(sorted(peer_txt(dataclasses.replace(PEER, state="reserved", job="j")))),
    value=st.none() | st.binary(max_size=300) | st.text(max_size=40).map(str.encode),
)
def test_one_corrupted_field_never_raises(key: str, value: bytes | None) -> None:
    props = wire(peer_txt(dataclasses.replace(PEER, state="reserved", job="j")))
    props[key.encode()] = value
    peer = parse_peer("lab-12", ["10.0.0.2"], 5555, props)
    assert peer is None or isinstance(peer, PeerRecord)


# --- the human and JSON forms -----------------------------------------------------------


def test_peer_table_is_readable() -> None:
    busy = dataclasses.replace(PEER, name="lab-3", state="reserved", job="montage-small")
    lines = format_peer_table([busy, PEER]).splitlines()
    assert lines[0].split() == [
        *("NAME", "STATE", "JOB", "CPUS", "RAM", "DISK", "COST"),
        *("ARCH/OS", "ADDRESS", "GRID"),
    ]
    assert lines[2].split() == [
        *("lab-12", "idle", "-", "8", "8.0", "GiB", "20.0", "GiB", "0.25"),
        *("x86_64/linux", "10.77.0.2:5555", "3f9a1c2b"),
    ]
    assert "montage-small" in lines[1]


def test_empty_tables_say_so() -> None:
    assert format_peer_table([]) == "no peers found"
    assert format_job_table([]) == "no jobs found"


def test_job_table_shows_progress() -> None:
    lines = format_job_table([JOB]).splitlines()
    assert lines[0].split()[:3] == ["JOB", "STATE", "PROGRESS"]
    assert lines[1].split() == [
        *("montage-small", "running", "5/12", "3", "1", "4", "alice", "10.77.0.1:6000")
    ]


def test_json_forms_carry_every_field() -> None:
    peer = json.loads(json.dumps(peer_json(PEER)))
    assert peer["ram"] == 8192 and peer["disk"] == 20480 and peer["mw"] == ["native", "condor"]
    assert set(peer) >= {f.name for f in dataclasses.fields(PeerRecord)}
    job = json.loads(json.dumps(job_json(JOB)))
    assert job["done"] == 5 and set(job) == {f.name for f in dataclasses.fields(JobRecord)}
