"""Content addressing: files known by SHA-256 + size, kept once whatever their names.

`ContentStore` is a directory of files named by digest; `cache/local.py` adds the worker's
size bound, LRU eviction, pins and accounting on top of it.
`FileIndex` maps digests to files that stay where they are (the coordinator's view of the
submit directory), so nothing is copied just to be served.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class FileRef:
    """A file's identity: its SHA-256 (hex) and size in bytes."""

    digest: str
    size: int


def hash_file(path: Path, stop: threading.Event | None = None) -> FileRef:
    """The FileRef of the file at `path` (reads it once); InterruptedError once `stop` is set
    (hashing runs in a thread, which a Ctrl-C cannot cancel)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"stopped while hashing {path}")
            sha.update(block)
            size += len(block)
    return FileRef(sha.hexdigest(), size)


def is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ContentStore:
    """Files named by digest under `root`; every entry was verified when it came in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects = root / "objects"
        self._incoming = root / "incoming"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._incoming.mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: str) -> Path:
        return self._objects / digest[:2] / digest

    def locate(self, digest: str) -> Path | None:
        """The stored file with this digest, if any (what the data server serves)."""
        if not is_digest(digest):
            return None
        path = self.path_of(digest)
        return path if path.is_file() else None

    def has(self, ref: FileRef) -> bool:
        path = self.locate(ref.digest)
        return path is not None and path.stat().st_size == ref.size

    def incoming_path(self, digest: str) -> Path:
        """A fresh place for a fetch to write bytes before they are verified and committed."""
        return self._incoming / f"{digest}.{secrets.token_hex(6)}.part"

    def commit(self, partial: Path, digest: str) -> Path:
        """Move a verified file into the store (atomic rename: the newest copy wins)."""
        final = self.path_of(digest)
        final.parent.mkdir(exist_ok=True)
        os.replace(partial, final)
        final.chmod(0o444)  # entries are shared by hard links: no sandbox may edit them
        return final

    def adopt(self, path: Path) -> FileRef:
        """Move a task's output file into the store and leave a hard link in its place."""
        ref = hash_file(path)
        final = self.path_of(ref.digest)
        if final.exists():
            path.unlink()
        else:
            final.parent.mkdir(exist_ok=True)
            os.replace(path, final)
            final.chmod(0o444)
        link_or_copy(final, path)
        return ref

    def link_into(self, digest: str, dest: Path) -> None:
        """Put the stored file at `dest` (hard link: no bytes copied)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(self.path_of(digest), dest)

    def evict(self, digest: str) -> None:
        """Drop an entry (found changed or corrupt); it is fetched again when needed."""
        with contextlib.suppress(FileNotFoundError):
            self.path_of(digest).unlink()

    def fingerprint(self, digest: str) -> tuple[int, int]:
        """Size and mtime of an entry: any write through one of its links changes them."""
        # Not ctime: the local cache records last use in the atime, which moves ctime.
        st = self.path_of(digest).stat()
        return (st.st_size, st.st_mtime_ns)


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link `src` at `dest`, copying only across file systems; never writes through."""
    try:
        os.link(src, dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        scratch = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
        shutil.copyfile(src, scratch)
        os.replace(scratch, dest)


class FileIndex:
    """Digest -> a file that stays in place (the coordinator's submit directory)."""

    def __init__(self) -> None:
        self._paths: dict[str, Path] = {}

    def add(self, path: Path, ref: FileRef | None = None) -> FileRef:
        ref = ref or hash_file(path)
        self._paths[ref.digest] = path
        return ref

    def locate(self, digest: str) -> Path | None:
        return self._paths.get(digest)
