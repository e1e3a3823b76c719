"""The worker's local cache: a `ContentStore` with a size bound, LRU eviction and pins.

Theory of operation. The entries are the files under `objects/`; an in-memory index
(digest -> size, mtime) in least-recently-used order is rebuilt from them at start. Last use
survives restarts as each entry's atime, which `touch` sets (mtime is left alone, so a write
through a hard link still shows). Before bytes come in (`admit`) the least recently used
entries that nobody pins are evicted until the bound holds; when the pinned entries alone
leave no room, `CacheFullError` (ENOSPC) fails the task, which then runs on another peer.
Pins are counted: a running task pins its inputs, and the job that holds the peer pins its
outputs and prefetched files until its reservation ends (the daemon keeps those job pins).
An entry whose size or mtime differs from the index is re-hashed before use and dropped if
its bytes no longer match its name, so the task fetches it again.

One daemon owns a cache directory at a time: it holds an exclusive `flock` on `lock`, and
only the owner cleans up what a previous life left (`incoming/*.part`, `sandboxes/*`): first
the processes still running in those sandboxes (the owner's `stop_leftovers`), then the files.
The owner also makes an older, world-readable cache private (directories 0700, entries 0400).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bonjourgrid.cache.store import (
    DIR_MODE,
    ENTRY_MODE,
    ContentStore,
    FileRef,
    hash_file,
    is_digest,
)
from bonjourgrid.errors import ConfigError
from bonjourgrid.units import format_size

LOCK_NAME = "lock"
SANDBOXES = "sandboxes"


class CacheFullError(OSError):
    """No room in the cache for more bytes (ENOSPC): the task should run on another peer."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class CacheBusyError(ConfigError):
    """Another process (a running worker daemon) owns this cache directory."""


@dataclass(frozen=True)
class CacheEntry:
    """One cached file: its digest, size, and last use (ns since the epoch)."""

    digest: str
    size: int
    last_used_ns: int


@dataclass
class _Slot:
    size: int
    mtime_ns: int  # as last verified: another value means the bytes may have changed
    last_used_ns: int


class LocalCache(ContentStore):
    """A size-bounded, LRU, pin-aware content store that survives daemon restarts.

    `max_bytes=None`: unbounded. `owner=True` takes the directory's lock (CacheBusyError if a
    daemon holds it) and removes leftovers, after `stop_leftovers(sandboxes directory)` ended
    what still runs there; `owner=False` is a read-only view for `bgrid cache`.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int | None = None,
        *,
        owner: bool = True,
        clock: Callable[[], int] = time.time_ns,
        stop_leftovers: Callable[[Path], object] | None = None,
    ) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be 0 or more")
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.owner = owner
        self._clock = clock
        self._lock = threading.RLock()  # task outputs are adopted from worker threads
        self._lockfile: IO[bytes] | None = None
        self._index: OrderedDict[str, _Slot] = OrderedDict()  # oldest use first
        self._pins: dict[str, int] = {}
        self._used = 0
        self._last_stamp = 0
        if owner:
            self._lockfile = _take_lock(root)
            if stop_leftovers is not None:
                stop_leftovers(root / SANDBOXES)
            _remove_leftovers(root)
        super().__init__(root)
        if owner:
            (root / SANDBOXES).mkdir(mode=DIR_MODE, exist_ok=True)
            with contextlib.suppress(PermissionError):
                (root / SANDBOXES).chmod(DIR_MODE)
        self._scan()

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the directory's lock (the entries stay)."""
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def _scan(self) -> None:
        found: list[tuple[int, str, int, int]] = []
        for bucket in sorted(self._objects.iterdir()):
            if not bucket.is_dir():
                continue
            for path in bucket.iterdir():
                name = path.name
                if not is_digest(name) or name[:2] != bucket.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    found.append((st.st_atime_ns, name, st.st_size, st.st_mtime_ns))
                    if self.owner and st.st_mode & 0o777 != ENTRY_MODE:
                        path.chmod(ENTRY_MODE)  # from an older, world-readable cache
            if self.owner and bucket.stat().st_mode & 0o077:
                bucket.chmod(DIR_MODE)
        for atime, digest, size, mtime in sorted(found):
            self._index[digest] = _Slot(size, mtime, atime)
            self._used += size
            self._last_stamp = max(self._last_stamp, atime)

    # -- figures ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        """Room for more bytes: what the bound leaves, and no more than the disk has."""
        disk = shutil.disk_usage(self.root).free
        if self.max_bytes is None:
            return disk
        return max(0, min(self.max_bytes - self._used, disk))

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        with self._lock:
            return [CacheEntry(d, s.size, s.last_used_ns) for d, s in self._index.items()]

    def pinned(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pins)

    def holds(self, digest: str) -> bool:
        """Whether the index lists `digest` (no stat, no hashing: `has` checks the bytes)."""
        with self._lock:
            return digest in self._index

    def holding(self, digests: Iterable[str]) -> list[str]:
        """The digests the index lists, in the order given, once each (answers `probe`)."""
        with self._lock:
            return [d for d in dict.fromkeys(digests) if d in self._index]

    # -- pins and use -------------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        """Keep `digest` from eviction (counted pins; it may not be cached yet)."""
        with self._lock:
            self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            left = self._pins.get(digest, 0) - 1
            if left > 0:
                self._pins[digest] = left
            else:
                self._pins.pop(digest, None)

    def touch(self, digest: str) -> None:
        """Mark an entry used now: most recently used, and so on disk (its atime)."""
        with self._lock:
            slot = self._index.get(digest)
            if slot is None:
                return
            self._last_stamp = stamp = max(self._clock(), self._last_stamp + 1)
            slot.last_used_ns = stamp
            self._index.move_to_end(digest)
            # utime changes ctime, never mtime: the corruption check below keys on mtime.
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path_of(digest), ns=(stamp, slot.mtime_ns))

    def admit(self, size: int, what: str = "a file") -> None:
        """Make room for `size` more bytes by evicting unpinned entries, oldest use first.

        Raises CacheFullError when `size` exceeds the bound or the pinned entries leave no room.
        """
        if self.max_bytes is None:
            return
        with self._lock:
            if size > self.max_bytes:
                raise CacheFullError(
                    f"{what} of {format_size(size)} is larger than this peer's whole cache "
                    f"({format_size(self.max_bytes)}, --cache-size)"
                )
            self._shrink(self.max_bytes - size)
            if self._used + size > self.max_bytes:
                held = sum(s.size for d, s in self._index.items() if d in self._pins)
                raise CacheFullError(
                    f"this peer's cache is full: {format_size(held)} of its "
                    f"{format_size(self.max_bytes)} (--cache-size) is held by files that "
                    f"running tasks use or that its job keeps, no room for {what} of "
                    f"{format_size(size)}"
                )

    def _shrink(self, target: int, keep: str | None = None) -> None:
        for digest in list(self._index):
            if self._used <= target:
                return
            if digest in self._pins or digest == keep:
                continue
            self._drop(digest)

    def _drop(self, digest: str) -> None:
        slot = self._index.pop(digest, None)
        if slot is not None:
            self._used -= slot.size
        super().evict(digest)

    # -- the ContentStore operations, with the index kept ----------------------------------

    def has(self, ref: FileRef) -> bool:
        """Whether a sound entry holds `ref`; one whose bytes changed is found out and dropped."""
        with self._lock:
            slot = self._index.get(ref.digest)
            if slot is None:
                return super().has(ref)  # e.g. put there by another view of the directory
            try:
                st = self.path_of(ref.digest).stat()
            except FileNotFoundError:
                self._drop(ref.digest)
                return False
            if (st.st_size, st.st_mtime_ns) == (slot.size, slot.mtime_ns):
                return slot.size == ref.size
        # Changed since it was verified: hash it again (outside the lock, it takes a while).
        try:
            sound = hash_file(self.path_of(ref.digest)) == ref
        except FileNotFoundError:
            sound = False
        with self._lock:
            if sound:
                slot.mtime_ns = st.st_mtime_ns
                return True
            self._drop(ref.digest)
            return False

    def commit(self, partial: Path, digest: str) -> Path:
        size = partial.stat().st_size
        with self._lock:
            final = super().commit(partial, digest)
            self._record(digest, final, size)
            return final

    def adopt(self, path: Path, *, pin: bool = False) -> FileRef:
        """ContentStore.adopt; with `pin`, pinned as it comes in (never evictable meanwhile)."""
        with self._lock:
            ref = super().adopt(path)
            if pin:
                self.pin(ref.digest)
            self._record(ref.digest, self.path_of(ref.digest), ref.size)
            return ref

    def evict(self, digest: str) -> None:
        with self._lock:
            self._drop(digest)

    def _record(self, digest: str, final: Path, size: int) -> None:
        old = self._index.pop(digest, None)
        if old is not None:
            self._used -= old.size
        self._index[digest] = _Slot(size, final.stat().st_mtime_ns, 0)
        self._used += size
        self.touch(digest)
        if self.max_bytes is not None:
            # Concurrent fetches may each have been admitted against the same room.
            self._shrink(self.max_bytes, keep=digest)

    # -- maintenance --------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Re-hash every entry; drop and return the digests whose bytes no longer match."""
        bad = []
        for entry in self.entries():
            path = self.path_of(entry.digest)
            try:
                sound = hash_file(path) == FileRef(entry.digest, entry.size)
            except FileNotFoundError:
                sound = False
            if not sound:
                bad.append(entry.digest)
                self.evict(entry.digest)
        return bad

    def clear(self) -> int:
        """Drop every unpinned entry; the number of bytes freed."""
        with self._lock:
            before = self._used
            self._shrink(-1)
            return before - self._used


def cache_in_use(root: Path) -> bool:
    """Whether a process (a worker daemon) holds this cache directory's lock."""
    try:
        with open(root / LOCK_NAME, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def _take_lock(root: Path) -> IO[bytes]:
    # Held for the daemon's life, so no `with`; close-on-exec: tasks never inherit it.
    f = open(root / LOCK_NAME, "a+b")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CacheBusyError(
            f"the cache {root} is in use by a running worker daemon; stop it first, "
            "or give this one another --cache-dir"
        ) from None
    return f


def _remove_leftovers(root: Path) -> None:
    # Partial fetches and task directories of a daemon that died: nobody will finish them.
    for leftover in (root / "incoming").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    sandboxes = root / SANDBOXES
    if sandboxes.is_dir():
        for leftover in sandboxes.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


# -- `bgrid cache` ----------------------------------------------------------------------------


def cache_report(root: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """What the cache at `root` holds (read-only: a running daemon is not disturbed)."""
    entries = LocalCache(root, max_bytes, owner=False).entries() if root.is_dir() else []
    used = sum(e.size for e in entries)
    return {
        "cache_dir": str(root),
        "in_use": cache_in_use(root),
        "max_bytes": max_bytes,
        "files": len(entries),
        "bytes": used,
        "entries": [
            {"digest": e.digest, "size": e.size, "last_used": e.last_used_ns / 1e9}
            for e in reversed(entries)  # most recently used first
        ],
    }


def format_cache_report(report: dict[str, Any]) -> str:
    """`bgrid cache` as a table: one line per file, most recently used first, then totals."""
    lines = [f"cache {report['cache_dir']}" + (" (a worker daemon is using it)" * report["in_use"])]
    if report["entries"]:
        lines.append(f"{'DIGEST':<14}{'SIZE':>12}  LAST USED")
        for e in report["entries"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_used"]))
            lines.append(f"{e['digest'][:12]:<14}{format_size(e['size']):>12}  {when}")
    bound = report["max_bytes"]
    limit = f" of {format_size(bound)}" if bound is not None else ""
    lines.append(f"{report['files']} files, {format_size(report['bytes'])}{limit}")
    return "\n".join(lines)


def clear_cache(root: Path) -> int:
    """Empty the cache at `root`; the bytes freed. CacheBusyError while a daemon uses it."""
    if not root.is_dir():
        return 0
    cache = LocalCache(root)
    try:
        return cache.clear()
    finally:
        cache.close()


def verify_cache(root: Path) -> list[str]:
    """Re-hash every entry at `root`, dropping corrupt ones; their digests."""
    if not root.is_dir():
        return []
    cache = LocalCache(root)
    try:
        return cache.verify()
    finally:
        cache.close()
