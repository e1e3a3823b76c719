"""The messages: one frozen dataclass per message type, and the boundary that turns frames
into them (`decode`) and back (`encode`, `split_run`). The package docstring tells the rules.

Each field carries its check in its metadata (`_CHECK`, from `fields.py`), and, when its wire
form is not its Python form (a tuple of records is a list of lists on the wire), how to pack
it (`_PACK`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

import msgpack

from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ProtocolError
from bonjourgrid.protocol.fields import (
    _CHECK,
    _OMIT_DEFAULT,
    _PACK,
    ATTEMPT,
    CHUNK_SIZE,
    DIGEST,
    JOB,
    LOG,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    MAX_LIST,
    MAX_NAME,
    MAX_RUN_PARTS,
    MAX_STRING,
    PROTOCOL_VERSION,
    SECONDS,
    SERVICE_PLACEHOLDER,
    SIZE,
    TASK,
    TEXT,
    PrefetchFile,
    TaskInput,
    _argv,
    _attempt,
    _bytes,
    _command,
    _digests,
    _directory,
    _env,
    _f,
    _fetched,
    _files,
    _flag,
    _inputs,
    _int,
    _label,
    _lease,
    _limits,
    _listed,
    _local_path,
    _made,
    _one_of,
    _optional_path,
    _outputs,
    _pack_files,
    _pack_input,
    _pack_inputs,
    _pack_made,
    _port_names,
    _ports,
    _running,
    _secrets,
    _service_files,
    _str,
    check_job,
    check_key,
    check_name,
    check_service_name,
)

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


# How a run's command starts: the worker spawns it, or a middleware's job does (a Slurm
# batch job running `bgrid task-step`), which claims the sandbox the worker staged for it.
LAUNCHES = ("worker", "external")


@_message
@dataclass(frozen=True)
class Run(Message):
    """Run a task; `parts` more inputs and outputs follow in `run_part` messages.

    `launch` "external": the worker stages the inputs and acknowledges (`started`) as for any
    run, but does not start the command: a `bgrid task-step` on the peer claims the run over
    the task-step socket of one of the job's service runs (worker/task_steps.py), runs the
    command itself, and the worker stores the outputs and reports `task_done` as usual.
    """

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
    launch: str = field(default="worker", metadata=_f(_one_of(*LAUNCHES), omit_default=True))


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


SERVICE = _f(check_service_name)


@_message
@dataclass(frozen=True)
class ServiceStart(Message):
    """Run a middleware daemon under the job's lease (backends/base.py ServiceSpec): the
    worker picks `ports`, substitutes the placeholders (fields.SERVICE_PLACEHOLDER) in
    `argv`, `files` and `env`, writes `secrets` 0600, and answers `service_up` once
    `ready_file` exists (at once without one) or `service_failed`."""

    TYPE = "service_start"
    job: str = field(metadata=JOB)
    name: str = field(metadata=SERVICE)
    argv: tuple[str, ...] = field(metadata=_f(_argv, list))
    files: dict[str, str] = field(default_factory=dict, metadata=_f(_service_files))
    secrets: dict[str, bytes] = field(default_factory=dict, metadata=_f(_secrets))
    ports: tuple[str, ...] = field(default=(), metadata=_f(_port_names, list))
    env: dict[str, str] = field(default_factory=dict, metadata=_f(_env))
    ready_file: str = field(default="", metadata=_f(_optional_path))
    # The service's job script claims the job's external runs: the worker listens on
    # `{dir}/task-step.sock` and writes `{dir}/task-step`, the command that claims one.
    task_steps: bool = field(default=False, metadata=_f(_flag, omit_default=True))

    def __post_init__(self) -> None:
        # Whole-message checks, here so that decode and a sender building one both make them.
        where = f"service {self.name!r}"
        both = sorted(set(self.files) & set(self.secrets))
        if both:
            raise ProtocolError(f"{where}: {both[0]!r} is both a config file and a secret")
        if self.ready_file and self.ready_file in {*self.files, *self.secrets}:
            raise ProtocolError(
                f"{where}: its ready file {self.ready_file!r} is one of the files sent with it "
                "(it would be ready before it starts): name a file the daemon writes"
            )
        texts = [*self.argv, *self.files.values(), *self.env.values()]
        for text in texts:
            for match in SERVICE_PLACEHOLDER.finditer(text):
                port = match[2]
                if port is not None and port not in self.ports:
                    raise ProtocolError(
                        f"{where} names {match[0]} but asks for no port {port!r} "
                        f"(its ports: {', '.join(self.ports) or 'none'})"
                    )


@_message
@dataclass(frozen=True)
class ServiceStop(Message):
    """Stop a service run with its process group: `service_exited` (stopped) answers."""

    TYPE = "service_stop"
    job: str = field(metadata=JOB)
    name: str = field(metadata=SERVICE)


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


# What `suspension` says: the owner came back and the peer stopped its runs (SIGSTOP), or
# went away again within the worker's vacate_after and they continue (SIGCONT).
SUSPENSION_STATES = ("suspended", "resumed")


@_message
@dataclass(frozen=True)
class Suspension(Message):
    """The holder's runs on this peer are suspended, or resumed: the lease holds throughout.
    An owner who stays past vacate_after ends it with `preempted` (the runs are vacated)."""

    TYPE = "suspension"
    job: str = field(metadata=JOB)
    state: str = field(metadata=_f(_one_of(*SUSPENSION_STATES)))
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
    # The last MAX_LOG bytes of what the command wrote on stdout and stderr, and how many it
    # wrote in all (more than the tail holds: the head was dropped). Optional: a peer of an
    # earlier release sends none.
    stdout: bytes = field(default=b"", metadata=LOG)
    stderr: bytes = field(default=b"", metadata=LOG)
    stdout_size: int = field(default=0, metadata=SIZE)
    stderr_size: int = field(default=0, metadata=SIZE)


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
class ServiceUp(Message):
    """The service runs: the ports the worker picked for it, and its `{dir}` on the peer."""

    TYPE = "service_up"
    job: str = field(metadata=JOB)
    name: str = field(metadata=SERVICE)
    ports: dict[str, int] = field(metadata=_f(_ports))
    directory: str = field(metadata=_f(_directory))


@_message
@dataclass(frozen=True)
class ServiceFailed(Message):
    """The service could not start (or be stopped: it was not running); `reason` says why,
    with the end of its log when it ran."""

    TYPE = "service_failed"
    job: str = field(metadata=JOB)
    name: str = field(metadata=SERVICE)
    reason: str = field(metadata=TEXT)


@_message
@dataclass(frozen=True)
class ServiceExited(Message):
    """The service's process ended: `stopped` on a `service_stop`, else on its own (a crash).
    `exit_code` as Popen's returncode: negative for a signal."""

    TYPE = "service_exited"
    job: str = field(metadata=JOB)
    name: str = field(metadata=SERVICE)
    exit_code: int = field(metadata=_f(lambda v, w: _int(v, w, -(2**31), 2**31)))
    stopped: bool = field(metadata=_f(_flag))
    log_tail: str = field(metadata=TEXT)


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
class Locate(Message):
    """Where on disk is this content? Asked by a fetcher that may share the server's host."""

    TYPE = "locate"
    digest: str = field(metadata=DIGEST)
    host: str = field(metadata=_f(lambda v, w: _str(v, w, MAX_NAME)))  # the asker's identity


@_message
@dataclass(frozen=True)
class Located(Message):
    """The answer to `locate`: the file's absolute path, "" if not on the asker's host."""

    TYPE = "located"
    digest: str = field(metadata=DIGEST)
    path: str = field(metadata=_f(_local_path))


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


@dataclass(frozen=True, slots=True)
class _WireField:
    """What encoding and decoding need of one message field, read once per message type
    (dataclasses.fields() and the metadata lookups cost more than the packing itself)."""

    name: str
    default: Any  # MISSING when the field is required
    optional: bool  # has a default (or a default factory): may be absent from a frame
    omit_default: bool
    pack: Any  # value -> wire value, or None
    check: Any  # (wire value, what) -> value


_WIRE_FIELDS: dict[type[Message], tuple[_WireField, ...]] = {}


def _wire_fields(cls: type[Message]) -> tuple[_WireField, ...]:
    known = _WIRE_FIELDS.get(cls)
    if known is None:
        known = _WIRE_FIELDS[cls] = tuple(
            _WireField(
                f.name,
                f.default,
                f.default is not MISSING or f.default_factory is not MISSING,
                bool(f.metadata[_OMIT_DEFAULT]),
                f.metadata[_PACK],
                f.metadata[_CHECK],
            )
            for f in fields(cls)
        )
    return known


def as_map(message: Message) -> dict[str, Any]:
    """The message as it goes on the wire (a map of plain values)."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE}
    for f in _wire_fields(type(message)):
        value = getattr(message, f.name)
        if f.omit_default and value == f.default:
            continue
        body[f.name] = f.pack(value) if f.pack is not None else value
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


def _unpack(frame: bytes | memoryview, limit: int) -> Any:
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


def decode(frame: bytes | memoryview, limit: int = MAX_CONTROL_FRAME) -> Message:
    """The message in `frame`, checked field by field; ProtocolError otherwise.

    `frame` may be a view of a zmq frame's buffer: a `chunk`'s data is copied out of it once.
    """
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
    for f in _wire_fields(cls):
        if f.name not in values:
            if f.optional:
                continue  # an optional field, added later
            raise ProtocolError(f"{cls.TYPE!r} message without its {f.name!r} field")
        kwargs[f.name] = f.check(values[f.name], f"{cls.TYPE} {f.name}")
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


def service_of(frame: bytes) -> tuple[str, str, str] | None:
    """(type, job, service name) named by a frame that may fail `decode`, else None: so a
    malformed `service_start` is answered `service_failed`, not left unanswered."""
    try:
        msg = msgpack.unpackb(frame[:MAX_CONTROL_FRAME], raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(msg, dict) or msg.get("t") not in (ServiceStart.TYPE, ServiceStop.TYPE):
        return None
    try:
        return (msg["t"], check_job(msg.get("job")), check_service_name(msg.get("name")))
    except ProtocolError:
        return None


_SMALL_RUN_FILES = 64  # a run with at most this many files is tried whole first


def split_run(run: Run) -> list[Run | RunPart]:
    """`run` as frames that fit: the `run` with as many inputs and outputs as fit, then
    `run_part`s with the rest. ProtocolError if it cannot be sent at all."""
    if len(run.inputs) + len(run.outputs) <= _SMALL_RUN_FILES:
        # Most runs: a few files, far under a frame; one encode tells. (One that fails goes
        # the long way, which says what is wrong in the words of a split.)
        with contextlib.suppress(ProtocolError):
            if len(encode(run)) <= MAX_CONTROL_FRAME // 2:
                return [run]
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
