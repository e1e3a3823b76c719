"""Taking a file from a holder on the same host: a kernel copy from its path, not the wire.

On `--local`, or when a worker runs where the coordinator (or the peer that made the file)
runs, every byte would otherwise be encrypted, sent over loopback and decrypted. Instead the
fetcher asks the data server where the file is (`locate`, on the same CURVE connection,
admitted by the same key policy as a `get`), copies it with copy_file_range (a reflink on
btrfs/XFS, an in-kernel copy elsewhere) and hashes the copy it made. Any doubt falls back to
the wire from the same source.

Same host and file system: both ends compute `host_identity()`, from /etc/machine-id, the
boot id and the mount namespace. The server gives a path only to an asker with its own
identity; network namespaces on one machine (the test LAN) share all three, and that is
right: they share the files too.

A path from the wire is a claim, and the fetcher reads it as itself, so three checks keep it
from being a way to read the worker's own files:
- the file must be one the *holder* may read: the listening socket of the source endpoint
  is looked up in /proc/net/tcp{,6} (the kernel's word, in the fetcher's own network
  namespace), which gives the uid that runs the holder; the file must be readable by that
  uid by its mode (owner with u+r, or o+r; uid 0 reads everything). A holder found in no
  table (another network namespace, another host) is not even asked for a path;
- it must be a regular file of the expected size, opened without blocking (not a FIFO);
- the copy, not the original, is hashed, and must have the expected SHA-256; the bytes the
  worker keeps are the bytes it verified, whatever happens to the original meanwhile.
The mode check is on the file alone, not its directories: a file whose directory hides it
from the holder still passes it, but only if its digest is what the holder asked for.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import stat
from pathlib import Path

__all__ = ["holder_may_read", "host_identity", "listener_uid", "open_for_copy"]

_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


@functools.cache
def host_identity() -> str:
    """This host, boot and mount namespace: equal on both ends means the same files."""
    parts = []
    for source in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            parts.append(Path(source).read_text(encoding="ascii").strip())
        except (OSError, UnicodeDecodeError):
            return ""  # cannot tell: never claim to share a host
    try:
        parts.append(str(os.stat("/proc/self/ns/mnt").st_ino))
    except OSError:
        return ""
    if not all(parts):
        return ""
    return "/".join(parts)


def listener_uid(endpoint: str) -> int | None:
    """The uid of the process listening at a `tcp://ip:port` endpoint, if it listens in
    this network namespace (None otherwise)."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port_text = endpoint[len("tcp://") :].rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        port = int(port_text)
    except ValueError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
                uid = _listening_uid(line, address, port)
                if uid is not None:
                    return uid
    return None


def _listening_uid(
    line: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> int | None:
    fields = line.split()
    if len(fields) < 8 or fields[3] != _LISTEN:
        return None
    local_hex, _, port_hex = fields[1].partition(":")
    if int(port_hex, 16) != port:
        return None
    bound = _proc_address(local_hex)
    if bound is None or not (bound.is_unspecified or bound == address):
        return None
    return int(fields[7])


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as /proc/net/tcp writes it: 32-bit words in host (little-endian) order."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    if len(raw) not in (4, 16):
        return None
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(swapped)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def holder_may_read(st: os.stat_result, holder_uid: int) -> bool:
    """Whether a process of `holder_uid` may read the file by its mode (see the docstring)."""
    if holder_uid == 0:
        return True
    if st.st_uid == holder_uid:
        return bool(st.st_mode & stat.S_IRUSR)
    return bool(st.st_mode & stat.S_IROTH)


def open_for_copy(path: str, size: int, holder_uid: int) -> int | None:
    """An fd of the file at `path` if it passes the checks above (None otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == size and holder_may_read(st, holder_uid):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None
