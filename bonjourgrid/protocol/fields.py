"""The fields of the wire's messages: their limits, and one check per kind of value.

Each check turns a raw value from msgpack into the value its message field declares (a
digest, a relative path, a bounded name, a finite number...) or raises `ProtocolError`
naming the field. `messages.py` attaches them to the fields of its dataclasses.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from bonjourgrid.cache.store import FileRef
from bonjourgrid.discovery.txt import JOB_NAME
from bonjourgrid.errors import ProtocolError
from bonjourgrid.keys import is_curve_key

PROTOCOL_VERSION = 1
CHUNK_SIZE = 1024 * 1024  # bytes of file data per `chunk` message
MAX_CONTROL_FRAME = 4 * 1024 * 1024  # a `run` (part) carries a command and input lists, no data
MAX_DATA_FRAME = CHUNK_SIZE + 4096  # one chunk plus its envelope
MAX_STRING = 64 * 1024
MAX_LIST = 100_000
MAX_NAME = 1024  # characters of a task name, a peer label, a hostname
MAX_PATH = 4096  # characters of a file path in a task directory
MAX_SIZE = 2**53  # bytes of one file, an offset, a byte count
MAX_ATTEMPT = 2**31
MAX_SOURCES = 64  # data servers named for one file
MAX_ENV = 4096  # variables in a task's environment
MAX_RUN_PARTS = 1024  # `run_part` messages after one `run`
MAX_RUN_FILES = 1_000_000  # inputs plus outputs of one run, over all its parts
MAX_LEASE_S = 3600.0
MAX_SECONDS = 10.0 * 365 * 24 * 3600  # a duration in a report
# Bytes of a task's stdout, and as many of its stderr, that a `task_done` carries: the last
# ones. Both together stay well under MAX_CONTROL_FRAME, beside the rest of the report.
MAX_LOG = 1024 * 1024
# Service runs (a middleware daemon on a peer, `service_start`): how much one may carry.
MAX_ARGV = 1024  # words of its command line
MAX_SERVICE_FILES = 64  # config files, and as many secret files
MAX_SECRET = 64 * 1024  # bytes of one secret file (a munge key is 1 KiB)
MAX_PORTS = 32  # ports one service asks the worker to pick
SERVICE_READY_S = 60.0  # a worker waits this long for a service's ready file, then fails it
# The placeholders a service's argv, files and env may hold, substituted on the worker:
# `{dir}` (its private directory), `{host}` (the peer's address), `{port:NAME}` (a port the
# worker picked). Other braces are left alone (config files hold JSON, shell, ClassAds).
SERVICE_PLACEHOLDER = re.compile(r"\{(dir|host|port:([A-Za-z0-9_-]+))\}")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PORT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")

_CHECK = "check"
_PACK = "pack"
_OMIT_DEFAULT = "omit_default"  # a field left off the wire at its default (added later)


# -- checks: each turns a raw wire value into its field's value, or raises ProtocolError ----


def _int(value: Any, what: str, low: int, high: int) -> int:
    # bool is an int in Python; a flag is never a valid count here
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be a whole number, not {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"{what} {value} is out of range {low}..{high}")
    return value


def _float(value: Any, what: str, low: float, high: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high or (open_low and number == low):
        raise ProtocolError(f"{what} {number!r} is out of range {low:g}..{high:g}")
    return number


def _str(value: Any, what: str, limit: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is over {limit} characters")
    return value


def _list(value: Any, what: str, limit: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{what} must be a list, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} has more than {limit} items")
    return list(value)


def _record(value: Any, what: str, size: int) -> list[Any]:
    items = _list(value, what, size)
    if len(items) != size:
        raise ProtocolError(f"{what} must be a list of {size} values")
    return items


def is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def check_digest(value: Any, what: str = "digest") -> str:
    text = _str(value, what, 64)
    if not is_digest(text):
        raise ProtocolError(f"{what} {text[:80]!r} is not a SHA-256 digest (64 lowercase hex)")
    return text


def check_job(value: Any, what: str = "job") -> str:
    text = _str(value, what, 255)
    if not JOB_NAME.fullmatch(text):
        raise ProtocolError(f"{what} {text[:80]!r} is not a valid job name")
    return text


def check_name(value: Any, what: str = "task") -> str:
    """A task name or a peer label: printable (so no NUL, no newline), bounded."""
    text = _str(value, what, MAX_NAME)
    if not text or not text.isprintable():
        raise ProtocolError(f"{what} {text[:80]!r} must be non-empty printable text")
    return text


def _label(value: Any, what: str) -> str:
    """A source label in a report: a peer name, "coordinator", or "" for none."""
    return "" if value == "" else check_name(value, what)


def check_path(value: Any, what: str = "path") -> str:
    """A file path in a task directory: relative, normalized, inside it."""
    text = _str(value, what, MAX_PATH)
    pure = PurePosixPath(text)
    if (
        not text
        or "\x00" in text
        or pure.is_absolute()
        or ".." in pure.parts
        or text.startswith("~")
        or str(pure) != text
        or text == "."
    ):
        raise ProtocolError(
            f"{what} {text[:200]!r} would escape the task directory or is not normalized "
            "(give a relative path without '..', '.' or '//')"
        )
    return text


_ENDPOINT = re.compile(r"tcp://([0-9.]{7,15}):([0-9]{1,5})")


def check_key(value: Any, what: str = "key") -> str:
    """A CURVE public or secret key in Z85 (40 characters), or "" (--insecure)."""
    text = _str(value, what, 40)
    if text and not is_curve_key(text):
        raise ProtocolError(f"{what} must be a CURVE key (40 Z85 characters) or empty")
    return text


def check_endpoint(value: Any, what: str = "endpoint") -> str:
    text = _str(value, what, 64)
    match = _ENDPOINT.fullmatch(text)
    try:
        ok = match is not None and 0 < int(match[2]) < 65536
        ok = ok and match is not None and bool(ipaddress.IPv4Address(match[1]))
    except ValueError:
        ok = False
    if not ok:
        raise ProtocolError(f"{what} {text[:80]!r} is not tcp://<IPv4 address>:<port>")
    return text


def _text(value: Any, what: str) -> str:
    return _str(value, what)


def _size(value: Any, what: str) -> int:
    return _int(value, what, 0, MAX_SIZE)


def _attempt(value: Any, what: str) -> int:
    return _int(value, what, 1, MAX_ATTEMPT)


def _seconds(value: Any, what: str) -> float:
    return _float(value, what, 0.0, MAX_SECONDS)


def _lease(value: Any, what: str) -> float:
    return _float(value, what, 0.0, MAX_LEASE_S, open_low=True)


def _command(value: Any, what: str) -> str:
    text = _str(value, what)
    if "\x00" in text:
        raise ProtocolError("the command contains a NUL byte")
    return text


def _env(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a map of strings to strings")
    if len(value) > MAX_ENV:
        raise ProtocolError(f"{what} has more than {MAX_ENV} variables")
    env: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise ProtocolError(f"{what} must map strings to strings")
        if not name or "=" in name or "\x00" in name or len(name) > MAX_NAME or "\x00" in text:
            raise ProtocolError(
                f"{what}: names must be non-empty without '=' or NUL; values without NUL"
            )
        env[name] = text
    return env


def _limits(value: Any, what: str) -> dict[str, int]:
    # What each limit means, and its range, is worker/limits.py's to say (limits_from_wire).
    if not isinstance(value, Mapping) or len(value) > 16:
        raise ProtocolError(f"{what} must be a small map of names to whole numbers")
    return {
        _str(k, f"{what} name", 64): _int(v, f"{what} {str(k)[:40]}", 0, 2**63)
        for k, v in value.items()
    }


def _digests(value: Any, what: str) -> tuple[str, ...]:
    return tuple(check_digest(d, f"{what} item") for d in _list(value, what))


def _outputs(value: Any, what: str) -> tuple[str, ...]:
    return tuple(check_path(p, f"{what} path") for p in _list(value, what))


@dataclass(frozen=True)
class Source:
    """A data server that may hold a file: its endpoint and CURVE public key (Z85)."""

    endpoint: str
    server_key: str
    label: str  # who it is, for accounting: "coordinator" or a peer name


def _sources(value: Any, what: str) -> tuple[Source, ...]:
    out = []
    for item in _list(value, what, MAX_SOURCES):
        endpoint, key, label = _record(item, f"{what} entry", 3)
        out.append(
            Source(
                check_endpoint(endpoint, f"{what} endpoint"),
                check_key(key, f"{what} key"),
                check_name(label, f"{what} label"),
            )
        )
    return tuple(out)


def _pack_sources(sources: tuple[Source, ...]) -> list[list[str]]:
    return [[s.endpoint, s.server_key, s.label] for s in sources]


@dataclass(frozen=True)
class TaskInput:
    """An input of a `run`: where it goes in the task directory, what it is, where it is."""

    path: str
    ref: FileRef
    sources: tuple[Source, ...]


def _inputs(value: Any, what: str) -> tuple[TaskInput, ...]:
    out = []
    for item in _list(value, what):
        path, digest, size, sources = _record(item, f"{what} entry", 4)
        where = f"{what} {check_path(path, f'{what} path')!r}"
        ref = FileRef(check_digest(digest, f"{where} digest"), _size(size, f"{where} size"))
        out.append(TaskInput(path, ref, _sources(sources, f"{where} sources")))
    return tuple(out)


def _pack_input(item: TaskInput) -> list[Any]:
    return [item.path, item.ref.digest, item.ref.size, _pack_sources(item.sources)]


def _pack_inputs(items: tuple[TaskInput, ...]) -> list[list[Any]]:
    return [_pack_input(i) for i in items]


@dataclass(frozen=True)
class PrefetchFile:
    ref: FileRef
    sources: tuple[Source, ...]


def _files(value: Any, what: str) -> tuple[PrefetchFile, ...]:
    out = []
    for item in _list(value, what):
        digest, size, sources = _record(item, f"{what} entry", 3)
        ref = FileRef(check_digest(digest, f"{what} digest"), _size(size, f"{what} size"))
        out.append(PrefetchFile(ref, _sources(sources, f"{what} sources")))
    return tuple(out)


def _pack_files(files: tuple[PrefetchFile, ...]) -> list[list[Any]]:
    return [[f.ref.digest, f.ref.size, _pack_sources(f.sources)] for f in files]


def _made(value: Any, what: str) -> tuple[tuple[str, FileRef], ...]:
    out = []
    for item in _list(value, what):
        path, digest, size = _record(item, f"{what} entry", 3)
        where = f"{what} {check_path(path, f'{what} path')!r}"
        out.append((path, FileRef(check_digest(digest, f"{where} digest"), _size(size, where))))
    return tuple(out)


def _pack_made(outputs: tuple[tuple[str, FileRef], ...]) -> list[list[Any]]:
    return [[path, ref.digest, ref.size] for path, ref in outputs]


def _fetched(value: Any, what: str) -> tuple[tuple[str, str, int], ...]:
    out = []
    for item in _list(value, what):
        digest, label, size = _record(item, f"{what} entry", 3)
        out.append((check_digest(digest, f"{what} digest"), _label(label, what), _size(size, what)))
    return tuple(out)


def _running(value: Any, what: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in _list(value, what):
        task, attempt = _record(item, f"{what} entry", 2)
        out.append((check_name(task, f"{what} task"), _attempt(attempt, f"{what} attempt")))
    return tuple(out)


def _listed(items: tuple[Any, ...]) -> list[Any]:
    return [list(i) if isinstance(i, tuple) else i for i in items]


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    return value


def _log(value: Any, what: str) -> bytes:
    """The tail of a task's stdout or stderr: bytes, at most MAX_LOG of them."""
    data = _bytes(value, what)
    if len(data) > MAX_LOG:
        raise ProtocolError(f"{what} holds {len(data)} bytes, more than {MAX_LOG}")
    return data


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false, not {type(value).__name__}")
    return value


def check_service_name(value: Any, what: str = "service") -> str:
    """A service's name: a word of letters, digits, `_ . -` (it names a daemon in logs)."""
    text = _str(value, what, 64)
    if not _SERVICE_NAME.fullmatch(text):
        raise ProtocolError(
            f"{what} {text[:80]!r} is not a service name (1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit)"
        )
    return text


def _argv(value: Any, what: str) -> tuple[str, ...]:
    words = _list(value, what, MAX_ARGV)
    if not words:
        raise ProtocolError(f"{what} is empty: give the daemon's command line")
    out = []
    for word in words:
        text = _str(word, f"{what} word")
        if "\x00" in text:
            raise ProtocolError(f"{what} holds a NUL byte")
        out.append(text)
    if not out[0]:
        raise ProtocolError(f"{what} starts with an empty word: give the program to run")
    return tuple(out)


def _mapping(value: Any, what: str, limit: int) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a map of relative paths to contents")
    if len(value) > limit:
        raise ProtocolError(f"{what} has more than {limit} files")
    return value


def _service_files(value: Any, what: str) -> dict[str, str]:
    """Config files of a service: relative path -> text (placeholders substituted)."""
    return {
        check_path(path, f"{what} path"): _str(text, f"{what} {str(path)[:80]!r}")
        for path, text in _mapping(value, what, MAX_SERVICE_FILES).items()
    }


def _secrets(value: Any, what: str) -> dict[str, bytes]:
    """Secret files of a service: relative path -> bytes, written 0600 and as they are."""
    out = {}
    for path, data in _mapping(value, what, MAX_SERVICE_FILES).items():
        where = f"{what} {check_path(path, f'{what} path')!r}"
        out[path] = _bytes(data, where)
        if len(data) > MAX_SECRET:
            raise ProtocolError(f"{where} holds {len(data)} bytes, more than {MAX_SECRET}")
    return out


def _port_name(value: Any, what: str) -> str:
    text = _str(value, what, 32)
    if not _PORT_NAME.fullmatch(text):
        raise ProtocolError(
            f"{what} {text[:40]!r} is not a port name (a letter, then letters, digits, _ or -)"
        )
    return text


def _port_names(value: Any, what: str) -> tuple[str, ...]:
    names = tuple(_port_name(n, f"{what} name") for n in _list(value, what, MAX_PORTS))
    if len(set(names)) != len(names):
        raise ProtocolError(f"{what} names a port twice")
    return names


def _ports(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or len(value) > MAX_PORTS:
        raise ProtocolError(f"{what} must be a map of at most {MAX_PORTS} port names to ports")
    return {
        _port_name(name, f"{what} name"): _int(port, f"{what} {str(name)[:40]}", 1, 65535)
        for name, port in value.items()
    }


def _optional_path(value: Any, what: str) -> str:
    return "" if value == "" else check_path(value, what)


def _local_path(value: Any, what: str) -> str:
    """An absolute path on the sender's host, or "" (none): checked, never trusted (see
    `cache/same_host.py` for what a fetcher does with it)."""
    text = _str(value, what, MAX_PATH)
    if "\x00" in text or (text and not text.startswith("/")):
        raise ProtocolError(f"{what} must be an absolute path without NUL bytes, or empty")
    return text


def _directory(value: Any, what: str) -> str:
    text = _str(value, what, MAX_PATH)
    if "\x00" in text:
        raise ProtocolError(f"{what} holds a NUL byte")
    return text


def _f(
    check: Callable[[Any, str], Any],
    pack: Callable[[Any], Any] | None = None,
    omit_default: bool = False,
) -> dict[str, Any]:
    """A field's metadata. `omit_default`: the field is not sent while it holds its default,
    so a peer of an earlier release, which does not know it, gets the frame it always got."""
    return {_CHECK: check, _PACK: pack, _OMIT_DEFAULT: omit_default}


def _one_of(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, what: str) -> str:
        text = _str(value, what, 64)
        if text not in choices:
            raise ProtocolError(f"{what} {text[:40]!r} is not one of {', '.join(choices)}")
        return text

    return check


JOB = _f(check_job)
TASK = _f(check_name)
ATTEMPT = _f(_attempt)
TEXT = _f(_text)
DIGEST = _f(check_digest)
SIZE = _f(_size)
SECONDS = _f(_seconds)
LOG = _f(_log)
