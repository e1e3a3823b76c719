"""The messages: one frozen dataclass per message type, decoded and validated in one place.

A frame is one msgpack map ``{"v": 1, "t": <type>, <field>: <value>, ...}``. `decode` is the
boundary: it checks the frame's size, the version and the type, then turns every field into
the type its dataclass declares and checks it (digests are 64 lowercase hex digits, paths are
relative and normalized, names are printable and bounded, numbers are finite and in range).
Past `decode`, code trusts what it reads: nothing a peer sent reaches a path or a log line
unchecked. Anything else is a `ProtocolError` with a message that says which field was wrong.

Each field carries its check in its metadata (`_CHECK`), and, when its wire form is not its
Python form (a tuple of records is a list of lists on the wire), how to pack it (`_PACK`).

`encode` never builds a frame that the receiver's MAXMSGSIZE would drop: a message over its
frame limit is a ProtocolError at the sender. A `run` too big for one frame travels as a
`run` followed by `run_part`s (`split_run`), which the worker assembles before it starts.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import PurePosixPath
from typing import Any, ClassVar, TypeVar

import msgpack

from bonjourgrid.cache.store import FileRef
from bonjourgrid.discovery.txt import JOB_NAME
from bonjourgrid.errors import ProtocolError

PROTOCOL_VERSION = 1
CHUNK_SIZE = 1024 * 1024  # bytes of file data per `chunk` message
MAX_CONTROL_FRAME = 4 * 1024 * 1024  # a `run` (part) carries a command and input lists, no data
MAX_DATA_FRAME = CHUNK_SIZE + 4096  # one chunk plus its envelope
MAX_STRING = 64 * 1024
MAX_LIST = 100_000
MAX_NAME = 1024  # characters of a task name, a peer label, a hostname
MAX_PATH = 4096  # characters of a file path in a task directory
MAX_SIZE = 2**53  # bytes of one file, an offset, a byte count
MAX_ATTEMPT = 2**31
MAX_SOURCES = 64  # data servers named for one file
MAX_ENV = 4096  # variables in a task's environment
MAX_RUN_PARTS = 1024  # `run_part` messages after one `run`
MAX_RUN_FILES = 1_000_000  # inputs plus outputs of one run, over all its parts
MAX_LEASE_S = 3600.0
MAX_SECONDS = 10.0 * 365 * 24 * 3600  # a duration in a report

_CHECK = "check"
_PACK = "pack"


# -- checks: each turns a raw wire value into its field's value, or raises ProtocolError ----


def _int(value: Any, what: str, low: int, high: int) -> int:
    # bool is an int in Python; a flag is never a valid count here
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be a whole number, not {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"{what} {value} is out of range {low}..{high}")
    return value


def _float(value: Any, what: str, low: float, high: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high or (open_low and number == low):
        raise ProtocolError(f"{what} {number!r} is out of range {low:g}..{high:g}")
    return number


def _str(value: Any, what: str, limit: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is over {limit} characters")
    return value


def _list(value: Any, what: str, limit: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{what} must be a list, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} has more than {limit} items")
    return list(value)


def _record(value: Any, what: str, size: int) -> list[Any]:
    items = _list(value, what, size)
    if len(items) != size:
        raise ProtocolError(f"{what} must be a list of {size} values")
    return items


def is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def check_digest(value: Any, what: str = "digest") -> str:
    text = _str(value, what, 64)
    if not is_digest(text):
        raise ProtocolError(f"{what} {text[:80]!r} is not a SHA-256 digest (64 lowercase hex)")
    return text


def check_job(value: Any, what: str = "job") -> str:
    text = _str(value, what, 255)
    if not JOB_NAME.fullmatch(text):
        raise ProtocolError(f"{what} {text[:80]!r} is not a valid job name")
    return text


def check_name(value: Any, what: str = "task") -> str:
    """A task name or a peer label: printable (so no NUL, no newline), bounded."""
    text = _str(value, what, MAX_NAME)
    if not text or not text.isprintable():
        raise ProtocolError(f"{what} {text[:80]!r} must be non-empty printable text")
    return text


def _label(value: Any, what: str) -> str:
    """A source label in a report: a peer name, "coordinator", or "" for none."""
    return "" if value == "" else check_name(value, what)


def check_path(value: Any, what: str = "path") -> str:
    """A file path in a task directory: relative, normalized, inside it."""
    text = _str(value, what, MAX_PATH)
    pure = PurePosixPath(text)
    if (
        not text
        or "\x00" in text
        or pure.is_absolute()
        or ".." in pure.parts
        or text.startswith("~")
        or str(pure) != text
        or text == "."
    ):
        raise ProtocolError(
            f"{what} {text[:200]!r} would escape the task directory or is not normalized "
            "(give a relative path without '..', '.' or '//')"
        )
    return text


_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_ENDPOINT = re.compile(r"tcp://([0-9.]{7,15}):([0-9]{1,5})")


def check_key(value: Any, what: str = "key") -> str:
    """A CURVE public or secret key in Z85 (40 characters), or "" (--insecure)."""
    text = _str(value, what, 40)
    if text and (len(text) != 40 or not set(text) <= _Z85):
        raise ProtocolError(f"{what} must be a CURVE key (40 Z85 characters) or empty")
    return text


def check_endpoint(value: Any, what: str = "endpoint") -> str:
    text = _str(value, what, 64)
    match = _ENDPOINT.fullmatch(text)
    try:
        ok = match is not None and 0 < int(match[2]) < 65536
        ok = ok and match is not None and bool(ipaddress.IPv4Address(match[1]))
    except ValueError:
        ok = False
    if not ok:
        raise ProtocolError(f"{what} {text[:80]!r} is not tcp://<IPv4 address>:<port>")
    return text


def _text(value: Any, what: str) -> str:
    return _str(value, what)


def _size(value: Any, what: str) -> int:
    return _int(value, what, 0, MAX_SIZE)


def _attempt(value: Any, what: str) -> int:
    return _int(value, what, 1, MAX_ATTEMPT)


def _seconds(value: Any, what: str) -> float:
    return _float(value, what, 0.0, MAX_SECONDS)


def _lease(value: Any, what: str) -> float:
    return _float(value, what, 0.0, MAX_LEASE_S, open_low=True)


def _command(value: Any, what: str) -> str:
    text = _str(value, what)
    if "\x00" in text:
        raise ProtocolError("the command contains a NUL byte")
    return text


def _env(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a map of strings to strings")
    if len(value) > MAX_ENV:
        raise ProtocolError(f"{what} has more than {MAX_ENV} variables")
    env: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise ProtocolError(f"{what} must map strings to strings")
        if not name or "=" in name or "\x00" in name or len(name) > MAX_NAME or "\x00" in text:
            raise ProtocolError(
                f"{what}: names must be non-empty without '=' or NUL; values without NUL"
            )
        env[name] = text
    return env


def _limits(value: Any, what: str) -> dict[str, int]:
    # What each limit means, and its range, is worker/limits.py's to say (limits_from_wire).
    if not isinstance(value, Mapping) or len(value) > 16:
        raise ProtocolError(f"{what} must be a small map of names to whole numbers")
    return {
        _str(k, f"{what} name", 64): _int(v, f"{what} {str(k)[:40]}", 0, 2**63)
        for k, v in value.items()
    }


def _digests(value: Any, what: str) -> tuple[str, ...]:
    return tuple(check_digest(d, f"{what} item") for d in _list(value, what))


def _outputs(value: Any, what: str) -> tuple[str, ...]:
    return tuple(check_path(p, f"{what} path") for p in _list(value, what))


@dataclass(frozen=True)
class Source:
    """A data server that may hold a file: its endpoint and CURVE public key (Z85)."""

    endpoint: str
    server_key: str
    label: str  # who it is, for accounting: "coordinator" or a peer name


def _sources(value: Any, what: str) -> tuple[Source, ...]:
    out = []
    for item in _list(value, what, MAX_SOURCES):
        endpoint, key, label = _record(item, f"{what} entry", 3)
        out.append(
            Source(
                check_endpoint(endpoint, f"{what} endpoint"),
                check_key(key, f"{what} key"),
                check_name(label, f"{what} label"),
            )
        )
    return tuple(out)


def _pack_sources(sources: tuple[Source, ...]) -> list[list[str]]:
    return [[s.endpoint, s.server_key, s.label] for s in sources]


@dataclass(frozen=True)
class TaskInput:
    """An input of a `run`: where it goes in the task directory, what it is, where it is."""

    path: str
    ref: FileRef
    sources: tuple[Source, ...]


def _inputs(value: Any, what: str) -> tuple[TaskInput, ...]:
    out = []
    for item in _list(value, what):
        path, digest, size, sources = _record(item, f"{what} entry", 4)
        where = f"{what} {check_path(path, f'{what} path')!r}"
        ref = FileRef(check_digest(digest, f"{where} digest"), _size(size, f"{where} size"))
        out.append(TaskInput(path, ref, _sources(sources, f"{where} sources")))
    return tuple(out)


def _pack_input(item: TaskInput) -> list[Any]:
    return [item.path, item.ref.digest, item.ref.size, _pack_sources(item.sources)]


def _pack_inputs(items: tuple[TaskInput, ...]) -> list[list[Any]]:
    return [_pack_input(i) for i in items]


@dataclass(frozen=True)
class PrefetchFile:
    ref: FileRef
    sources: tuple[Source, ...]


def _files(value: Any, what: str) -> tuple[PrefetchFile, ...]:
    out = []
    for item in _list(value, what):
        digest, size, sources = _record(item, f"{what} entry", 3)
        ref = FileRef(check_digest(digest, f"{what} digest"), _size(size, f"{what} size"))
        out.append(PrefetchFile(ref, _sources(sources, f"{what} sources")))
    return tuple(out)


def _pack_files(files: tuple[PrefetchFile, ...]) -> list[list[Any]]:
    return [[f.ref.digest, f.ref.size, _pack_sources(f.sources)] for f in files]


def _made(value: Any, what: str) -> tuple[tuple[str, FileRef], ...]:
    out = []
    for item in _list(value, what):
        path, digest, size = _record(item, f"{what} entry", 3)
        where = f"{what} {check_path(path, f'{what} path')!r}"
        out.append((path, FileRef(check_digest(digest, f"{where} digest"), _size(size, where))))
    return tuple(out)


def _pack_made(outputs: tuple[tuple[str, FileRef], ...]) -> list[list[Any]]:
    return [[path, ref.digest, ref.size] for path, ref in outputs]


def _fetched(value: Any, what: str) -> tuple[tuple[str, str, int], ...]:
    out = []
    for item in _list(value, what):
        digest, label, size = _record(item, f"{what} entry", 3)
        out.append((check_digest(digest, f"{what} digest"), _label(label, what), _size(size, what)))
    return tuple(out)


def _running(value: Any, what: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in _list(value, what):
        task, attempt = _record(item, f"{what} entry", 2)
        out.append((check_name(task, f"{what} task"), _attempt(attempt, f"{what} attempt")))
    return tuple(out)


def _listed(items: tuple[Any, ...]) -> list[Any]:
    return [list(i) if isinstance(i, tuple) else i for i in items]


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    return value


def _f(
    check: Callable[[Any, str], Any], pack: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    return {_CHECK: check, _PACK: pack}


JOB = _f(check_job)
TASK = _f(check_name)
ATTEMPT = _f(_attempt)
TEXT = _f(_text)
DIGEST = _f(check_digest)
SIZE = _f(_size)
SECONDS = _f(_seconds)


# -- the messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message of the wire; `TYPE` is its "t"."""

    TYPE: ClassVar[str] = ""


MESSAGES: dict[str, type[Message]] = {}
_M = TypeVar("_M", bound=type[Message])


def _message(cls: _M) -> _M:
    MESSAGES[cls.TYPE] = cls
    return cls


# coordinator -> worker (control)


@_message
@dataclass(frozen=True)
class Reserve(Message):
    """Reserve the peer; hands over the job's CURVE keypair (both "" under --insecure)."""

    TYPE = "reserve"
    job: str = field(metadata=JOB)
    lease_s: float = field(metadata=_f(_lease))
    coordinator: str = field(metadata=_f(lambda v, w: _str(v, w, MAX_NAME)))
    job_public: str = field(metadata=_f(check_key))
    job_secret: str = field(metadata=_f(check_key))


@_message
@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "heartbeat"
    job: str = field(metadata=JOB)
    lease_s: float = field(metadata=_f(_lease))


@_message
@dataclass(frozen=True)
class Release(Message):
    TYPE = "release"
    job: str = field(metadata=JOB)


@_message
@dataclass(frozen=True)
class Run(Message):
    """Run a task; `parts` more inputs and outputs follow in `run_part` messages."""

    TYPE = "run"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)
    command: str = field(metadata=_f(_command))
    inputs: tuple[TaskInput, ...] = field(metadata=_f(_inputs, _pack_inputs))
    outputs: tuple[str, ...] = field(metadata=_f(_outputs, list))
    env: dict[str, str] = field(metadata=_f(_env))
    limits: dict[str, int] = field(metadata=_f(_limits))  # {"cpu_s", "memory"}: worker/limits
    parts: int = field(default=0, metadata=_f(lambda v, w: _int(v, w, 0, MAX_RUN_PARTS)))


@_message
@dataclass(frozen=True)
class RunPart(Message):
    """More inputs and outputs of a `run`; parts are numbered from 1 and sent in order."""

    TYPE = "run_part"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)
    part: int = field(metadata=_f(lambda v, w: _int(v, w, 1, MAX_RUN_PARTS)))
    inputs: tuple[TaskInput, ...] = field(metadata=_f(_inputs, _pack_inputs))
    outputs: tuple[str, ...] = field(metadata=_f(_outputs, list))


@_message
@dataclass(frozen=True)
class Cancel(Message):
    TYPE = "cancel"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)


@_message
@dataclass(frozen=True)
class Prefetch(Message):
    TYPE = "prefetch"
    job: str = field(metadata=JOB)
    files: tuple[PrefetchFile, ...] = field(metadata=_f(_files, _pack_files))


@_message
@dataclass(frozen=True)
class Probe(Message):
    """Which of these the peer's cache holds (any state)."""

    TYPE = "probe"
    digests: tuple[str, ...] = field(metadata=_f(_digests, list))


# worker -> coordinator (control)


@_message
@dataclass(frozen=True)
class Reserved(Message):
    TYPE = "reserved"
    job: str = field(metadata=JOB)
    data_port: int = field(metadata=_f(lambda v, w: _int(v, w, 1, 65535)))
    cpus: int = field(metadata=_f(lambda v, w: _int(v, w, 1, 1 << 16)))


@_message
@dataclass(frozen=True)
class Denied(Message):
    TYPE = "denied"
    job: str = field(metadata=JOB)
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class HeartbeatAck(Message):
    """A renewed lease, with the (task, attempt) runs the peer has started and not ended."""

    TYPE = "heartbeat_ack"
    job: str = field(metadata=JOB)
    running: tuple[tuple[str, int], ...] = field(default=(), metadata=_f(_running, _listed))


@_message
@dataclass(frozen=True)
class Released(Message):
    TYPE = "released"
    job: str = field(metadata=JOB)


@_message
@dataclass(frozen=True)
class Preempted(Message):
    """The owner came back: the peer left the job."""

    TYPE = "preempted"
    job: str = field(metadata=JOB)
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class Started(Message):
    """The peer took the run (all its parts): a `task_done` follows."""

    TYPE = "started"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)


@_message
@dataclass(frozen=True)
class Refused(Message):
    """The peer will not run it (malformed, too big, no free slot): the attempt failed."""

    TYPE = "refused"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class TaskDone(Message):
    TYPE = "task_done"
    job: str = field(metadata=JOB)
    task: str = field(metadata=TASK)
    attempt: int = field(metadata=ATTEMPT)
    exit_code: int = field(metadata=_f(lambda v, w: _int(v, w, -(2**31), 2**31)))
    outputs: tuple[tuple[str, FileRef], ...] = field(metadata=_f(_made, _pack_made))
    stderr_tail: str = field(metadata=TEXT)
    error: str = field(metadata=TEXT)
    fetch_s: float = field(metadata=SECONDS)
    run_s: float = field(metadata=SECONDS)
    bytes_fetched: int = field(metadata=SIZE)  # the sum of `fetched` bytes
    # inputs this run moved: (digest, source label, bytes)
    fetched: tuple[tuple[str, str, int], ...] = field(metadata=_f(_fetched, _listed))
    hit_bytes: int = field(metadata=SIZE)  # input bytes found in the local cache


@_message
@dataclass(frozen=True)
class Prefetched(Message):
    """One per prefetched file; source "" (and bytes 0) when it was already there or failed."""

    TYPE = "prefetched"
    job: str = field(metadata=JOB)
    digest: str = field(metadata=DIGEST)
    source: str = field(metadata=_f(_label))
    bytes: int = field(metadata=SIZE)
    seconds: float = field(metadata=SECONDS)
    error: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class Holding(Message):
    """The answer to `probe`."""

    TYPE = "holding"
    digests: tuple[str, ...] = field(metadata=_f(_digests, list))


@_message
@dataclass(frozen=True)
class Error(Message):
    TYPE = "error"
    reason: str = field(metadata=TEXT)


# `bgrid cancel` -> coordinator (job control) and its answer


@_message
@dataclass(frozen=True)
class CancelJob(Message):
    TYPE = "cancel_job"
    job: str = field(metadata=JOB)
    by: str = field(metadata=TEXT)  # who asks, e.g. user@host, for the report


@_message
@dataclass(frozen=True)
class Cancelling(Message):
    TYPE = "cancelling"
    job: str = field(metadata=JOB)


# data plane


@_message
@dataclass(frozen=True)
class Get(Message):
    TYPE = "get"
    digest: str = field(metadata=DIGEST)
    offset: int = field(metadata=SIZE)
    size: int = field(metadata=_f(lambda v, w: _int(v, w, 1, CHUNK_SIZE)))


@_message
@dataclass(frozen=True)
class Chunk(Message):
    TYPE = "chunk"
    digest: str = field(metadata=DIGEST)
    offset: int = field(metadata=SIZE)
    data: bytes = field(metadata=_f(_bytes))


@_message
@dataclass(frozen=True)
class Missing(Message):
    TYPE = "missing"
    digest: str = field(metadata=DIGEST)


# -- encoding and decoding ------------------------------------------------------------------


def frame_limit(message: Message) -> int:
    return MAX_DATA_FRAME if isinstance(message, Chunk) else MAX_CONTROL_FRAME


def as_map(message: Message) -> dict[str, Any]:
    """The message as it goes on the wire (a map of plain values)."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE}
    for f in fields(message):
        value = getattr(message, f.name)
        pack = f.metadata[_PACK]
        body[f.name] = pack(value) if pack is not None else value
    return body


def encode(message: Message) -> bytes:
    """One frame holding `message`; ProtocolError if the receiver could not take it."""
    try:
        frame: bytes = msgpack.packb(as_map(message), use_bin_type=True)
    except (TypeError, ValueError) as err:  # e.g. a lone surrogate in a string
        raise ProtocolError(f"a {message.TYPE!r} message cannot be encoded: {err}") from err
    limit = frame_limit(message)
    if len(frame) > limit:
        raise ProtocolError(
            f"a {message.TYPE!r} message of {len(frame)} bytes is over the {limit}-byte frame "
            "limit (a receiver would drop it)"
        )
    return frame


def pack_raw(msg_type: str, **fields: Any) -> bytes:
    """A frame of `msg_type` with these fields as they are, unchecked: how tests (and the
    hostile peers in them) build what `encode` never would."""
    return bytes(msgpack.packb({"v": PROTOCOL_VERSION, "t": msg_type, **fields}, use_bin_type=True))


def _unpack(frame: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=min(limit, MAX_STRING),
            max_bin_len=limit,
            max_array_len=MAX_LIST,
            max_map_len=MAX_LIST,
        )
    except Exception as err:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(
            f"not a msgpack message: {type(err).__name__}: {str(err)[:200]}"
        ) from err


def decode(frame: bytes, limit: int = MAX_CONTROL_FRAME) -> Message:
    """The message in `frame`, checked field by field; ProtocolError otherwise."""
    if len(frame) > limit:
        raise ProtocolError(f"frame of {len(frame)} bytes is over the {limit}-byte limit")
    msg = _unpack(frame, limit)
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message is a map, got {type(msg).__name__}")
    if type(msg.get("v")) is not int or msg["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {str(msg.get('v'))[:20]!r}, this peer speaks {PROTOCOL_VERSION}"
        )
    msg_type = msg.get("t")
    if not isinstance(msg_type, str) or msg_type not in MESSAGES:
        raise ProtocolError(f"unknown message type {str(msg_type)[:40]!r}")
    return from_fields(MESSAGES[msg_type], msg)


_T = TypeVar("_T", bound=Message)


def from_fields(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """A `cls` message from the fields in `values`, checked as `decode` checks them."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values:
            if f.default is not MISSING:  # an optional field, added later
                continue
            raise ProtocolError(f"{cls.TYPE!r} message without its {f.name!r} field")
        kwargs[f.name] = f.metadata[_CHECK](values[f.name], f"{cls.TYPE} {f.name}")
    return cls(**kwargs)


def attempt_of(frame: bytes) -> tuple[str, str, str, int] | None:
    """(type, job, task, attempt) named by a frame that may fail `decode`, else None.

    A peer's refusal (or a coordinator's failed attempt) can then be attributed to the run it
    is about. Lenient on the rest of the message, strict on these four fields.
    """
    try:
        msg = msgpack.unpackb(frame[:MAX_CONTROL_FRAME], raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(msg, dict):
        return None
    try:
        return (
            check_name(msg.get("t"), "type"),
            check_job(msg.get("job")),
            check_name(msg.get("task")),
            _attempt(msg.get("attempt"), "attempt"),
        )
    except ProtocolError:
        return None


def split_run(run: Run) -> list[Run | RunPart]:
    """`run` as frames that fit: the `run` with as many inputs and outputs as fit, then
    `run_part`s with the rest. ProtocolError if it cannot be sent at all."""
    head = replace(run, inputs=(), outputs=())
    slack = 1024  # list headers and field growth
    room = MAX_CONTROL_FRAME - len(encode(head)) - slack
    if room < MAX_CONTROL_FRAME // 4:
        raise ProtocolError(
            f"the run of {run.task} does not fit a message: its command and environment "
            f"must stay well under {MAX_CONTROL_FRAME // 4} bytes"
        )
    empty = RunPart(run.job, run.task, run.attempt, MAX_RUN_PARTS, (), ())
    part_room = MAX_CONTROL_FRAME - len(encode(empty)) - slack
    parts: list[tuple[list[TaskInput], list[str]]] = [([], [])]
    used = 0
    budget = room
    items: Sequence[TaskInput | str] = [*run.inputs, *run.outputs]
    for item in items:
        packed = _pack_input(item) if isinstance(item, TaskInput) else item
        size = len(msgpack.packb(packed, use_bin_type=True))
        inputs, outputs = parts[-1]
        if used + size > budget or len(inputs) + len(outputs) >= MAX_LIST:
            parts.append(([], []))
            inputs, outputs = parts[-1]
            used, budget = 0, part_room
        (inputs if isinstance(item, TaskInput) else outputs).append(item)  # type: ignore[arg-type]
        used += size
    if len(parts) - 1 > MAX_RUN_PARTS:
        raise ProtocolError(f"the run of {run.task} needs more than {MAX_RUN_PARTS} messages")
    first = replace(
        run, inputs=tuple(parts[0][0]), outputs=tuple(parts[0][1]), parts=len(parts) - 1
    )
    rest = [
        RunPart(run.job, run.task, run.attempt, number, tuple(inputs), tuple(outputs))
        for number, (inputs, outputs) in enumerate(parts[1:], start=1)
    ]
    return [first, *rest]
