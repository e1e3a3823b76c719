"""The wire: versioned msgpack messages, their schemas and size limits, and CURVE sockets.

Every message is one msgpack map ``{"v": 1, "t": <type>, ...}`` in one zmq frame. `decode`
is the boundary: it checks the size, the version, the type and every field's type against
`SCHEMAS`, so code past it can trust what it reads. Anything else is a `ProtocolError`,
which a daemon logs and answers (or drops); it is never fatal.

Two conversations run over two socket pairs so that data never queues behind control:
- control (coordinator DEALER -> worker ROUTER): reserve, heartbeat, release, run, cancel,
  prefetch, probe; worker replies, task reports and `prefetched` flow back on the same
  connection. `reserve` hands the peer the job's own CURVE keypair: while reserved, the
  peer's data server admits that key and the peer fetches the job's files with it;
- data (fetcher DEALER -> server ROUTER): `get` a byte range of a content-addressed file,
  answered by `chunk` or `missing`. The fetcher keeps a window of requests in flight, which is
  the back-pressure: a server never sends what was not asked for. Data servers are peers
  (intermediate files stay where they were made) and the coordinator (the submit directory).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from bonjourgrid.errors import ProtocolError
from bonjourgrid.keys import Keypair

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CHUNK_SIZE = 1024 * 1024  # bytes of file data per `chunk` message
MAX_CONTROL_FRAME = 4 * 1024 * 1024  # a `run` carries a command and input lists, never file data
MAX_DATA_FRAME = CHUNK_SIZE + 4096  # one chunk plus its envelope
MAX_STRING = 64 * 1024
MAX_LIST = 100_000
# A connection that has not completed its CURVE handshake by then is closed (libzmq's default
# is 30 s): anyone on the LAN can open TCP connections before any key is checked.
HANDSHAKE_IVL_MS = 3000

_ANY = object()
# Field types per message type. A tuple means "one of"; `list`/`dict` are checked shallowly
# here and item by item by the handler that reads them (see `check_list`).
SCHEMAS: dict[str, dict[str, Any]] = {
    # coordinator -> worker (control)
    # job_public/job_secret: the job's CURVE keypair (Z85), "" for both under --insecure
    "reserve": {
        "job": str,
        "lease_s": (int, float),
        "coordinator": str,
        "job_public": str,
        "job_secret": str,
    },
    "heartbeat": {"job": str, "lease_s": (int, float)},
    "release": {"job": str},
    "run": {
        "job": str,
        "task": str,
        "attempt": int,
        "command": str,
        "inputs": list,
        "outputs": list,
        "env": dict,
        "limits": dict,  # {"cpu_s": seconds, "memory": bytes}, each optional: worker/limits.py
    },
    "cancel": {"job": str, "task": str},
    # files: [[digest, size, [[endpoint, server_key, label], ...]], ...], as `run` inputs
    "prefetch": {"job": str, "files": list},
    "probe": {"digests": list},  # any state: which of these the peer's cache holds
    # worker -> coordinator (control)
    "reserved": {"job": str, "data_port": int, "cpus": int},
    "denied": {"job": str, "reason": str},
    "heartbeat_ack": {"job": str},
    "released": {"job": str},
    "preempted": {"job": str, "reason": str},  # the owner came back: the peer left the job
    "task_done": {
        "job": str,
        "task": str,
        "attempt": int,
        "exit_code": int,
        "outputs": list,
        "stderr_tail": str,
        "error": str,
        "fetch_s": (int, float),
        "run_s": (int, float),
        "bytes_fetched": int,  # the sum of `fetched` bytes
        "fetched": list,  # [[digest, source label, bytes], ...]: inputs this run moved
        "hit_bytes": int,  # input bytes found in the local cache
    },
    # one per prefetched file; source "" (and bytes 0) when it was already there or failed
    "prefetched": {
        "job": str,
        "digest": str,
        "source": str,
        "bytes": int,
        "seconds": (int, float),
        "error": str,
    },
    "holding": {"digests": list},  # the answer to `probe`
    "error": {"reason": str},
    # `bgrid cancel` -> coordinator (job control) and its answer
    "cancel_job": {"job": str, "by": str},  # by: who asks, e.g. user@host, for the report
    "cancelling": {"job": str},
    # data plane
    "get": {"digest": str, "offset": int, "size": int},
    "chunk": {"digest": str, "offset": int, "data": bytes},
    "missing": {"digest": str},
}


def encode(msg_type: str, **fields: Any) -> bytes:
    """One frame holding a message of `msg_type`; fields are not checked (we trust ourselves)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": msg_type, **fields}, use_bin_type=True)


def decode(frame: bytes, limit: int = MAX_CONTROL_FRAME) -> dict[str, Any]:
    """The message in `frame`, checked against its schema; ProtocolError otherwise."""
    if len(frame) > limit:
        raise ProtocolError(f"frame of {len(frame)} bytes is over the {limit}-byte limit")
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STRING,
            max_bin_len=limit,
            max_array_len=MAX_LIST,
            max_map_len=MAX_LIST,
        )
    except Exception as err:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"not a msgpack message: {type(err).__name__}") from err
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message is a map, got {type(msg).__name__}")
    if type(msg.get("v")) is not int or msg["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {msg.get('v')!r}, this peer speaks {PROTOCOL_VERSION}"
        )
    msg_type = msg.get("t")
    schema = SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    for field, expected in schema.items():
        value = msg.get(field, _ANY)
        if value is _ANY:
            raise ProtocolError(f"{msg_type!r} message without its {field!r} field")
        # bool is an int in Python; a flag is never a valid count here
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ProtocolError(f"{msg_type!r} field {field!r} has the wrong type")
    return msg


def check_list(items: list[Any], shape: tuple[type, ...], what: str) -> list[tuple[Any, ...]]:
    """Items of a list field that must each be a list of values of the types in `shape`."""
    checked = []
    for item in items:
        if (
            not isinstance(item, list | tuple)
            or len(item) != len(shape)
            or not all(
                isinstance(v, t) and not isinstance(v, bool)
                for v, t in zip(item, shape, strict=True)
            )
        ):
            raise ProtocolError(f"malformed {what} entry")
        checked.append(tuple(item))
    return checked


def str_mapping(value: Mapping[Any, Any], what: str) -> dict[str, str]:
    """A field that must map strings to strings (task environments)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ProtocolError(f"{what} must map strings to strings")
    return dict(value)


# -- serving --------------------------------------------------------------------------------

Handler = Callable[[bytes, dict[str, Any]], Awaitable[bytes | None]]


async def serve(
    sock: zmq.asyncio.Socket,
    what: str,
    handle: Handler,
    limit: int = MAX_CONTROL_FRAME,
    admit: Callable[[zmq.Frame], bool] | None = None,
) -> None:
    """Answer requests on a ROUTER until cancelled; `handle(client, msg)` returns the reply.

    Whatever a client sends, the loop goes on: a message of the wrong shape is dropped, one
    that fails `decode` or that `handle` refuses (ProtocolError) gets an `error` reply; both
    are logged as "<what>: <problem>". `admit(frame)` (the frame carries the CURVE key that
    opened the connection) may refuse a request: its client gets an `error` reply.
    """
    while True:
        frames = await sock.recv_multipart(copy=False)
        if len(frames) != 2:
            log.warning("%s: dropped a message of %d frames", what, len(frames))
            continue
        client, frame = frames[0].bytes, frames[1]
        if admit is not None and not admit(frame):
            reply: bytes | None = encode("error", reason="this client's key is no longer admitted")
        else:
            try:
                reply = await handle(client, decode(frame.bytes, limit))
            except ProtocolError as err:
                log.warning("%s: %s", what, err)
                reply = encode("error", reason=str(err))
        if reply is not None:
            await sock.send_multipart([client, reply])


# -- sockets --------------------------------------------------------------------------------


class KeyPolicy:
    """Which CURVE client keys a server socket accepts; pyzmq's authenticator asks `callback`."""

    def __init__(self, allowed: set[bytes] | None = None) -> None:
        self.allowed: set[bytes] = set(allowed or ())

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed


def start_authenticator(
    ctx: zmq.asyncio.Context, policies: Mapping[str, KeyPolicy]
) -> AsyncioAuthenticator:
    """Start pyzmq's ZAP authenticator with one key policy per ZAP domain."""
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    for domain, policy in policies.items():
        auth.configure_curve_callback(domain, credentials_provider=policy)
    return auth


def _common(sock: zmq.asyncio.Socket, limit: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limit + 1024)  # libzmq drops the peer on a bigger frame
    # What bounds the connections a stranger can hold open. libzmq cannot cap the number of
    # connections a listening socket accepts (there is no such option), nor stop an idle
    # TCP connect before the handshake timer runs, so the open-file limit is raised at start
    # (`fdlimit.py`) and every connection must prove itself quickly: the CURVE handshake
    # within HANDSHAKE_IVL_MS, then keepalives close connections whose host went away.
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)  # s
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)  # s
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)


def server_socket(
    ctx: zmq.asyncio.Context,
    keypair: Keypair | None,
    domain: str,
    limit: int,
) -> zmq.asyncio.Socket:
    """A ROUTER that only CURVE clients allowed by `domain`'s policy can reach (plain: no key)."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, limit)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes its identity back
    if keypair is not None:
        assert keypair.secret is not None
        sock.curve_server = True
        sock.curve_publickey = keypair.public
        sock.curve_secretkey = keypair.secret
        sock.zap_domain = domain.encode()
    return sock


def client_socket(
    ctx: zmq.asyncio.Context,
    keypair: Keypair | None,
    server_key: str,
    limit: int,
) -> zmq.asyncio.Socket:
    """A DEALER that proves `keypair` to a server whose public key is `server_key` (Z85)."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, limit)
    if keypair is not None:
        assert keypair.secret is not None
        sock.curve_serverkey = server_key.encode()
        sock.curve_publickey = keypair.public
        sock.curve_secretkey = keypair.secret
    return sock
