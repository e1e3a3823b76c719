"""Digests remembered between submits, so an unchanged submit directory is not read again.

Hashing a source input reads all of it (about 1 s per GiB here). A `DigestCache` keeps, per
absolute path, the file's digest with the identity its `stat` had when it was hashed:
(device, inode, size, mtime_ns, ctime_ns). The next submit stats the file; the same
identity gives the remembered digest without a read, any difference hashes it again.

What it can miss, and why that is safe:
- mtime can be set back (`touch -d`, `cp -p`, `rsync -t`), so the key also holds ctime,
  which no user call can set: writing, renaming, linking or chmod-ing moves it. A chmod
  therefore costs one re-hash, nothing more.
- Timestamps have a coarse clock (a kernel tick): a file written twice within one tick
  with the same size keeps its stamps. A file whose mtime or ctime is that recent when it
  is hashed (within `RACY_S`, as git's "racily clean" entries) is not remembered, and
  neither is one whose stat changed while it was being read.
- A digest that is wrong anyway (a file system that lies about its stamps) lets no wrong
  byte into any cache: every fetch checks SHA-256, so the worker refuses the bytes and the
  task fails with "content does not match its digest".

The cache is a hint. It lives in `<submit dir>/.bgrid/digests.json`; one that is missing,
damaged, or of another version is ignored (everything is hashed), and one that cannot be
written only costs a hash next time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from bonjourgrid.cache.store import FileRef, hash_file, is_digest

__all__ = ["DIGESTS_FILE", "DigestCache"]

log = logging.getLogger(__name__)

DIGESTS_FILE = Path(".bgrid") / "digests.json"  # under the submit directory
RACY_S = 2.0  # a file changed this recently may change again within the same timestamp
MAX_ENTRIES = 100_000  # remembered files; the ones used longest ago are dropped first
_VERSION = 1

# What identifies a file's content without reading it: (dev, ino, size, mtime_ns, ctime_ns).
Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestCache:
    """FileRefs of files by path, trusted only while the file's stat identity is unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[Identity, str]] = _read(path)
        self._changed = False
        self._lock = threading.Lock()  # hashing may run on several threads
        self.hits = 0  # files whose digest came from the cache (for logs and tests)
        self.hashed = 0  # files read and hashed

    def _lookup(self, path: Path) -> tuple[str, Identity, str | None]:
        """The cache key of `path`, its identity now, and its digest if remembered for that
        identity (OSError if it cannot be stat-ed)."""
        key = str(path.absolute())
        now = identity(os.stat(path))
        with self._lock:
            known = self._entries.get(key)
        return key, now, known[1] if known is not None and known[0] == now else None

    def remembers(self, path: Path) -> bool:
        """Whether `hash(path)` would answer from the cache (the file is unchanged)."""
        try:
            return self._lookup(path)[2] is not None
        except OSError:
            return False

    def hash(self, path: Path, stop: threading.Event | None = None) -> FileRef:
        """The FileRef of the file at `path`: remembered if its identity is unchanged, else
        read and hashed (see `hash_file`, which raises as it does)."""
        key, before, digest = self._lookup(path)
        if digest is not None:
            with self._lock:
                self.hits += 1
                self._entries[key] = self._entries.pop(key)  # used now: dropped last
            return FileRef(digest, before[2])
        ref = hash_file(path, stop)
        after = identity(os.stat(path))
        with self._lock:
            self.hashed += 1
            newest_ns = max(after[3], after[4])
            if after == before and ref.size == after[2] and not _racy(newest_ns):
                self._entries.pop(key, None)
                self._entries[key] = (after, ref.digest)
                self._changed = True
            elif self._entries.pop(key, None) is not None:
                self._changed = True
        return ref

    def save(self) -> None:
        """Write the cache if it changed (atomically); a failure is logged, not raised."""
        with self._lock:
            if not self._changed:
                return
            entries = list(self._entries.items())[-MAX_ENTRIES:]
            self._changed = False
        data = {"v": _VERSION, "files": {p: [*ident, d] for p, (ident, d) in entries}}
        scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch.write_text(json.dumps(data) + "\n", encoding="utf-8")
            os.replace(scratch, self.path)
        except OSError as err:
            log.warning("cannot write %s (%s): inputs will be hashed again", self.path, err)
            with contextlib.suppress(OSError):
                scratch.unlink()


def _racy(newest_ns: int) -> bool:
    return time.time_ns() - newest_ns < RACY_S * 1e9


def _read(path: Path) -> dict[str, tuple[Identity, str]]:
    """The entries of an earlier submit; {} if there are none or the file is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("v") != _VERSION:
            return {}
        files = data["files"]
        entries = {name: _entry(fields) for name, fields in files.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring %s (%s): inputs are hashed again", path, err)
        return {}
    return entries


def _entry(fields: Any) -> tuple[Identity, str]:
    """One remembered file, checked field by field (ValueError otherwise)."""
    if not isinstance(fields, list) or len(fields) != 6:
        raise ValueError("an entry is [dev, ino, size, mtime_ns, ctime_ns, digest]")
    *numbers, digest = fields
    if not all(type(n) is int and n >= 0 for n in numbers):
        raise ValueError("dev, ino, size and times are non-negative integers")
    if not isinstance(digest, str) or not is_digest(digest):
        raise ValueError("a digest is 64 lowercase hex digits")
    dev, ino, size, mtime_ns, ctime_ns = numbers
    return (dev, ino, size, mtime_ns, ctime_ns), digest
