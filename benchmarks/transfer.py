"""Files at wire speed (issue 12): one big input moved to a worker, against the machine's limits.

Three measures, each interleaved (A, B, A, B...) and printed as median [min-max] MB/s:

- `lan`: a data server on one namespace host, a fetcher on another (no rate limit), each its
  own process. Raw CurveZMQ (a DEALER pulling 1 MiB frames with the product's window) against
  the product's verified fetch (`Fetcher` from `DataServer`: CURVE, SHA-256, file written).
  Target: product >= 75% of raw CURVE. Needs root (network namespaces).
- `host`: holder and fetcher on one host (`--local`): the product's fetch (a same-host copy,
  `cache/same_host.py`), the same fetch forced over the wire, and the machine's limits for a
  verified copy: `cp` (copy_file_range alone) and SHA-256 of the file alone. Target >= 1 GB/s.
- `digests`: staging the same input for a first submit (hashed) and the next (digest cache).

    sudo .venv/bin/python benchmarks/transfer.py [--size-mib 1024] [--repeats 5] [--only lan]

Files live in /dev/shm when it exists (the page cache, as Dask's copy is measured), else the
temporary directory. Nothing is faked: every byte fetched is checked against its digest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
# The checkout whose bonjourgrid is measured: `--baseline DIR` runs the two ends of `lan`
# again from another checkout (e.g. a worktree of main), interleaved with this one.
_ROOT = Path(os.environ.get("BGRID_BENCH_ROOT", _HERE.parent))
sys.path[:0] = [str(_ROOT), str(_HERE.parent)]  # bonjourgrid/, tests/lan/netns.py

import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

# Only what a checkout of main has too: the two ends of `lan` run from either.
from bonjourgrid import wire  # noqa: E402
from bonjourgrid.cache import transfer  # noqa: E402
from bonjourgrid.cache.store import FileRef, hash_file, private_copy  # noqa: E402
from bonjourgrid.cache.transfer import DataServer, Fetcher, Source  # noqa: E402
from bonjourgrid.keys import Keypair  # noqa: E402

MB = 1_000_000
_CHUNK = wire.CHUNK_SIZE
_START_S = 30.0


def make_input(directory: Path, size: int) -> tuple[Path, FileRef]:
    path = directory / "big.bin"
    sha = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, 16 * _CHUNK):
            block = os.urandom(min(16 * _CHUNK, size - offset))
            sha.update(block)
            out.write(block)
    return path, FileRef(sha.hexdigest(), size)


def summary(size: int, seconds: list[float]) -> dict[str, Any]:
    rates = sorted(size / MB / s for s in seconds)
    return {
        "median_MBps": round(statistics.median(rates), 1),
        "range_MBps": [round(rates[0], 1), round(rates[-1], 1)],
    }


def interleaved(kinds: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind, measure in kinds.items():
            samples[kind].append(measure())
    return samples


# -- the two ends, as processes ----------------------------------------------------------------


async def serve(kind: str, path: Path, client_public: bytes, bind_ip: str) -> None:
    """A data server: raw (every `get` answered by a 1 MiB frame) or the product's."""
    ctx = zmq.asyncio.Context()
    keys = Keypair.generate()
    auth = wire.start_authenticator(ctx, {"data": wire.KeyPolicy({client_public})})
    sock = wire.server_socket(ctx, keys, "data", 4096)
    port = sock.bind_to_random_port(f"tcp://{bind_ip}")
    print(port, keys.public.decode(), flush=True)
    try:
        if kind == "product":
            await DataServer(sock, lambda digest: path).serve_forever()
        payload = os.urandom(_CHUNK)
        while True:
            ident, _ = await sock.recv_multipart()
            await sock.send_multipart([ident, payload], copy=False)
    finally:
        auth.stop()
        ctx.destroy(linger=0)


async def fetch(kind: str, endpoint: str, server_key: str, ref: FileRef, dest: Path) -> float:
    """Seconds to pull `ref.size` bytes: raw frames, or the product's verified fetch."""
    ctx = zmq.asyncio.Context()
    client = Keypair(os.environb[b"BENCH_PUBLIC"], os.environb[b"BENCH_SECRET"])
    try:
        if kind == "product":
            fetcher = Fetcher(ctx, client)
            try:
                start = time.perf_counter()
                await fetcher.fetch(ref, [Source(endpoint, server_key, "holder")], dest)
                seconds = time.perf_counter() - start
            finally:
                fetcher.close()
            assert hash_file(dest) == ref, "the fetched file is not the file"
            dest.unlink()
            return seconds
        sock = wire.client_socket(ctx, client, server_key, wire.MAX_DATA_FRAME)
        sock.connect(endpoint)
        n_chunks = -(-ref.size // _CHUNK)
        start = time.perf_counter()
        sent = received = 0
        while received < n_chunks:
            while sent - received < transfer._WINDOW and sent < n_chunks:
                await sock.send(b"get")
                sent += 1
            await sock.recv(copy=False)
            received += 1
        seconds = time.perf_counter() - start
        sock.close(linger=0)
        return seconds
    finally:
        ctx.destroy(linger=0)


# -- lan: two namespace hosts ------------------------------------------------------------------


def lan(size: int, repeats: int, tmp: Path, baseline: Path | None = None) -> dict[str, Any]:
    from tests.lan.netns import Lan, lan_available

    if (why := lan_available()) is not None:
        return {"skipped": why}
    path, ref = make_input(tmp, size)
    client = Keypair.generate()
    assert client.secret is not None
    env = {"BENCH_PUBLIC": client.public.decode(), "BENCH_SECRET": client.secret.decode()}
    script = str(Path(__file__).resolve())
    ends = {"raw CURVE": ("raw", sys.executable, {}), "product": ("product", sys.executable, {})}
    if baseline is not None:
        python = str(baseline / ".venv" / "bin" / "python")
        ends["product (baseline)"] = ("product", python, {"BGRID_BENCH_ROOT": str(baseline)})
    with Lan(2, tmp / "lan") as net:
        holder, worker = net.hosts
        servers = {}
        for name, (kind, python, extra) in ends.items():
            proc = holder.popen(
                [python, script, "--serve", kind, str(path), holder.ip],
                env={**env, **extra},
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            port, key = proc.stdout.readline().split()
            servers[name] = (f"tcp://{holder.ip}:{port}", key)

        def measure(name: str) -> Callable[[], float]:
            kind, python, extra = ends[name]

            def once() -> float:
                endpoint, key = servers[name]
                args = ["--fetch", kind, endpoint, key, ref.digest, str(size), str(tmp / "got")]
                done = worker.run(
                    [python, script, *args], timeout=600, check=True, env={**env, **extra}
                )
                return float(done.stdout.split()[-1])

            return once

        samples = interleaved({name: measure(name) for name in ends}, repeats)
        holder.terminate_all()
    out = {k: summary(size, v) for k, v in samples.items()}
    ratio = statistics.median(samples["raw CURVE"]) / statistics.median(samples["product"])
    out["product / raw CURVE"] = round(ratio, 3)
    return out


# -- host: one machine -------------------------------------------------------------------------


def host(size: int, repeats: int, tmp: Path) -> dict[str, Any]:
    from data_lan import product_fetch  # this checkout's only: `lan` runs from a baseline too

    path, ref = make_input(tmp, size)
    dest = tmp / "got"

    def product(same_host: bool) -> Callable[[], float]:
        def once() -> float:
            seconds, copied = asyncio.run(product_fetch(path, ref, dest, same_host))
            assert copied == (ref.size if same_host else 0)
            assert hash_file(dest) == ref
            dest.unlink()
            return seconds

        return once

    def cp() -> float:
        start = time.perf_counter()
        private_copy(path, dest)
        seconds = time.perf_counter() - start
        dest.unlink()
        return seconds

    def sha() -> float:
        start = time.perf_counter()
        hash_file(path)
        return time.perf_counter() - start

    kinds = {
        "product (same-host copy)": product(True),
        "product over CURVE": product(False),
        "cp (copy_file_range)": cp,
        "sha256 of the file": sha,
    }
    samples = interleaved(kinds, repeats)
    return {k: summary(size, v) for k, v in samples.items()}


# -- digests: a second submit ------------------------------------------------------------------


def second_submit(size: int, repeats: int, tmp: Path) -> dict[str, Any]:
    from bonjourgrid.cache import digests
    from bonjourgrid.coordinator.stage import stage_sources
    from bonjourgrid.dag import workflow_from_mapping

    root = tmp / "submit"
    root.mkdir()
    make_input(root, size)
    digests.RACY_S = 0.0  # the file was just written: let it be remembered at once
    spec = {"a": {"command": "true", "inputs": ["big.bin"]}}
    wf = workflow_from_mapping({"name": "bench", "tasks": spec}, root)
    cache = root / digests.DIGESTS_FILE

    def submit(first: bool) -> Callable[[], float]:
        def once() -> float:
            if first:
                cache.unlink(missing_ok=True)
            start = time.perf_counter()
            asyncio.run(stage_sources(wf, {}))
            return time.perf_counter() - start

        return once

    samples = interleaved({"first submit": submit(True), "next submit": submit(False)}, repeats)
    return {
        k: {
            "median_s": round(statistics.median(v), 4),
            "range_s": [round(min(v), 4), round(max(v), 4)],
        }
        for k, v in samples.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["lan", "host", "digests"], action="append")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--baseline", type=Path, help="lan: also measure this checkout's fetch")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)  # kind path ip
    ap.add_argument("--fetch", nargs=6, help=argparse.SUPPRESS)  # kind ep key digest size dest
    args = ap.parse_args()
    if args.serve:
        kind, path, ip = args.serve
        asyncio.run(serve(kind, Path(path), os.environb[b"BENCH_PUBLIC"], ip))
        return 0
    if args.fetch:
        kind, endpoint, key, digest, size, dest = args.fetch
        print(asyncio.run(fetch(kind, endpoint, key, FileRef(digest, int(size)), Path(dest))))
        return 0
    size = args.size_mib * 1024 * 1024
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    results: dict[str, Any] = {"file_MiB": args.size_mib, "repeats": args.repeats}
    results["load_before"] = os.getloadavg()
    measures: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
        "lan": lambda n, r, t: lan(n, r, t, args.baseline),
        "host": host,
        "digests": second_submit,
    }
    for name in args.only or list(measures):
        tmp = Path(tempfile.mkdtemp(prefix="bgrid-transfer-", dir=base))
        try:
            results[name] = measures[name](size, args.repeats, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n{name}")
        for kind, figures in results[name].items():
            print(f"  {kind:<28} {json.dumps(figures)}", flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
