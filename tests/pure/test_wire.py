"""The wire boundary: every message round-trips, and anything malformed is a ProtocolError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonjourgrid import wire
from bonjourgrid.errors import ProtocolError

# One valid value per type a schema may ask for.
_SAMPLE: dict[Any, Any] = {
    str: "job-42",
    int: 7,
    (int, float): 2.5,
    list: [["in.txt", "ab" * 32, 3, []]],
    dict: {"OMP_NUM_THREADS": "1"},
    bytes: b"\x00\xffdata",
}


def sample(msg_type: str) -> dict[str, Any]:
    return {field: _SAMPLE[kind] for field, kind in wire.SCHEMAS[msg_type].items()}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_the_protocol_has_the_messages_of_both_conversations() -> None:
    control = {"reserve", "heartbeat", "release", "run", "cancel", "prefetch", "probe"}
    replies = {"reserved", "denied", "heartbeat_ack", "released", "preempted", "task_done", "error"}
    replies |= {"prefetched", "holding"}
    data = {"get", "chunk", "missing"}
    jobctl = {"cancel_job", "cancelling"}  # `bgrid cancel` -> coordinator
    assert set(wire.SCHEMAS) == control | replies | data | jobctl


@pytest.mark.parametrize("msg_type", sorted(wire.SCHEMAS))
def test_every_message_type_round_trips(msg_type: str) -> None:
    fields = sample(msg_type)
    msg = wire.decode(wire.encode(msg_type, **fields))
    assert msg == {"v": wire.PROTOCOL_VERSION, "t": msg_type, **fields}


def test_an_int_is_accepted_where_a_number_is_expected() -> None:
    msg = wire.decode(wire.encode("heartbeat", job="j", lease_s=30))
    assert msg["lease_s"] == 30


def test_a_full_chunk_fits_a_data_frame() -> None:
    frame = wire.encode("chunk", digest="ab" * 32, offset=0, data=bytes(wire.CHUNK_SIZE))
    assert len(frame) <= wire.MAX_DATA_FRAME
    assert len(wire.decode(frame, limit=wire.MAX_DATA_FRAME)["data"]) == wire.CHUNK_SIZE


def _with(msg_type: str, **changes: Any) -> bytes:
    msg = {"v": 1, "t": msg_type, **sample(msg_type), **changes}
    return pack({k: v for k, v in msg.items() if v is not _DROP})


_DROP = object()
_RESERVE = wire.encode(
    "reserve", job="j", lease_s=10.0, coordinator="host", job_public="", job_secret=""
)

MALFORMED: dict[str, bytes] = {
    "empty frame": b"",
    "garbage": b"\xc1\xc1\xc1",
    "text": b"hello, worker",
    "truncated frame": _RESERVE[:-3],
    "trailing bytes": _RESERVE + b"\x00",
    "invalid utf-8 in a string": b"\x81\xa1v\xa2\xff\xfe",
    "non-string map key": pack({1: 1, "t": "release", "job": "j"}),
    "a list, not a map": pack([1, "release", "j"]),
    "a string, not a map": pack("release"),
    "nil, not a map": pack(None),
    "no version": _with("release", v=_DROP),
    "version 2": _with("release", v=2),
    "version as text": _with("release", v="1"),
    "no type": _with("release", t=_DROP),
    "unknown type": _with("release", t="reboot"),
    "type not a string": _with("release", t=3),
    "missing field": _with("reserve", coordinator=_DROP),
    "str field holds int": _with("release", job=5),
    "int field holds str": _with("reserved", data_port="5555"),
    "int field holds float": _with("run", attempt=1.0),
    "int field holds bool": _with("run", attempt=True),
    "number field holds bool": _with("reserve", lease_s=True),
    "number field holds nil": _with("heartbeat", lease_s=None),
    "list field holds a map": _with("run", inputs={"a": 1}),
    "map field holds a list": _with("run", env=[["A", "1"]]),
    "bytes field holds str": _with("chunk", data="text"),
    "string over MAX_STRING": _with("release", job="x" * (wire.MAX_STRING + 1)),
    "list over MAX_LIST": _with("run", outputs=["o"] * (wire.MAX_LIST + 1)),
    "deeply nested": b"\x91" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(frame)


def test_an_oversized_frame_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ProtocolError, match="over the 4096-byte limit"):
        wire.decode(_with("release", job="x" * 5000), limit=4096)
    with pytest.raises(ProtocolError, match="limit"):
        wire.decode(b"\x00" * (wire.MAX_CONTROL_FRAME + 1))


def test_a_chunk_bigger_than_a_data_frame_is_refused() -> None:
    frame = wire.encode("chunk", digest="ab" * 32, offset=0, data=bytes(wire.MAX_DATA_FRAME))
    with pytest.raises(ProtocolError):
        wire.decode(frame, limit=wire.MAX_DATA_FRAME)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_a_version_of_the_wrong_type_is_refused(version: object) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(_with("release", v=version))


# -- properties ------------------------------------------------------------------------------

_MSGPACK_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_MSGPACK_VALUES = st.recursive(
    _MSGPACK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELD_NAMES = sorted({field for schema in wire.SCHEMAS.values() for field in schema})
_FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fields_have_their_types(msg: dict[str, Any]) -> None:
    for field, kind in wire.SCHEMAS[msg["t"]].items():
        assert isinstance(msg[field], kind) and not isinstance(msg[field], bool)


@_FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_only_protocol_errors(frame: bytes) -> None:
    try:
        msg = wire.decode(frame)
    except ProtocolError:
        return
    _fields_have_their_types(msg)


@_FAST
@given(st.integers(0, len(_RESERVE) - 1), st.integers(0, 255))
def test_a_valid_frame_with_one_byte_changed_never_breaks_decode(at: int, byte: int) -> None:
    frame = bytearray(_RESERVE)
    frame[at] = byte
    try:
        msg = wire.decode(bytes(frame))
    except ProtocolError:
        return
    _fields_have_their_types(msg)


@_FAST
@given(st.sampled_from(sorted(wire.SCHEMAS)), st.data())
def test_any_map_of_version_1_and_a_known_type_decodes_or_raises_protocol_error(
    msg_type: str, data: st.DataObject
) -> None:
    # Each schema field is right, arbitrary or absent, so both sides of every check run.
    fields: dict[str, Any] = data.draw(
        st.dictionaries(st.text(max_size=8), _MSGPACK_VALUES, max_size=3), label="extra"
    )
    for field, kind in wire.SCHEMAS[msg_type].items():
        how = data.draw(st.sampled_from(["right", "right", "arbitrary", "absent"]), label=field)
        if how == "right":
            fields[field] = _SAMPLE[kind]
        elif how == "arbitrary":
            fields[field] = data.draw(_MSGPACK_VALUES, label=field)
    frame = pack({**fields, "v": 1, "t": msg_type})
    try:
        msg = wire.decode(frame)
    except ProtocolError:
        return
    assert msg["t"] == msg_type
    _fields_have_their_types(msg)


@_FAST
@given(st.sampled_from(sorted(wire.SCHEMAS)), st.data())
def test_a_well_typed_message_always_decodes(msg_type: str, data: st.DataObject) -> None:
    kinds = {
        str: st.text(max_size=30),
        int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
        (int, float): st.integers(0, 3600) | st.floats(allow_nan=False),
        list: st.lists(st.text(max_size=5), max_size=3),
        dict: st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        bytes: st.binary(max_size=64),
    }
    fields = {f: data.draw(kinds[k], label=f) for f, k in wire.SCHEMAS[msg_type].items()}
    assert wire.decode(wire.encode(msg_type, **fields)) == {"v": 1, "t": msg_type, **fields}


# -- list and map fields, checked item by item by their handlers -----------------------------


def test_check_list_returns_each_item_as_a_tuple() -> None:
    items = [["a.txt", "ab" * 32, 3], ("b.txt", "cd" * 32, 0)]
    assert wire.check_list(items, (str, str, int), "input") == [
        ("a.txt", "ab" * 32, 3),
        ("b.txt", "cd" * 32, 0),
    ]
    assert wire.check_list([], (str,), "output") == []


@pytest.mark.parametrize(
    "item",
    [
        "a.txt",  # not a list
        {"path": "a.txt"},
        ["a.txt", "ab" * 32],  # too short
        ["a.txt", "ab" * 32, 3, "extra"],  # too long
        ["a.txt", "ab" * 32, "3"],  # wrong type
        ["a.txt", "ab" * 32, 3.0],
        ["a.txt", "ab" * 32, True],  # a bool is not a size
        [None, "ab" * 32, 3],
    ],
)
def test_check_list_refuses_a_malformed_item(item: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed input entry"):
        wire.check_list([["ok.txt", "ab" * 32, 1], item], (str, str, int), "input")


def test_str_mapping_accepts_strings_to_strings() -> None:
    assert wire.str_mapping({"A": "1", "B": ""}, "env") == {"A": "1", "B": ""}


@pytest.mark.parametrize(
    "value", [{"A": 1}, {"A": None}, {b"A": "1"}, {"A": ["1"]}, {1: "1"}, {"A": True}]
)
def test_str_mapping_refuses_anything_else(value: dict[Any, Any]) -> None:
    with pytest.raises(ProtocolError, match="env must map strings to strings"):
        wire.str_mapping(value, "env")
