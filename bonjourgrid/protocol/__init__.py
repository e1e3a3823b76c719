"""The messages: one frozen dataclass per message type, decoded and validated in one place.

A frame is one msgpack map ``{"v": 1, "t": <type>, <field>: <value>, ...}``. `decode` is the
boundary: it checks the frame's size, the version and the type, then turns every field into
the type its dataclass declares and checks it (digests are 64 lowercase hex digits, paths are
relative and normalized, names are printable and bounded, numbers are finite and in range).
Past `decode`, code trusts what it reads: nothing a peer sent reaches a path or a log line
unchecked. Anything else is a `ProtocolError` with a message that says which field was wrong.

`encode` never builds a frame that the receiver's MAXMSGSIZE would drop: a message over its
frame limit is a ProtocolError at the sender. A `run` too big for one frame travels as a
`run` followed by `run_part`s (`split_run`), which the worker assembles before it starts.

The package: `fields.py` holds the limits and one check per kind of value; `messages.py` the
message classes, `encode`, `decode` and `split_run`. Import from here.
"""

from bonjourgrid.protocol.fields import (
    CHUNK_SIZE,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    MAX_LIST,
    MAX_LOG,
    MAX_NAME,
    MAX_PATH,
    MAX_RUN_FILES,
    MAX_RUN_PARTS,
    MAX_SIZE,
    MAX_STRING,
    PROTOCOL_VERSION,
    PrefetchFile,
    Source,
    TaskInput,
    check_path,
)
from bonjourgrid.protocol.messages import (
    MESSAGES,
    Cancel,
    CancelJob,
    Cancelling,
    Chunk,
    Denied,
    Error,
    Get,
    Heartbeat,
    HeartbeatAck,
    Holding,
    Message,
    Missing,
    Preempted,
    Prefetch,
    Prefetched,
    Probe,
    Refused,
    Release,
    Released,
    Reserve,
    Reserved,
    Run,
    RunPart,
    Started,
    TaskDone,
    as_map,
    attempt_of,
    decode,
    encode,
    frame_limit,
    from_fields,
    pack_raw,
    split_run,
)

__all__ = [
    "CHUNK_SIZE",
    "MAX_CONTROL_FRAME",
    "MAX_DATA_FRAME",
    "MAX_LIST",
    "MAX_LOG",
    "MAX_NAME",
    "MAX_PATH",
    "MAX_RUN_FILES",
    "MAX_RUN_PARTS",
    "MAX_SIZE",
    "MAX_STRING",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "Cancel",
    "CancelJob",
    "Cancelling",
    "Chunk",
    "Denied",
    "Error",
    "Get",
    "Heartbeat",
    "HeartbeatAck",
    "Holding",
    "Message",
    "Missing",
    "Preempted",
    "Prefetch",
    "PrefetchFile",
    "Prefetched",
    "Probe",
    "Refused",
    "Release",
    "Released",
    "Reserve",
    "Reserved",
    "Run",
    "RunPart",
    "Source",
    "Started",
    "TaskDone",
    "TaskInput",
    "as_map",
    "attempt_of",
    "check_path",
    "decode",
    "encode",
    "frame_limit",
    "from_fields",
    "pack_raw",
    "split_run",
]
