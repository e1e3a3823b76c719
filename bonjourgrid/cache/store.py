"""Content addressing: files known by SHA-256 + size, kept once whatever their names.

`ContentStore` is a directory of files named by digest; `cache/local.py` adds the worker's
size bound, LRU eviction, pins and accounting on top of it.
`FileIndex` maps digests to files that stay where they are (the coordinator's view of the
submit directory), so nothing is copied just to be served.

A store holds the data of everyone's jobs on a shared desktop: its directories are 0700 and
its entries 0400, so only the user it runs as reads them (`tighten` fixes an older tree).
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
ENTRY_MODE = 0o400  # an entry: read by this user only, and written by nobody
DIR_MODE = 0o700
_COPY_CHUNK = 1 << 30  # bytes per copy_file_range call


@dataclass(frozen=True, slots=True)  # one per file of a job: 100,000s in a coordinator
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
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._objects.mkdir(mode=DIR_MODE, exist_ok=True)
        self._incoming.mkdir(mode=DIR_MODE, exist_ok=True)
        tighten(root)

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
        final.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        os.replace(partial, final)
        final.chmod(ENTRY_MODE)
        return final

    def adopt(self, path: Path) -> FileRef:
        """Move a task's output file into the store and leave a hard link in its place.

        An output with other links (`ln ~/private out.txt`) shares its inode with a file
        outside the sandbox: that inode is neither moved nor made read-only, it is copied.
        """
        source = path
        try:
            if path.lstat().st_nlink > 1:
                source = self._incoming / f"adopt.{secrets.token_hex(6)}.part"
                private_copy(path, source)
                path.unlink()  # the sandbox's name only: the other links keep their file
            ref = hash_file(source)
            final = self.path_of(ref.digest)
            if final.exists():
                source.unlink()
            else:
                final.parent.mkdir(mode=DIR_MODE, exist_ok=True)
                os.replace(source, final)
                final.chmod(ENTRY_MODE)
        finally:
            if source != path:
                with contextlib.suppress(FileNotFoundError):
                    source.unlink()
        link_or_copy(final, path)
        return ref

    def link_into(self, digest: str, dest: Path) -> None:
        """Put the stored file at `dest` (hard link: no bytes copied)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(self.path_of(digest), dest)

    def copy_into(self, digest: str, dest: Path) -> None:
        """Put a private, read-only copy of the stored file at `dest` (see `private_copy`)."""
        dest.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        private_copy(self.path_of(digest), dest, ENTRY_MODE)

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


def private_copy(src: Path, dest: Path, mode: int = 0o600) -> None:
    """Copy `src` to `dest`, a new file, in the kernel; no write to one ever reaches the other.

    copy_file_range moves the bytes inside the kernel (no trip through this process), and on
    file systems that share extents (btrfs, XFS) it makes a reflink: no bytes copied at all
    until one side is written. Where it is missing, an ordinary copy.
    """
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as fout:
            try:
                while os.copy_file_range(fin.fileno(), fout.fileno(), _COPY_CHUNK) > 0:
                    pass
            except (AttributeError, OSError) as err:
                if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                shutil.copyfileobj(fin, fout)  # goes on from where the kernel copy stopped
            os.fchmod(fout.fileno(), mode)


def tighten(root: Path) -> None:
    """Make a store made by an older version private: its directories 0700 (not its files)."""
    for directory in (root, root / "objects", root / "incoming"):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if directory.stat().st_mode & 0o077:
                directory.chmod(DIR_MODE)


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
