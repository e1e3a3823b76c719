"""Worker credentials: which desktops the grid lets work for it, and how it takes one back.

Theory of operation. A grid is a CURVE keypair (`keys.py`). Coordinators prove its secret
half to workers in the CurveZMQ handshake; this module makes the other direction just as
strict. The grid's secret half also yields an Ed25519 *signing key* (derived with HKDF, so a
grid made before credentials existed needs no new file). Enrolling a desktop
(`bgrid keys enroll NAME`, on a desktop that can submit) makes a CURVE keypair for that
worker and signs `(grid fingerprint, NAME, worker public key)`: the signature is the
worker's *credential*. The desktop receives the keypair, the credential and the grid's
public key in one token (`bgrid keys join TOKEN`).

The worker advertises its public key (TXT `key`) and its credential (TXT `cred`). Before a
coordinator sends a peer anything (a `probe`, a `reserve`, a byte of data) it checks that
the credential is the grid's signature over that name and that key, and that the key is not
revoked. It then connects with that key pinned as the CURVE server key, so the handshake
succeeds only with the holder of the matching secret key.

Threat model. An attacker on the LAN without any grid file can copy every TXT field and
port of a real peer, and advertise services of its own: it gets nothing, because it cannot
sign a credential for its own key, and cannot complete a handshake pinned to a real peer's
key. A *stolen desktop* holds a valid credential: `bgrid keys revoke NAME` lists its key in
`grid.revoked`, which every submitting desktop reads (copy it along with `grid.key_secret`),
and the grid need not be re-keyed. Out of scope: a thief holding `grid.key_secret` is a
coordinator of the grid (it can enroll workers and run jobs); a revocation not yet copied to
a submitting desktop is not known there.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from bonjourgrid.errors import KeyStoreError
from bonjourgrid.keys import (
    GridKey,
    Keypair,
    is_curve_key,
    key_dir,
    load_grid_key,
    write_grid_key,
)

CREDENTIAL_FILE = "worker.cred"  # on a worker desktop: its keypair and credential (mode 600)
REVOKED_FILE = "grid.revoked"  # on submitting desktops: one revoked worker key per line
ENROLLED_FILE = "grid.enrolled"  # on the enrolling desktop: who was enrolled, with which key
TOKEN_PREFIX = "bgrid-enroll-1:"

_SIGNING_INFO = b"bonjourgrid worker credentials v1"
_PAYLOAD_TAG = b"bonjourgrid-worker-credential-v1"
_SIGNATURE_BYTES = 64
_MAX_VERDICTS = 100_000  # remembered admission checks (peers x their records)
CREDENTIAL_CHARS = 86  # unpadded base64url of a 64-byte signature: one TXT value
_CREDENTIAL_TEXT = re.compile(r"[A-Za-z0-9_-]{86}")
# What a worker may be called: an mDNS instance label that prints safely.
WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _signing_key(grid: GridKey) -> Ed25519PrivateKey:
    if grid.secret is None:
        raise KeyStoreError(
            "enrolling or checking workers needs the grid's secret half (grid.key_secret): do "
            "it on a desktop that can submit jobs"
        )
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SIGNING_INFO).derive(
        z85.decode(grid.secret)
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def _payload(grid_fingerprint: str, name: str, public: str) -> bytes:
    return b"\n".join((_PAYLOAD_TAG, grid_fingerprint.encode(), name.encode(), public.encode()))


def encode_signature(signature: bytes) -> str:
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def decode_signature(text: str) -> bytes | None:
    """The 64 signature bytes of a TXT `cred` value, or None if it is not one."""
    if _CREDENTIAL_TEXT.fullmatch(text) is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "==")
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == _SIGNATURE_BYTES else None


@dataclass(frozen=True)
class WorkerIdentity:
    """What an enrolled desktop holds: its name, CURVE keypair, credential and grid."""

    name: str
    keypair: Keypair
    credential: str  # the grid's signature, base64url: the TXT `cred` value
    grid: GridKey  # the grid's public half

    def to_json(self) -> str:
        assert self.keypair.secret is not None
        return json.dumps(
            {
                "name": self.name,
                "grid_public": self.grid.public.decode(),
                "public": self.keypair.public.decode(),
                "secret": self.keypair.secret.decode(),
                "credential": self.credential,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> WorkerIdentity:
        try:
            data = json.loads(text)
            name, grid_public, public, secret, credential = (
                data[k] for k in ("name", "grid_public", "public", "secret", "credential")
            )
        except (ValueError, KeyError, TypeError):
            raise KeyStoreError(
                f"{where} is not a worker credential: enroll this desktop again "
                "(`bgrid keys enroll NAME` on a submitting desktop, then `bgrid keys join`)"
            ) from None
        fields = (name, grid_public, public, secret, credential)
        if not (
            all(isinstance(v, str) for v in fields)
            and WORKER_NAME.fullmatch(name)
            and all(is_curve_key(k) for k in (grid_public, public, secret))
            and decode_signature(credential) is not None
            and _curve_public(secret) == public
        ):
            raise KeyStoreError(f"{where} holds a damaged worker credential: enroll again")
        return cls(
            name,
            Keypair(public.encode(), secret.encode()),
            credential,
            GridKey(grid_public.encode(), None),
        )


def _curve_public(secret: str) -> str | None:
    try:
        return str(zmq.curve_public(secret.encode()).decode())
    except (zmq.ZMQError, ValueError):
        return None


def issue(grid: GridKey, name: str, keypair: Keypair | None = None) -> WorkerIdentity:
    """A credential for the worker called `name` and `keypair` (default: a new one); needs
    the grid's secret."""
    if WORKER_NAME.fullmatch(name) is None:
        raise KeyStoreError(
            f"worker name {name[:80]!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    pair = keypair or Keypair.generate()
    signature = _signing_key(grid).sign(_payload(grid.fingerprint, name, pair.public.decode()))
    return WorkerIdentity(name, pair, encode_signature(signature), GridKey(grid.public, None))


class CredentialCheck:
    """A coordinator's judge of peers: is this record a worker the grid enrolled?"""

    def __init__(self, grid: GridKey, revoked: Iterable[str] = ()) -> None:
        self.grid = grid.fingerprint
        self._verify_key: Ed25519PublicKey = _signing_key(grid).public_key()
        self.revoked = frozenset(revoked)
        # Recruitment asks again on every change it hears of: a signature is checked once.
        self._verdicts: dict[tuple[str, str, str], str | None] = {}

    def refusal(self, name: str, public: str, credential: str) -> str | None:
        """Why a peer advertising this name, key and credential is not admitted; None if it is."""
        claim = (name, public, credential)
        if claim not in self._verdicts:
            if len(self._verdicts) >= _MAX_VERDICTS:  # a flood of fakes cannot grow it forever
                self._verdicts.clear()
            self._verdicts[claim] = self._judge(name, public, credential)
        return self._verdicts[claim]

    def _judge(self, name: str, public: str, credential: str) -> str | None:
        if not credential:
            return "has no worker credential (enroll it: `bgrid keys enroll NAME`)"
        signature = decode_signature(credential)
        if signature is None:
            return "advertises a malformed credential"
        try:
            self._verify_key.verify(signature, _payload(self.grid, name, public))
        except InvalidSignature:
            return "has a credential this grid did not issue for its name and key"
        if public in self.revoked:
            return f"was revoked (its key is in {REVOKED_FILE})"
        return None


# -- files on disk ------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def enroll(grid: GridKey, name: str, directory: Path | None = None) -> tuple[WorkerIdentity, str]:
    """Issue a credential for `name`, record it for `revoke`; the identity and its token."""
    identity = issue(grid, name)
    directory = directory or key_dir()
    with open(directory / ENROLLED_FILE, "a") as registry:
        registry.write(
            json.dumps(
                {"name": name, "public": identity.keypair.public.decode(), "at": time.time()}
            )
            + "\n"
        )
    return identity, token(identity)


def token(identity: WorkerIdentity) -> str:
    """The one line to paste on the enrolled desktop (it holds the worker's secret key)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(identity.to_json().encode()).decode()


def parse_token(text: str) -> WorkerIdentity:
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise KeyStoreError(
            f"not an enrolment token (it starts with {TOKEN_PREFIX!r}): copy the whole line "
            "`bgrid keys enroll NAME` printed"
        )
    try:
        raw = base64.urlsafe_b64decode(text[len(TOKEN_PREFIX) :]).decode()
    except (binascii.Error, ValueError):
        raise KeyStoreError("the enrolment token is damaged: copy it again, whole") from None
    return WorkerIdentity.from_json(raw, "the enrolment token")


def join(identity: WorkerIdentity, directory: Path | None = None, force: bool = False) -> Path:
    """Make this desktop a worker of `identity`'s grid; the credential file written."""
    directory = directory or key_dir()
    public_file = directory / "grid.key"
    if public_file.exists():
        current = load_grid_key(directory)
        if current.public != identity.grid.public and not force:
            raise KeyStoreError(
                f"{public_file} belongs to grid {current.fingerprint}, the token to grid "
                f"{identity.grid.fingerprint}: pass --force to switch this desktop's grid"
            )
    else:
        write_grid_key(identity.grid, directory)
    path = directory / CREDENTIAL_FILE
    _write_private(path, identity.to_json() + "\n")
    return path


def load_identity(path: Path | None = None) -> WorkerIdentity:
    """This desktop's worker credential; KeyStoreError saying how to enroll when absent."""
    path = path or key_dir() / CREDENTIAL_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KeyStoreError(
            f"this desktop is not enrolled in the grid (no {path}): on a desktop that submits "
            "jobs, run `bgrid keys enroll NAME`, then paste the `bgrid keys join ...` line it "
            "prints here (`--insecure` runs without any key)"
        ) from None
    except OSError as err:
        raise KeyStoreError(f"cannot read {path}: {err.strerror or err}") from None
    return WorkerIdentity.from_json(text, str(path))


def write_identity(identity: WorkerIdentity, path: Path) -> None:
    _write_private(path, identity.to_json() + "\n")


def enrolled(directory: Path | None = None) -> list[tuple[str, str]]:
    """(name, public key) of every worker enrolled from this desktop, oldest first."""
    path = (directory or key_dir()) / ENROLLED_FILE
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
            out.append((str(entry["name"]), str(entry["public"])))
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line names nobody
    return out


def load_revoked(directory: Path | None = None) -> set[str]:
    """The revoked worker keys (Z85) this desktop knows of."""
    path = (directory or key_dir()) / REVOKED_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise KeyStoreError(f"cannot read {path}: {err.strerror or err}") from None
    return {key for line in lines if is_curve_key(key := line.split(" ", 1)[0])}


def revoke(name: str, directory: Path | None = None, key: str | None = None) -> list[str]:
    """Revoke every credential issued to `name` from this desktop (or the one `key`)."""
    directory = directory or key_dir()
    if key is not None:
        if not is_curve_key(key):
            raise KeyStoreError(f"--key {key[:80]!r} is not a 40-character Z85 CURVE key")
        keys = [key]
    else:
        keys = [public for enrolled_name, public in enrolled(directory) if enrolled_name == name]
        if not keys:
            raise KeyStoreError(
                f"no worker called {name!r} was enrolled from this desktop: pass its key with "
                "--key (`bgrid peers --json` shows it)"
            )
    already = load_revoked(directory)
    fresh = [k for k in keys if k not in already]
    with open(directory / REVOKED_FILE, "a") as f:
        for k in fresh:
            f.write(f"{k} {name}\n")
    return fresh
