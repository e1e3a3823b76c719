"""TXT records of peers and jobs: the schema we advertise, and validation of what the LAN sends.

Everything that arrives over mDNS is untrusted: `decode_peer` / `decode_job` raise
`ProtocolError` naming the problem, `parse_peer` / `parse_job` log it and return None.
Records themselves validate on construction, so a `PeerRecord` in hand is always sane,
whether it came from the wire or from the local daemon.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from bonjourgrid.errors import ProtocolError
from bonjourgrid.keys import is_curve_key

log = logging.getLogger(__name__)

PEER_SERVICE = "_bonjourgrid._tcp.local."
JOB_SERVICE = "_bgrid-job._tcp.local."
PROTOCOL_VERSION = 1
INSECURE_GRID = "insecure"
# Written by the Advertiser, bumped on every TXT change: python-zeroconf keeps a TXT record
# it has already cached in its old place, so a flip back to an earlier TXT within a second
# (idle -> reserved -> idle) would otherwise stay invisible. Not part of any record.
SEQ_KEY = "seq"

PeerState = Literal["idle", "busy", "reserved"]
JobState = Literal["running", "succeeded", "failed", "cancelled"]
PEER_STATES: tuple[PeerState, ...] = get_args(PeerState)
JOB_STATES: tuple[JobState, ...] = get_args(JobState)

# One TXT string is length-prefixed by a single byte (RFC 6763 §6.1), and the whole record
# should fit one Ethernet frame (RFC 6763 §6.2).
_MAX_ENTRY_BYTES = 255
_MAX_TXT_BYTES = 1300
_MAX_LABEL_BYTES = 63  # a DNS label, hence an instance name
_MAX_CPUS = 1 << 16
_MAX_MIB = 1 << 40  # an exbibyte: anything larger is a lie or an overflow
_MAX_COST = 1e9
_MAX_COUNT = 10_000_000  # tasks, peers
_MAX_UNIX_TIME = 1e11  # year 5138
_MAX_MIDDLEWARE = 16

# The schema's keys, which an extra attribute may not reuse.
_PEER_KEYS = {
    *("v", "state", "job", "cpus", "ram", "disk", "cost", "arch", "os", "mw", "key", "grid"),
    "cred",
}
_PEER_KEYS.add(SEQ_KEY)
PEER_KEYS = frozenset(_PEER_KEYS)  # the attributes a requirement may name (requirements.py)

# ASCII-only patterns: `\d` would accept other scripts' digits, which int() then converts.
_UINT = re.compile(r"[0-9]{1,16}")
_UFLOAT = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,3})?")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,62}")  # job, arch, os
JOB_NAME = _TOKEN  # what a job may be called: daemons check it before a job reaches a TXT
_FINGERPRINT = re.compile(r"[!-~]{1,64}")  # printable ASCII, no space
_MIDDLEWARE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_CREDENTIAL = re.compile(r"[A-Za-z0-9_-]{86}")  # a signature, base64url: credentials.py


def _endpoint(addresses: tuple[str, ...], port: int) -> str:
    if not addresses:
        raise ValueError("the record has no address to connect to")
    return f"tcp://{addresses[0]}:{port}"


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ProtocolError(problem)


def _check_text(what: str, text: str, max_chars: int = 64) -> None:
    """Printable, no whitespace: safe to print in a terminal table."""
    _check(
        0 < len(text) <= max_chars and text.isprintable() and not any(c.isspace() for c in text),
        f"{what} {text[:80]!r} is not 1-{max_chars} printable characters without spaces",
    )


def _check_common(name: str, addresses: tuple[str, ...], port: int, v: int) -> None:
    _check(v == PROTOCOL_VERSION, f"protocol version {v} is not {PROTOCOL_VERSION}")
    _check(
        0 < len(name.encode("utf-8", "replace")) <= _MAX_LABEL_BYTES and name.isprintable(),
        f"instance name {name[:80]!r} is not 1-{_MAX_LABEL_BYTES} bytes of printable text",
    )
    _check(0 < port < 65536, f"port {port} is not in 1-65535")
    for address in addresses:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ProtocolError(f"address {address[:80]!r} is not an IPv4 address") from None


def _check_int(what: str, value: int, low: int, high: int) -> None:
    _check(low <= value <= high, f"{what}={value} is not in {low}..{high}")


def _check_txt_size(txt: Mapping[str, str]) -> None:
    total = 0
    for key, value in txt.items():
        size = len(key.encode()) + 1 + len(value.encode())
        _check(size <= _MAX_ENTRY_BYTES, f"TXT entry {key!r} is {size} bytes, over 255")
        total += size + 1
    _check(total <= _MAX_TXT_BYTES, f"TXT record is {total} bytes, over {_MAX_TXT_BYTES}")


@dataclass(frozen=True)
class PeerRecord:
    """One peer as advertised on the LAN; validated on construction (ProtocolError)."""

    name: str
    addresses: tuple[str, ...]
    port: int
    state: PeerState
    job: str | None
    cpus: int
    ram: int
    disk: int
    cost: float
    arch: str
    os: str
    mw: tuple[str, ...]
    key: str
    grid: str
    # The grid's signature over (grid, name, key): only a hint until a coordinator verifies
    # it (credentials.py); "" for --insecure peers and peers not enrolled.
    cred: str = ""
    v: int = PROTOCOL_VERSION
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A private copy: the record is frozen, the caller's dict is not.
        object.__setattr__(self, "extra", dict(self.extra))
        _check_common(self.name, self.addresses, self.port, self.v)
        _check(self.state in PEER_STATES, f"state {self.state!r} is not one of {PEER_STATES}")
        if self.state == "reserved":
            _check(self.job is not None, "state is reserved but no job is named")
        else:
            _check(self.job is None, f"state is {self.state} but job {self.job!r} is set")
        if self.job is not None:
            _check(_TOKEN.fullmatch(self.job) is not None, f"job {self.job[:80]!r} is not a name")
        _check_int("cpus", self.cpus, 1, _MAX_CPUS)
        _check_int("ram", self.ram, 0, _MAX_MIB)
        _check_int("disk", self.disk, 0, _MAX_MIB)
        _check(
            math.isfinite(self.cost) and 0 <= self.cost <= _MAX_COST,
            f"cost={self.cost} is not a price in 0..{_MAX_COST:g}",
        )
        for what, value in (("arch", self.arch), ("os", self.os)):
            _check(_TOKEN.fullmatch(value) is not None, f"{what} {value[:80]!r} is not a name")
        _check(len(self.mw) <= _MAX_MIDDLEWARE, f"more than {_MAX_MIDDLEWARE} middleware")
        for middleware in self.mw:
            _check(
                _MIDDLEWARE.fullmatch(middleware) is not None,
                f"middleware {middleware[:80]!r} is not a name",
            )
        _check(
            self.key == "" or is_curve_key(self.key),
            "key is not a 40-character Z85 CURVE public key",
        )
        _check(
            self.grid == INSECURE_GRID or _FINGERPRINT.fullmatch(self.grid) is not None,
            f"grid {self.grid[:80]!r} is not a key fingerprint",
        )
        _check(self.key != "" or self.grid == INSECURE_GRID, "a secure peer has no CURVE key")
        _check(
            self.cred == "" or _CREDENTIAL.fullmatch(self.cred) is not None,
            "cred is not an 86-character base64url signature",
        )
        for key, value in self.extra.items():
            _check(
                _KEY_NAME.fullmatch(key) is not None and key not in _PEER_KEYS,
                f"extra TXT key {key[:80]!r} is not a lowercase name outside the schema",
            )
            _check(value.isprintable(), f"TXT value of {key!r} is not printable")
        _check_txt_size(peer_txt(self))

    def attrs(self) -> dict[str, str]:
        """Every TXT key as a string, for requirement matching."""
        return peer_txt(self)

    def endpoint(self) -> str:
        """The control socket's zmq address, on the first advertised address."""
        return _endpoint(self.addresses, self.port)


@dataclass(frozen=True)
class JobRecord:
    """One running (or just finished) job as its coordinator advertises it."""

    name: str
    addresses: tuple[str, ...]
    port: int
    job: str
    state: JobState
    tasks: int
    done: int
    failed: int
    running: int
    peers: int
    user: str
    started: float
    key: str = ""  # the coordinator's CURVE public key (Z85) for `bgrid cancel`; "" if insecure
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_common(self.name, self.addresses, self.port, self.v)
        _check(_TOKEN.fullmatch(self.job) is not None, f"job {self.job[:80]!r} is not a name")
        _check(
            self.key == "" or is_curve_key(self.key),
            "key is not a 40-character Z85 CURVE public key",
        )
        _check(self.state in JOB_STATES, f"state {self.state!r} is not one of {JOB_STATES}")
        _check_int("tasks", self.tasks, 0, _MAX_COUNT)
        for what, count in (
            ("done", self.done),
            ("failed", self.failed),
            ("running", self.running),
        ):
            _check_int(what, count, 0, self.tasks)
        _check_int("peers", self.peers, 0, _MAX_COUNT)
        _check_text("user", self.user)
        _check(
            math.isfinite(self.started) and 0 <= self.started <= _MAX_UNIX_TIME,
            f"started={self.started} is not a unix time",
        )
        _check_txt_size(job_txt(self))

    def endpoint(self) -> str:
        """The coordinator's zmq address, on the first advertised address."""
        return _endpoint(self.addresses, self.port)


def peer_txt(record: PeerRecord) -> dict[str, str]:
    """The TXT properties that advertise this peer."""
    txt = {
        "v": str(record.v),
        "state": record.state,
        "cpus": str(record.cpus),
        "ram": str(record.ram),
        "disk": str(record.disk),
        "cost": repr(float(record.cost)),  # repr round-trips a float exactly
        "arch": record.arch,
        "os": record.os,
        "mw": ",".join(record.mw),
        "key": record.key,
        "grid": record.grid,
    }
    if record.cred:
        txt["cred"] = record.cred
    if record.job is not None:
        txt["job"] = record.job
    txt.update(record.extra)
    return txt


def job_txt(record: JobRecord) -> dict[str, str]:
    """The TXT properties that advertise this job."""
    txt = {
        "v": str(record.v),
        "job": record.job,
        "state": record.state,
        "tasks": str(record.tasks),
        "done": str(record.done),
        "failed": str(record.failed),
        "running": str(record.running),
        "peers": str(record.peers),
        "user": record.user,
        "started": repr(float(record.started)),
    }
    if record.key:
        txt["key"] = record.key
    return txt


# --- decoding untrusted TXT -------------------------------------------------------------


def _decode_properties(properties: Mapping[bytes, bytes | None]) -> dict[str, str | None]:
    """Bytes to text, keys lowercased (RFC 6763 §6.4: keys are case-insensitive)."""
    txt: dict[str, str | None] = {}
    for raw_key, raw_value in properties.items():
        if not raw_key:
            continue  # an empty TXT string is legal and means nothing
        size = len(raw_key) + (0 if raw_value is None else 1 + len(raw_value))
        _check(size <= _MAX_ENTRY_BYTES, f"TXT entry {raw_key[:20]!r} is {size} bytes, over 255")
        try:
            key = raw_key.decode("ascii").lower()
        except UnicodeDecodeError:
            raise ProtocolError(f"TXT key {raw_key[:20]!r} is not ASCII") from None
        try:
            value = None if raw_value is None else raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"TXT value of {key[:20]!r} is not UTF-8 text") from None
        _check(_KEY_NAME.fullmatch(key) is not None, f"TXT key {key[:40]!r} is not a name")
        _check(value is None or value.isprintable(), f"TXT value of {key!r} is not printable")
        txt.setdefault(key, value)  # RFC 6763 §6.4: only the first occurrence counts
    return txt


def _get(txt: Mapping[str, str | None], key: str) -> str:
    _check(key in txt, f"TXT key {key!r} is missing")
    value = txt[key]
    if value is None:
        raise ProtocolError(f"TXT key {key!r} has no value")
    return value


def _uint(txt: Mapping[str, str | None], key: str) -> int:
    value = _get(txt, key)
    _check(_UINT.fullmatch(value) is not None, f"{key}={value[:40]!r} is not a whole number")
    return int(value)


def _ufloat(txt: Mapping[str, str | None], key: str) -> float:
    value = _get(txt, key)
    _check(_UFLOAT.fullmatch(value) is not None, f"{key}={value[:40]!r} is not a number")
    return float(value)


def _version(txt: Mapping[str, str | None]) -> int:
    version = _uint(txt, "v")
    _check(version == PROTOCOL_VERSION, f"protocol version {version} is not {PROTOCOL_VERSION}")
    return version


def decode_peer(
    name: str, addresses: Sequence[str], port: int, properties: Mapping[bytes, bytes | None]
) -> PeerRecord:
    """The peer a service advertises; ProtocolError naming the problem if it is malformed."""
    txt = _decode_properties(properties)
    version = _version(txt)
    _check(bool(addresses), "the service has no IPv4 address")
    state = _get(txt, "state")
    _check(state in PEER_STATES, f"state {state[:40]!r} is not one of {PEER_STATES}")
    mw = _get(txt, "mw")
    return PeerRecord(
        name=name,
        addresses=tuple(addresses),
        port=port,
        state=state,  # type: ignore[arg-type]  # checked just above
        job=_get(txt, "job") if state == "reserved" else None,
        cpus=_uint(txt, "cpus"),
        ram=_uint(txt, "ram"),
        disk=_uint(txt, "disk"),
        cost=_ufloat(txt, "cost"),
        arch=_get(txt, "arch"),
        os=_get(txt, "os"),
        mw=tuple(mw.split(",")) if mw else (),
        key=_get(txt, "key"),
        grid=_get(txt, "grid"),
        cred=txt.get("cred") or "",  # absent: insecure, or not enrolled (coordinators refuse it)
        v=version,
        # A key without "=" is a boolean attribute (RFC 6763 §6.4): present, empty.
        extra={k: v or "" for k, v in txt.items() if k not in _PEER_KEYS},
    )


def decode_job(
    name: str, addresses: Sequence[str], port: int, properties: Mapping[bytes, bytes | None]
) -> JobRecord:
    """The job a coordinator advertises; ProtocolError naming the problem if it is malformed."""
    txt = _decode_properties(properties)
    version = _version(txt)
    _check(bool(addresses), "the service has no IPv4 address")
    state = _get(txt, "state")
    _check(state in JOB_STATES, f"state {state[:40]!r} is not one of {JOB_STATES}")
    return JobRecord(
        name=name,
        addresses=tuple(addresses),
        port=port,
        job=_get(txt, "job"),
        state=state,  # type: ignore[arg-type]  # checked just above
        tasks=_uint(txt, "tasks"),
        done=_uint(txt, "done"),
        failed=_uint(txt, "failed"),
        running=_uint(txt, "running"),
        peers=_uint(txt, "peers"),
        user=_get(txt, "user"),
        started=_ufloat(txt, "started"),
        key=txt.get("key") or "",  # absent: an insecure job, or a coordinator before `cancel`
        v=version,
    )


def parse_peer(
    name: str, addresses: Sequence[str], port: int, properties: Mapping[bytes, bytes | None]
) -> PeerRecord | None:
    """The peer a service advertises, or None (logged) if anything in it is malformed."""
    try:
        return decode_peer(name, addresses, port, properties)
    except ProtocolError as err:
        log.debug("ignoring peer %r: %s", name, err)
        return None


def parse_job(
    name: str, addresses: Sequence[str], port: int, properties: Mapping[bytes, bytes | None]
) -> JobRecord | None:
    """The job a coordinator advertises, or None (logged) if anything in it is malformed."""
    try:
        return decode_job(name, addresses, port, properties)
    except ProtocolError as err:
        log.debug("ignoring job %r: %s", name, err)
        return None
