"""The wire: versioned msgpack messages, their schemas and size limits, and CURVE sockets.

Every message is one msgpack map ``{"v": 1, "t": <type>, ...}`` in one zmq frame, and one
frozen dataclass in `protocol.py`. `decode` is the boundary: it checks the size, the version,
the type and every field's value, so code past it can trust what it reads. Anything else is a
`ProtocolError`, which a daemon logs and answers (or drops); it is never fatal.

Two conversations run over two socket pairs so that data never queues behind control:
- control (coordinator DEALER -> worker ROUTER): reserve, heartbeat, release, run, cancel,
  prefetch, probe; worker replies, task reports and `prefetched` flow back on the same
  connection. Every accepted `run` is acknowledged (`started`), a refused one answered
  (`refused`), and each `heartbeat_ack` lists the runs the peer has going. `reserve` hands
  the peer the job's own CURVE keypair: while reserved, the
  peer's data server admits that key and the peer fetches the job's files with it;
- data (fetcher DEALER -> server ROUTER): `get` a byte range of a content-addressed file,
  answered by `chunk` or `missing`. The fetcher keeps a window of requests in flight, which is
  the back-pressure: a server never sends what was not asked for. Data servers are peers
  (intermediate files stay where they were made) and the coordinator (the submit directory).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from bonjourgrid.errors import ProtocolError
from bonjourgrid.keys import Keypair

# The messages and their limits live in protocol.py; the wire re-exports them.
from bonjourgrid.protocol import (
    CHUNK_SIZE,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    MAX_LIST,
    MAX_STRING,
    PROTOCOL_VERSION,
    Error,
    Message,
    as_map,
    decode,
    encode,
    pack_raw,
)

log = logging.getLogger(__name__)

# A connection that has not completed its CURVE handshake by then is closed (libzmq's default
# is 30 s): anyone on the LAN can open TCP connections before any key is checked.
_REQUESTS_IN_A_ROW = 64  # requests `serve` takes before it lets the loop run others
HANDSHAKE_IVL_MS = 3000

__all__ = [
    "CHUNK_SIZE",
    "MAX_CONTROL_FRAME",
    "MAX_DATA_FRAME",
    "MAX_LIST",
    "MAX_STRING",
    "PROTOCOL_VERSION",
    "KeyPolicy",
    "Message",
    "as_map",
    "client_socket",
    "decode",
    "encode",
    "pack_raw",
    "serve",
    "server_socket",
    "start_authenticator",
]


# -- serving --------------------------------------------------------------------------------

Handler = Callable[[bytes, Message], Awaitable[bytes | None]]
# What a server answers a frame that fails `decode` (default: an `error` reply).
Refuser = Callable[[bytes, bytes, ProtocolError], Awaitable[bytes | None]]


async def serve(
    sock: zmq.asyncio.Socket,
    what: str,
    handle: Handler,
    limit: int = MAX_CONTROL_FRAME,
    admit: Callable[[zmq.Frame], bool] | None = None,
    refuse: Refuser | None = None,
) -> None:
    """Answer requests on a ROUTER until cancelled; `handle(client, msg)` returns the reply.

    Whatever a client sends, the loop goes on: a message of the wrong shape is dropped, one
    that fails `decode` or that `handle` refuses (ProtocolError) gets an `error` reply; both
    are logged as "<what>: <problem>". `admit(frame)` (the frame carries the CURVE key that
    opened the connection) may refuse a request: its client gets an `error` reply.
    `refuse(client, frame, error)` answers a frame that fails `decode` instead (e.g. a worker's
    `refused` for a run it cannot read); it may return None to answer nothing.
    """
    # Requests already queued are taken through a synchronous shadow of the socket, with no
    # future and no loop turn each (a few at a time, then the loop runs others). Receives
    # only: a shadow's send could consume the edge of zmq's edge-triggered descriptor that
    # an asyncio receive waits on; here no asyncio receive waits while the shadow reads.
    direct: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
    in_a_row = 0
    while True:
        frames: list[zmq.Frame] | None = None
        if in_a_row < _REQUESTS_IN_A_ROW:
            with contextlib.suppress(zmq.Again):
                frames = direct.recv_multipart(zmq.NOBLOCK, copy=False)
        if frames is None:
            in_a_row = 0
            frames = await sock.recv_multipart(copy=False)
        in_a_row += 1
        if len(frames) != 2:
            log.warning("%s: dropped a message of %d frames", what, len(frames))
            continue
        client, frame = frames[0].bytes, frames[1]
        if admit is not None and not admit(frame):
            reply: bytes | None = encode(Error("this client's key is no longer admitted"))
        else:
            try:
                msg = decode(frame.bytes, limit)
            except ProtocolError as err:
                log.warning("%s: %s", what, err)
                if refuse is not None:
                    reply = await refuse(client, frame.bytes, err)
                else:
                    reply = encode(Error(str(err)[:1000]))
            else:
                try:
                    reply = await handle(client, msg)
                except ProtocolError as err:
                    log.warning("%s: %s", what, err)
                    reply = encode(Error(str(err)[:1000]))
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
