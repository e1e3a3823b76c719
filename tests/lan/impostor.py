"""A keyless host posing as a worker, for the LAN tier: run as a script inside a test host.

It waits until it hears the real peer `--copy NAME` on mDNS, then advertises two services
that copy every TXT field of it (grid fingerprint, credential) at cost 0 with 64 CPUs, so
that they rank first:
- `--as NAME`-`own`: with a CURVE key of its own;
- `--as NAME`-`copy`: with the real peer's key (whose secret it does not have) and
  credential. (Under the real peer's very name it would only hide that peer from some
  coordinators, an mDNS name conflict, and get nothing more: tests/multiproc covers it.)
Each points at a CURVE ROUTER of its own that admits any client. It writes what reached it
to `--log` as JSON after every event: connections accepted, handshakes completed, and every
message received (its size and type), which a test asserts to be nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
from zmq.utils.monitor import recv_monitor_message

from bonjourgrid.discovery.browse import snapshot_peers
from bonjourgrid.discovery.txt import PEER_SERVICE, PeerRecord, peer_txt


class Trap:
    """A CURVE ROUTER that admits anyone and records whatever arrives."""

    def __init__(self, ctx: zmq.asyncio.Context, ip: str, label: str, log: dict[str, Any]):
        self.sock = ctx.socket(zmq.ROUTER)
        public, secret = zmq.curve_keypair()
        self.sock.curve_server = True
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.public = public.decode()
        self.port = self.sock.bind_to_random_port(f"tcp://{ip}")
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        self.entry: dict[str, Any] = {"accepted": 0, "handshakes": 0, "messages": []}
        log[label] = self.entry

    async def watch(self, save: Any) -> None:
        async def events() -> None:
            while True:
                event = (await recv_monitor_message(self.monitor))["event"]
                key = "accepted" if event == zmq.EVENT_ACCEPTED else "handshakes"
                self.entry[key] += 1
                save()

        async def messages() -> None:
            while True:
                frames = await self.sock.recv_multipart()
                kind = "?"
                with contextlib.suppress(Exception):
                    kind = str(msgpack.unpackb(frames[-1], raw=False).get("t"))
                self.entry["messages"].append({"type": kind, "bytes": len(frames[-1])})
                save()

        await asyncio.gather(events(), messages())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copy", required=True, help="the real peer's name")
    parser.add_argument("--as", dest="alias", required=True, help="the impostor's own name")
    parser.add_argument("--ip", required=True)
    parser.add_argument("--log", required=True, type=Path)
    args = parser.parse_args()

    log: dict[str, Any] = {"copied": None}

    def save() -> None:
        args.log.write_text(json.dumps(log))

    real: PeerRecord | None = None
    while real is None:
        peers = await snapshot_peers([args.ip], wait=0.5)
        real = next((p for p in peers if p.name == args.copy), None)
    log["copied"] = peer_txt(real)

    ctx = zmq.asyncio.Context()
    own = Trap(ctx, args.ip, "own-key", log)
    same = Trap(ctx, args.ip, "real-key", log)
    zc = AsyncZeroconf(interfaces=[args.ip], ip_version=IPVersion.V4Only)
    copies = ((f"{args.alias}-own", own, own.public), (f"{args.alias}-copy", same, real.key))
    for name, trap, key in copies:
        # Every field copied, but where to connect, and a rank no real peer can beat.
        fake = dataclasses.replace(
            real, name=name, addresses=(args.ip,), port=trap.port, cpus=64, cost=0.0, key=key
        )
        info = ServiceInfo(
            PEER_SERVICE,
            f"{name}.{PEER_SERVICE}",
            port=trap.port,
            properties=peer_txt(fake),
            addresses=[socket.inet_aton(args.ip)],
            server=f"{args.alias}.local.",
        )
        # No probing: an impostor claims the real peer's name although it is taken.
        await zc.async_register_service(info, cooperating_responders=True)
    log["advertised"] = True
    save()
    await asyncio.gather(own.watch(save), same.watch(save))


if __name__ == "__main__":
    asyncio.run(main())
