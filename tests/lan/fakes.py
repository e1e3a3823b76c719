"""Hosts that attack a grid without its key: fake peers advertised over mDNS, and a flood of
idle TCP connections. Each runs as a script inside a test host (`Host.popen`) and prints one
JSON line when it is in place; the LAN tests and `benchmarks/fake_peers.py` share them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .netns import Host

READY_S = 120.0  # 2,000 fake services are registered, or 2,200 connections open, by then

# Registers N services `fake-<tag>-<i>._bonjourgrid._tcp.local.` with an idle peer's TXT, as a
# real worker writes it (discovery/txt.py): cost 0 and 64 cpus, so they rank first. Half point
# at a TCP port that accepts and never answers, half at a closed port. Given the grid's key
# directory, each carries a credential the grid issued, as 2,000 enrolled desktops that froze
# would: the worst case, which coordinators probe and reserve (a fake without a credential is
# never even contacted: tests/lan/test_trust.py).
_FAKE_PEERS = r"""
import asyncio, json, socket, sys
import zeroconf._core
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
from bonjourgrid.discovery.txt import PEER_SERVICE, PeerRecord, peer_txt
from pathlib import Path
from bonjourgrid.credentials import issue
from bonjourgrid.keys import load_grid_key

count, tag, ip, key_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
grid_key = load_grid_key(key_dir)
grid = grid_key.fingerprint
# A liar needs no manners: no probing, no spaced announcements (names are ours anyway).
for constant in ("_CHECK_TIME", "_REGISTER_TIME", "_UNREGISTER_TIME"):
    setattr(zeroconf._core, constant, 5)
silent = socket.socket()
silent.bind((ip, 0))
silent.listen(4096)  # the kernel completes connections; nobody ever reads them
with socket.socket() as closed:
    closed.bind((ip, 0))
    closed_port = closed.getsockname()[1]
ports = (silent.getsockname()[1], closed_port)

async def main():
    azc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    infos = []
    for i in range(count):
        name = f"fake-{tag}-{i}"
        identity = issue(grid_key, name) if grid_key.secret else None
        record = PeerRecord(
            name=name, addresses=(ip,), port=ports[i % 2], state="idle", job=None, cpus=64,
            ram=65536, disk=100_000, cost=0.0, arch="x86_64", os="linux", mw=("native",),
            key=identity.keypair.public.decode() if identity else grid_key.public.decode(),
            grid=grid, cred=identity.credential if identity else "",
        )
        infos.append(ServiceInfo(
            PEER_SERVICE, f"{name}.{PEER_SERVICE}", port=record.port,
            properties=peer_txt(record), addresses=[socket.inet_aton(ip)],
            server=f"fake-{tag}.local.",
        ))
    for start in range(0, count, 100):
        batch = infos[start:start + 100]
        waits = [await azc.async_register_service(i, cooperating_responders=True) for i in batch]
        await asyncio.gather(*waits)
    print(json.dumps({"registered": count, "ports": ports}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

# Opens N idle TCP connections to each (ip, port) given, sends nothing, and opens a new one
# whenever the server closes one (as a handshake timeout does). Prints the count once all are
# open, then every second.
_FLOOD = r"""
import json, resource, selectors, socket, sys, time
count, ip, ports = int(sys.argv[1]), sys.argv[2], [int(p) for p in sys.argv[3:]]
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
reopened = 0

def connect(port):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((ip, port))
    sel.register(s, selectors.EVENT_READ, port)

for port in ports:
    for _ in range(count):
        connect(port)
said = 0.0
while True:
    for key, _ in sel.select(timeout=0.2):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        if not data:  # closed by the server (or refused): keep the pressure on
            sel.unregister(s)
            s.close()
            connect(key.data)
            reopened += 1
    if time.monotonic() - said >= 1.0:
        said = time.monotonic()
        print(json.dumps({"open": len(sel.get_map()), "reopened": reopened}), flush=True)
"""


class Script:
    """A script running in a host; `wait_ready` reads its first JSON line."""

    def __init__(self, host: Host, source: str, *args: str) -> None:
        self.host = host
        self.proc = host.popen([sys.executable, "-c", source, *args])
        self.out = host.record(self.proc).stdout_path

    def lines(self) -> list[dict[str, Any]]:
        text = Path(self.out).read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_ready(self, what: str, deadline_s: float = READY_S) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        while not (lines := self.lines()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} died:\n{self.host.describe_logs()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what} not ready after {deadline_s} s")
            time.sleep(0.1)
        return lines[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def advertise_fake_peers(host: Host, count: int, tag: str, key_dir: Path) -> Script:
    """`count` fake idle peers of the grid whose key is in `key_dir`, on `host`, that never
    answer (registered on return); enrolled if `key_dir` holds the grid's secret."""
    fakes = Script(host, _FAKE_PEERS, str(count), tag, host.ip, str(key_dir))
    fakes.wait_ready(f"{count} fake peers")
    return fakes


def flood(host: Host, target_ip: str, ports: list[int], count: int) -> Script:
    """`count` idle TCP connections from `host` to each port of `target_ip` (open on return)."""
    flooder = Script(host, _FLOOD, str(count), target_ip, *map(str, ports))
    flooder.wait_ready(f"a flood of {count} connections per port")
    return flooder


def listening_ports(host: Host, pid: int) -> list[int]:
    """The TCP ports process `pid` listens on in `host` (`ss`, inside the namespace)."""
    done = host.run(["ss", "-ltnpH"], timeout=10)
    ports = []
    for line in done.stdout.splitlines():
        if f"pid={pid}," in line:
            ports.append(int(line.split()[3].rsplit(":", 1)[1]))
    return sorted(ports)
