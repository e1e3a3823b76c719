"""The wire boundary: every message round-trips as its dataclass, and anything malformed,
from bytes to a digest that would escape a directory, is a ProtocolError."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonjourgrid import protocol as p
from bonjourgrid import wire
from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ProtocolError

D1, D2 = "ab" * 32, "cd" * 32
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # 40 Z85 characters
SOURCE = p.Source("tcp://10.0.0.2:5555", KEY, "peer-2")
INPUT = p.TaskInput("in/a.txt", FileRef(D1, 3), (SOURCE,))

# One valid message of every type.
SAMPLES: dict[str, p.Message] = {
    m.TYPE: m
    for m in [
        p.Reserve("job-42", 10.0, "host", KEY, KEY),
        p.Heartbeat("job-42", 2.5),
        p.Release("job-42"),
        p.Run("job-42", "t1", 1, "cat in/a.txt > out", (INPUT,), ("out",), {"A": "1"}, {}, 0),
        p.RunPart("job-42", "t1", 1, 1, (INPUT,), ("out2",)),
        p.Cancel("job-42", "t1"),
        p.Prefetch("job-42", (p.PrefetchFile(FileRef(D1, 3), (SOURCE,)),)),
        p.Probe((D1, D2)),
        p.ServiceStart(
            "job-42",
            "slurmd",
            ("slurmd", "-D", "-f", "{dir}/slurm.conf", "-p", "{port:slurmd}"),
            {"slurm.conf": "NodeAddr={host}\nPort={port:slurmd}\n"},
            {"munge.key": b"\x00\x01secret"},
            ("slurmd",),
            {"SLURM_CONF": "{dir}/slurm.conf"},
            "ready",
        ),
        p.ServiceStop("job-42", "slurmd"),
        p.ServiceUp("job-42", "slurmd", {"slurmd": 6818}, "/var/cache/bg/sandboxes/service-x/s"),
        p.ServiceFailed("job-42", "slurmd", "'slurmd' exited (1) before it wrote 'ready'"),
        p.ServiceExited("job-42", "slurmd", -9, False, "slurmd: fatal: ..."),
        p.Reserved("job-42", 5555, 4),
        p.Denied("job-42", "busy"),
        p.HeartbeatAck("job-42", (("t1", 1), ("t2", 3))),
        p.Released("job-42"),
        p.Preempted("job-42", "its owner came back"),
        p.Suspension("job-42", "suspended", "its owner came back (vacated after 600 s)"),
        p.Started("job-42", "t1", 1),
        p.Refused("job-42", "t1", 1, "all 1 slots busy"),
        p.TaskDone(
            "job-42",
            "t1",
            2,
            0,
            (("out", FileRef(D2, 10)),),
            "tail",
            "",
            0.5,
            1.25,
            3,
            ((D1, "coordinator", 3),),
            0,
        ),
        p.Prefetched("job-42", D1, "peer-2", 3, 0.1, ""),
        p.Holding((D2,)),
        p.Error("bad"),
        p.CancelJob("job-42", "ann@desk"),
        p.Cancelling("job-42"),
        p.Get(D1, 0, 10),
        p.Chunk(D1, 0, b"\x00\xffdata"),
        p.Missing(D1),
        p.Locate(D1, "machine-id/boot-id/4026531832"),
        p.Located(D1, "/home/ann/job/in.txt"),
        p.StepClaim("job-42", "t1", 1),
        p.StepGranted(
            "job-42",
            "t1",
            1,
            "/c/sandboxes/task-x/sandbox",
            "cat in/a.txt > out",
            {"BGRID_TASK": "t1"},
            "/c/sandboxes/task-x/stdout",
            "/c/sandboxes/task-x/stderr",
            {"wall_s": 60},
        ),
        p.StepRefused("run 't1' attempt 1 of job job-42 is already claimed"),
        p.StepExited(-15, 2.5, False),
        p.StepVerdict(0, True, ""),
        p.StepStop("cancelled"),
    ]
}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw(msg_type: str, **changes: Any) -> bytes:
    """A sample's wire map with some fields changed (`_DROP`: removed)."""
    body = {**wire.as_map(SAMPLES[msg_type]), **changes}
    return pack({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()


def test_the_protocol_has_the_messages_of_every_conversation() -> None:
    control = {"reserve", "heartbeat", "release", "run", "run_part", "cancel", "prefetch"}
    control |= {"probe", "service_start", "service_stop"}
    replies = {"reserved", "denied", "heartbeat_ack", "released", "preempted", "task_done"}
    replies |= {"prefetched", "holding", "error", "started", "refused"}
    replies |= {"service_up", "service_failed", "service_exited"}
    replies |= {"suspension"}  # the owner is back (suspended) or away again (resumed)
    data = {"get", "chunk", "missing", "locate", "located"}  # locate: same-host copies
    jobctl = {"cancel_job", "cancelling"}  # `bgrid cancel` -> coordinator
    # `bgrid task-step` <-> its worker, on the peer's unix socket
    steps = {"step_claim", "step_granted", "step_refused", "step_exited", "step_verdict"}
    steps |= {"step_stop"}
    assert set(p.MESSAGES) == control | replies | data | jobctl | steps == set(SAMPLES)


@pytest.mark.parametrize("msg_type", sorted(SAMPLES))
def test_every_message_type_round_trips(msg_type: str) -> None:
    message = SAMPLES[msg_type]
    limit = p.frame_limit(message)
    assert wire.decode(wire.encode(message), limit) == message
    assert wire.as_map(message)["t"] == msg_type


def test_an_int_is_accepted_where_a_number_is_expected() -> None:
    assert wire.decode(raw("heartbeat", lease_s=30)) == p.Heartbeat("job-42", 30.0)


def test_fields_added_later_have_defaults() -> None:
    old_ack = raw("heartbeat_ack", running=_DROP)
    assert wire.decode(old_ack) == p.HeartbeatAck("job-42", ())
    assert wire.decode(raw("run", parts=_DROP)) == SAMPLES["run"]


def test_a_full_chunk_fits_a_data_frame() -> None:
    frame = wire.encode(p.Chunk(D1, 0, bytes(wire.CHUNK_SIZE)))
    assert len(frame) <= wire.MAX_DATA_FRAME
    chunk = wire.decode(frame, limit=wire.MAX_DATA_FRAME)
    assert isinstance(chunk, p.Chunk) and len(chunk.data) == wire.CHUNK_SIZE


def test_encode_refuses_a_frame_the_receiver_would_drop() -> None:
    with pytest.raises(ProtocolError, match="frame limit"):
        wire.encode(p.Chunk(D1, 0, bytes(wire.MAX_DATA_FRAME)))
    huge = dataclasses.replace(SAMPLES["run"], inputs=(INPUT,) * 40_000)
    with pytest.raises(ProtocolError, match="frame limit"):
        wire.encode(huge)


_RESERVE = wire.encode(SAMPLES["reserve"])

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
    "no version": raw("release", v=_DROP),
    "version 2": raw("release", v=2),
    "version as text": raw("release", v="1"),
    "version as bool": raw("release", v=True),
    "version as float": raw("release", v=1.0),
    "no type": raw("release", t=_DROP),
    "unknown type": raw("release", t="reboot"),
    "type not a string": raw("release", t=3),
    "missing field": raw("reserve", coordinator=_DROP),
    "suspension neither suspended nor resumed": raw("suspension", state="paused"),
    "str field holds int": raw("release", job=5),
    "int field holds str": raw("reserved", data_port="5555"),
    "int field holds float": raw("run", attempt=1.0),
    "int field holds bool": raw("run", attempt=True),
    "number field holds bool": raw("reserve", lease_s=True),
    "number field holds nil": raw("heartbeat", lease_s=None),
    "NaN lease": raw("heartbeat", lease_s=float("nan")),
    "infinite duration": raw("task_done", run_s=float("inf")),
    "negative lease": raw("heartbeat", lease_s=-1.0),
    "lease over an hour": raw("heartbeat", lease_s=1e9),
    "list field holds a map": raw("run", inputs={"a": 1}),
    "map field holds a list": raw("run", env=[["A", "1"]]),
    "bytes field holds str": raw("chunk", data="text"),
    "string over MAX_STRING": raw("release", job="x" * (wire.MAX_STRING + 1)),
    "list over MAX_LIST": raw("run", outputs=["o"] * (wire.MAX_LIST + 1)),
    "deeply nested": b"\x91" * 100_000 + b"\xc0",
    # values: each field is checked, not only typed
    "job name with a space": raw("release", job="my job"),
    "digest with a path": raw("missing", digest="../../x/b"),
    "digest with a NUL": raw("missing", digest="ab" * 31 + "a\x00"),
    "digest in upper case": raw("missing", digest=D1.upper()),
    "output digest escaping": raw("task_done", outputs=[["out", "../../escape/b", 1]]),
    "output digest with a NUL": raw("task_done", outputs=[["out", "\x00" * 64, 1]]),
    "prefetched digest escaping": raw("prefetched", digest="../../escape/b"),
    "probe of a path": raw("probe", digests=["../../etc/passwd"]),
    "negative size": raw("get", size=-1),
    "size over a chunk": raw("get", size=wire.CHUNK_SIZE + 1),
    "negative offset": raw("chunk", offset=-1),
    "negative byte count": raw("task_done", hit_bytes=-5),
    "attempt 0": raw("run", attempt=0),
    "input path with ..": raw("run", inputs=[["../a", D1, 1, []]]),
    "absolute input path": raw("run", inputs=[["/etc/passwd", D1, 1, []]]),
    "output path with ..": raw("run", outputs=["a/../../b"]),
    "absolute output path": raw("run", outputs=["/tmp/x"]),
    "path with a NUL": raw("run", outputs=["a\x00b"]),
    "path not normalized": raw("run", outputs=["a//b"]),
    "path over MAX_PATH": raw("run", outputs=["a" * (p.MAX_PATH + 1)]),
    "reported output outside": raw("task_done", outputs=[["../out", D2, 1]]),
    "NUL in an env value": raw("run", env={"A": "1\x00"}),
    "NUL in an env name": raw("run", env={"A\x00": "1"}),
    "= in an env name": raw("run", env={"A=B": "1"}),
    "env value not a string": raw("run", env={"A": 1}),
    "NUL in the command": raw("run", command="true\x00rm -rf /"),
    "task name with a NUL": raw("run", task="t\x00"),
    "task name with a newline": raw("started", task="t\nforged log line"),
    "empty task name": raw("cancel", task=""),
    "task name too long": raw("cancel", task="t" * (p.MAX_NAME + 1)),
    "endpoint not tcp": raw("run", inputs=[["a", D1, 1, [["ipc:///x", KEY, "p"]]]]),
    "endpoint not an IPv4 address": raw("run", inputs=[["a", D1, 1, [["tcp://h:1", KEY, "p"]]]]),
    "endpoint port 0": raw("run", inputs=[["a", D1, 1, [["tcp://10.0.0.1:0", KEY, "p"]]]]),
    "source key not Z85": raw("prefetch", files=[[D1, 1, [["tcp://10.0.0.1:5", "k" * 39, "p"]]]]),
    "job key too short": raw("reserve", job_public="x" * 39),
    "input entry too short": raw("run", inputs=[["a", D1, 1]]),
    "running entry malformed": raw("heartbeat_ack", running=[["t1"]]),
    "run with too many parts": raw("run", parts=p.MAX_RUN_PARTS + 1),
    "data port 0": raw("reserved", data_port=0),
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(frame)


def test_a_protocol_error_names_the_field() -> None:
    with pytest.raises(ProtocolError, match=r"task_done outputs .* digest .*not a SHA-256"):
        wire.decode(raw("task_done", outputs=[["out", "../../escape/b", 1]]))


def test_an_oversized_frame_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ProtocolError, match="over the 4096-byte limit"):
        wire.decode(raw("release", job="x" * 5000), limit=4096)
    with pytest.raises(ProtocolError, match="limit"):
        wire.decode(b"\x00" * (wire.MAX_CONTROL_FRAME + 1))


def test_a_chunk_bigger_than_a_data_frame_is_refused() -> None:
    frame = pack({"v": 1, "t": "chunk", "digest": D1, "offset": 0, "data": bytes(2**21)})
    with pytest.raises(ProtocolError):
        wire.decode(frame, limit=wire.MAX_DATA_FRAME)


# -- a run names its attempt even when the rest of it is bad --------------------------------


def test_attempt_of_reads_the_envelope_of_a_bad_run() -> None:
    frame = raw("run", command="x" * (wire.MAX_STRING + 1))
    with pytest.raises(ProtocolError):
        wire.decode(frame)
    assert p.attempt_of(frame) == ("run", "job-42", "t1", 1)
    assert p.attempt_of(raw("task_done", outputs=[["o", "../../x/b", 1]]))[2:] == ("t1", 2)  # type: ignore[index]


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", pack([1]), raw("run", attempt="1"), raw("run", task="a\x00"), raw("release")],
)
def test_attempt_of_is_none_unless_the_envelope_is_valid(frame: bytes) -> None:
    assert p.attempt_of(frame) is None


# -- big runs travel in parts ------------------------------------------------------------------


def test_a_small_run_is_one_message() -> None:
    assert p.split_run(SAMPLES["run"]) == [SAMPLES["run"]]


def test_a_run_with_30000_inputs_is_split_into_frames_that_fit() -> None:
    inputs = tuple(
        p.TaskInput(f"inputs/part-{i:05d}.dat", FileRef(D1, i), (SOURCE,)) for i in range(30_000)
    )
    outputs = tuple(f"out/{i}" for i in range(50_000))
    run = dataclasses.replace(SAMPLES["run"], inputs=inputs, outputs=outputs)
    messages = p.split_run(run)
    assert len(messages) > 1
    first, *rest = messages
    assert isinstance(first, p.Run) and first.parts == len(rest)
    assert [m.part for m in rest if isinstance(m, p.RunPart)] == list(range(1, len(rest) + 1))
    decoded = [wire.decode(wire.encode(m)) for m in messages]  # each fits a control frame
    assert decoded == messages
    assert sum((m.inputs for m in messages), ()) == inputs
    assert sum((m.outputs for m in messages), ()) == outputs


def test_a_run_whose_command_cannot_fit_is_refused_at_the_sender() -> None:
    env = {f"V{i}": "x" * 60_000 for i in range(70)}
    with pytest.raises(ProtocolError, match=r"does not fit|frame limit"):
        p.split_run(dataclasses.replace(SAMPLES["run"], env=env))


# -- properties ------------------------------------------------------------------------------

_MSGPACK_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from([D1, "../../x/b", "a\x00b", "job-42", "t1", "tcp://10.0.0.2:5555", KEY])
)
_MSGPACK_VALUES = st.recursive(
    _MSGPACK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_to_a_checked_message(frame: bytes) -> None:
    try:
        msg = wire.decode(frame, limit=wire.MAX_DATA_FRAME)
    except ProtocolError:
        return
    assert isinstance(msg, p.Message)
    # What decoded re-encodes to a frame that decodes to the same message.
    assert wire.decode(wire.encode(msg), limit=wire.MAX_DATA_FRAME) == msg


@_FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_only_protocol_errors(frame: bytes) -> None:
    _decodes_to_a_checked_message(frame)


@_FAST
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_a_valid_frame_with_one_byte_changed_never_breaks_decode(
    msg_type: str, data: st.DataObject
) -> None:
    frame = bytearray(wire.encode(SAMPLES[msg_type]))
    frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    _decodes_to_a_checked_message(bytes(frame))


@_FAST
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_any_map_of_a_known_type_decodes_or_raises_protocol_error(
    msg_type: str, data: st.DataObject
) -> None:
    # Each field is right, arbitrary or absent, so both sides of every check run.
    fields: dict[str, Any] = data.draw(
        st.dictionaries(st.text(max_size=8), _MSGPACK_VALUES, max_size=3), label="extra"
    )
    for name, value in wire.as_map(SAMPLES[msg_type]).items():
        how = data.draw(st.sampled_from(["right", "right", "arbitrary", "absent"]), label=name)
        if how == "right":
            fields[name] = value
        elif how == "arbitrary":
            fields[name] = data.draw(_MSGPACK_VALUES, label=name)
    fields.update(v=1, t=msg_type)
    _decodes_to_a_checked_message(pack(fields))


@_FAST
@given(st.data())
def test_any_map_with_any_type_name_raises_only_protocol_errors(data: st.DataObject) -> None:
    body = data.draw(st.dictionaries(st.text(max_size=8), _MSGPACK_VALUES, max_size=6))
    body["t"] = data.draw(st.sampled_from([*sorted(SAMPLES), "x"]) | _MSGPACK_SCALARS)
    body["v"] = data.draw(st.sampled_from([1, 1, 2, None]))
    _decodes_to_a_checked_message(pack(body))


_SAFE_TEXT = st.text(
    st.characters(blacklist_categories=["Cc", "Cf", "Cs", "Zl", "Zp", "Cn", "Co", "Zs"]),
    min_size=1,
    max_size=20,
)


@_FAST
@given(
    task=_SAFE_TEXT,
    path=st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), min_size=1, max_size=3),
    env=st.dictionaries(
        st.from_regex(r"[A-Z_]{1,8}", fullmatch=True),
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])),
    ),
    size=st.integers(0, p.MAX_SIZE),
)
def test_a_well_formed_run_always_decodes(
    task: str, path: list[str], env: dict[str, str], size: int
) -> None:
    name = "/".join(path)
    if name in (".", "..") or any(part in (".", "..") for part in path):
        return
    item = p.TaskInput(name, FileRef(D2, size), (SOURCE,))
    run = p.Run("job-1", task, 1, "true", (item,), ("o",), env, {}, 0)
    assert wire.decode(wire.encode(run)) == run
