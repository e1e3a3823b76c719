"""The worker's local cache on a real file system: LRU bound, pins, restarts, corruption, CLI."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import zmq.asyncio

from bonjourgrid import keys, wire
from bonjourgrid.cache.local import CacheBusyError, CacheFullError, LocalCache, cache_in_use
from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ConfigError
from bonjourgrid.units import MIB
from bonjourgrid.worker.config import worker_settings
from bonjourgrid.worker.daemon import WorkerConfig, WorkerDaemon, default_cache_dir
from tests.inproc.test_worker_daemon import (
    REPLY_S,
    Coordinator,
    Peer,
    coordinator,  # noqa: F401  (a fixture)
    digest,
    peer,  # noqa: F401  (a fixture)
)

KIB = 1024


def put(cache: LocalCache, data: bytes) -> FileRef:
    """Bring `data` in the way a task's fetch does: admit, write the partial, commit."""
    ref = FileRef(hashlib.sha256(data).hexdigest(), len(data))
    cache.admit(ref.size)
    partial = cache.incoming_path(ref.digest)
    partial.write_bytes(data)
    cache.commit(partial, ref.digest)
    return ref


def blob(i: int, size: int = KIB) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


class Clock:
    """Nanoseconds that move only when told: last-use order is exact, whatever the file system."""

    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        self.now += 10**9
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LocalCache]:
    c = LocalCache(tmp_path / "cache", 10 * KIB, clock=Clock())
    yield c
    c.close()


def digests(cache: LocalCache) -> list[str]:
    return [e.digest for e in cache.entries()]


# -- the bound and LRU order -------------------------------------------------------------------


def test_the_bound_holds_and_the_least_recently_used_files_go_first(cache: LocalCache) -> None:
    refs = [put(cache, blob(i)) for i in range(30)]
    assert cache.used_bytes == 10 * KIB
    assert digests(cache) == [r.digest for r in refs[20:]]
    on_disk = sorted(p.name for p in (cache.root / "objects").glob("*/*"))
    assert on_disk == sorted(r.digest for r in refs[20:])

    cache.touch(refs[20].digest)  # used again: now the most recent, so it stays
    newest = put(cache, blob(100))
    assert refs[20].digest in digests(cache)
    assert refs[21].digest not in digests(cache)
    assert digests(cache)[-2:] == [refs[20].digest, newest.digest]
    assert cache.used_bytes <= cache.max_bytes  # type: ignore[operator]


def test_a_cache_without_a_bound_keeps_everything(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache")
    for i in range(20):
        put(cache, blob(i))
    assert len(cache.entries()) == 20 and cache.used_bytes == 20 * KIB
    cache.close()


def test_the_free_room_is_what_the_bound_leaves(cache: LocalCache) -> None:
    put(cache, blob(1, 4 * KIB))
    assert cache.free_bytes() == 6 * KIB


# -- pins ----------------------------------------------------------------------------------------


def test_pinned_files_are_never_evicted(cache: LocalCache) -> None:
    pinned = [put(cache, blob(i)) for i in range(3)]
    for ref in pinned:
        cache.pin(ref.digest)
    for i in range(3, 40):
        put(cache, blob(i))
    held = digests(cache)
    assert all(r.digest in held for r in pinned)
    assert cache.used_bytes == 10 * KIB


def test_admit_fails_clearly_when_pinned_files_fill_the_cache(cache: LocalCache) -> None:
    refs = [put(cache, blob(i)) for i in range(10)]
    for ref in refs:
        cache.pin(ref.digest)
    with pytest.raises(CacheFullError) as caught:
        cache.admit(KIB, "input 'raw/1.fits'")
    assert caught.value.errno == errno.ENOSPC
    assert "cache is full" in str(caught.value) and "raw/1.fits" in str(caught.value)
    assert digests(cache) == [r.digest for r in refs]  # nothing was evicted

    cache.unpin(refs[0].digest)
    cache.admit(KIB)  # room again: the one unpinned file goes
    assert refs[0].digest not in digests(cache)


def test_pins_are_counted(cache: LocalCache) -> None:
    ref = put(cache, blob(1))
    cache.pin(ref.digest)
    cache.pin(ref.digest)  # two tasks read it
    cache.unpin(ref.digest)  # one ended: still pinned
    cache.clear()
    assert digests(cache) == [ref.digest]
    cache.unpin(ref.digest)
    cache.clear()
    assert digests(cache) == []


def test_a_file_larger_than_the_whole_cache_is_refused(cache: LocalCache) -> None:
    with pytest.raises(CacheFullError, match=r"larger than this peer's whole cache"):
        cache.admit(11 * KIB, "output 'big.dat'")


# -- restarts ------------------------------------------------------------------------------------


def test_a_restarted_cache_keeps_its_files_in_the_same_order(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = LocalCache(root, 10 * KIB, clock=Clock())
    refs = [put(first, blob(i)) for i in range(5)]
    first.touch(refs[1].digest)
    first.touch(refs[0].digest)
    order = digests(first)
    assert order[-2:] == [refs[1].digest, refs[0].digest]
    with pytest.raises(CacheBusyError, match="in use by a running worker daemon"):
        LocalCache(root)  # one owner at a time
    assert cache_in_use(root)
    # What a daemon killed mid-fetch and mid-task leaves behind.
    leftover = first.incoming_path(refs[0].digest)
    leftover.write_bytes(b"half a fi")
    (root / "sandboxes" / "task-dead" / "sandbox").mkdir(parents=True)
    first.close()
    assert not cache_in_use(root)

    second = LocalCache(root, 10 * KIB, clock=Clock())
    assert digests(second) == order
    assert second.used_bytes == 5 * KIB
    assert not leftover.exists() and list((root / "sandboxes").iterdir()) == []
    second.admit(6 * KIB)  # the least recently used goes first, as before the restart
    assert digests(second) == order[1:]
    second.close()


def test_a_read_only_view_leaves_the_owner_alone(cache: LocalCache) -> None:
    put(cache, blob(1))
    partial = cache.incoming_path("ab" * 32)
    partial.write_bytes(b"in flight")
    view = LocalCache(cache.root, owner=False)
    assert digests(view) == digests(cache)
    assert partial.exists()


# -- corruption ----------------------------------------------------------------------------------


def corrupt(path: Path) -> None:
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other bytes


def test_a_corrupt_entry_is_found_and_dropped(cache: LocalCache) -> None:
    ref = put(cache, blob(7))
    assert cache.has(ref)
    corrupt(cache.path_of(ref.digest))
    assert not cache.has(ref)
    assert cache.locate(ref.digest) is None and ref.digest not in digests(cache)
    assert cache.used_bytes == 0


def test_an_entry_touched_but_intact_is_kept(cache: LocalCache) -> None:
    ref = put(cache, blob(7))
    os.utime(cache.path_of(ref.digest), ns=(1, 2))  # mtime moved: hashed again, still sound
    assert cache.has(ref) and cache.has(ref)


def test_verify_drops_corrupt_entries(cache: LocalCache) -> None:
    good, bad = put(cache, blob(1)), put(cache, blob(2))
    corrupt(cache.path_of(bad.digest))
    assert cache.verify() == [bad.digest]
    assert digests(cache) == [good.digest]


# -- in a real worker daemon ---------------------------------------------------------------------


async def test_a_corrupt_cached_input_is_fetched_again(
    peer: Peer,  # noqa: F811  (the imported fixture)
    coordinator: Coordinator,  # noqa: F811
) -> None:
    sock = await coordinator.reserve("job-1")
    text = b"the true bytes\n" * 500
    ref = coordinator.serve("in.txt", text)
    fields = coordinator.run_fields(
        "job-1", "a", "cp in.txt out.txt", {"in.txt": ref}, ("out.txt",)
    )
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    assert (done["exit_code"], done["bytes_fetched"]) == (0, len(text))

    cached = peer.daemon.store.locate(ref.digest)
    assert cached is not None
    corrupt(cached)  # a disk error, or a user's mistake, while the daemon runs

    fields = coordinator.run_fields(
        "job-1", "b", "cp in.txt out.txt", {"in.txt": ref}, ("out.txt",)
    )
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    assert (done["exit_code"], done["error"]) == (0, "")
    assert done["bytes_fetched"] == len(text)  # the corrupt copy was not used
    assert done["outputs"] == [["out.txt", digest(text), len(text)]]
    assert peer.daemon.store.has(ref)


async def test_an_output_larger_than_the_cache_fails_the_task_clearly(
    peer: Peer,  # noqa: F811  (the imported fixture)
    coordinator: Coordinator,  # noqa: F811
) -> None:
    peer.daemon.store.max_bytes = 64 * KIB
    sock = await coordinator.reserve("job-1")
    command = "head -c 100000 /dev/zero > big.dat"
    fields = coordinator.run_fields("job-1", "t", command, outputs=("big.dat",))
    await sock.send(wire.pack_raw("run", **fields))
    done = await coordinator.recv(sock)
    assert done["exit_code"] == 0 and done["outputs"] == []
    assert "output 'big.dat'" in done["error"] and "--cache-size" in done["error"]
    assert "another peer" in done["error"]
    assert peer.daemon.store.pinned() == {}


@asynccontextmanager
async def running_peer(cache_dir: Path) -> AsyncIterator[Peer]:
    """A worker daemon on `cache_dir`, stopped on exit."""
    grid = keys.ephemeral_grid_key()
    config = WorkerConfig(
        name=f"test-{uuid.uuid4().hex[:8]}",
        cpus=1,
        ram_mib=512,
        cost=0.0,
        cache_dir=cache_dir,
        grid=grid,
        interface="127.0.0.1",
    )
    daemon = WorkerDaemon(config)
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), REPLY_S)
        assert daemon.keypair is not None
        control = f"tcp://127.0.0.1:{daemon._control_port}"
        yield Peer(daemon, grid, control, daemon.keypair.public.decode())
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


@pytest.mark.usefixtures("quick_timing")
async def test_the_cache_survives_a_daemon_restart(
    tmp_path: Path, zctx: zmq.asyncio.Context
) -> None:
    cache_dir = tmp_path / "cache"
    text = b"kept across restarts\n" * 100
    reports = []
    for life in range(2):
        async with running_peer(cache_dir) as live:
            assert cache_in_use(cache_dir)
            with pytest.raises(CacheBusyError):
                LocalCache(cache_dir)
            coord = Coordinator(zctx, live, tmp_path / "submit")
            try:
                sock = await coord.reserve("job-1")
                ref = coord.serve("in.txt", text)
                fields = coord.run_fields("job-1", f"t{life}", "cat in.txt", {"in.txt": ref})
                await sock.send(wire.pack_raw("run", **fields))
                reports.append(await coord.recv(sock))
            finally:
                await coord.close()
        assert not cache_in_use(cache_dir)
    assert [(r["exit_code"], r["bytes_fetched"]) for r in reports] == [(0, len(text)), (0, 0)]


# -- `bgrid cache` -------------------------------------------------------------------------------


def bgrid(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
    }
    return subprocess.run(
        [sys.executable, "-m", "bonjourgrid.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bgrid_cache_lists_and_clears_a_workers_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    root = default_cache_dir("lab-12")
    cache = LocalCache(root)
    refs = [put(cache, blob(i, 3 * KIB)) for i in range(2)]
    cache.touch(refs[0].digest)

    busy = bgrid(tmp_path, "cache", "--name", "lab-12", "--clear")
    assert busy.returncode == 2 and "in use by a running worker daemon" in busy.stderr
    shown = bgrid(tmp_path, "cache", "--name", "lab-12")
    assert shown.returncode == 0, shown.stderr
    assert "a worker daemon is using it" in shown.stdout
    cache.close()

    listed = bgrid(tmp_path, "cache", "--name", "lab-12", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert (report["files"], report["bytes"], report["in_use"]) == (2, 6 * KIB, False)
    assert [e["digest"] for e in report["entries"]] == [refs[0].digest, refs[1].digest]

    text = bgrid(tmp_path, "cache", "--cache-dir", str(root)).stdout
    assert refs[0].digest[:12] in text and "2 files, 6.0 KiB" in text

    cleared = bgrid(tmp_path, "cache", "--name", "lab-12", "--clear")
    assert cleared.returncode == 0 and "6.0 KiB freed" in cleared.stdout
    after = json.loads(bgrid(tmp_path, "cache", "--name", "lab-12", "--json").stdout)
    assert (after["files"], after["bytes"]) == (0, 0)
    assert list((root / "objects").glob("*/*")) == []


def test_cache_size_comes_from_the_flag_or_worker_toml(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[worker]\ncache_size = 5\n")  # a bare number is MiB, as for ram
    assert worker_settings({}, config).cache_size == 5 * MIB
    assert worker_settings({"cache_size": "1500KiB"}, config).cache_size == 1500 * KIB
    assert worker_settings({"cache_size": "2.5"}, config).cache_size == int(2.5 * MIB)
    with pytest.raises(ConfigError, match="--cache-size"):
        worker_settings({"cache_size": "lots"}, config)
