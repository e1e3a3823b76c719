"""Grid keys: a grid is a CURVE keypair, stored with pyzmq's own certificate files.

A desktop that holds the public half (``grid.key``) serves the grid as a worker: it runs tasks
only for clients that prove the secret half in the CurveZMQ handshake. A desktop that also
holds ``grid.key_secret`` can coordinate jobs on the grid. Peers advertise the grid's
fingerprint so coordinators recruit only peers of their own grid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from bonjourgrid.errors import KeyStoreError

INSECURE_FINGERPRINT = "insecure"
_BASENAME = "grid"


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, both halves Z85-encoded."""

    public: bytes
    secret: bytes | None

    @classmethod
    def generate(cls) -> Keypair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@dataclass(frozen=True)
class GridKey:
    """The grid's keypair; `secret` is None on worker-only desktops."""

    public: bytes
    secret: bytes | None
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def keypair(self) -> Keypair:
        return Keypair(self.public, self.secret)


_Z85_CHARS = frozenset(zmq.utils.z85.Z85CHARS.decode())


def is_curve_key(text: str) -> bool:
    """Whether `text` is a CURVE key (public or secret) in Z85: 40 characters of its alphabet."""
    return len(text) == 40 and set(text) <= _Z85_CHARS


def fingerprint(public_z85: bytes) -> str:
    """16 hex digits that name a grid in TXT records and messages."""
    return hashlib.sha256(zmq.utils.z85.decode(public_z85)).hexdigest()[:16]


def key_dir() -> Path:
    """Where this desktop keeps its grid key: $XDG_CONFIG_HOME/bonjourgrid."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bonjourgrid"


def init_grid_key(directory: Path | None = None, force: bool = False) -> GridKey:
    """Create a new grid key; refuse to overwrite an existing one unless `force`."""
    directory = directory or key_dir()
    public_file = directory / f"{_BASENAME}.key"
    if public_file.exists() and not force:
        raise KeyStoreError(
            f"a grid key already exists in {public_file}: keep it, or pass --force to replace it "
            "(every desktop of the old grid would then need the new key)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        public_tmp, secret_tmp = zmq.auth.create_certificates(scratch, _BASENAME)
        os.chmod(secret_tmp, 0o600)
        shutil.move(secret_tmp, directory / f"{_BASENAME}.key_secret")
        shutil.move(public_tmp, public_file)
    return load_grid_key(directory)


def load_grid_key(directory: Path | None = None, need_secret: bool = False) -> GridKey:
    """The grid key stored in `directory`; KeyStoreError saying what to do when absent."""
    directory = directory or key_dir()
    secret_file = directory / f"{_BASENAME}.key_secret"
    public_file = directory / f"{_BASENAME}.key"
    source = secret_file if secret_file.exists() else public_file
    if not source.exists():
        raise KeyStoreError(
            f"no grid key in {directory}: run `bgrid keys init` to create a grid, or copy "
            "grid.key (and grid.key_secret to submit jobs) from a desktop of your grid "
            "(`bgrid keys show` there says what to copy); `--insecure` runs without one"
        )
    try:
        public, secret = zmq.auth.load_certificate(source)
    except (OSError, ValueError) as err:
        raise KeyStoreError(f"cannot read grid key {source}: {err}") from err
    if need_secret and secret is None:
        raise KeyStoreError(
            f"{directory} holds only the public half of the grid key: this desktop can serve "
            f"the grid but not coordinate it; copy grid.key_secret from the desktop that ran "
            "`bgrid keys init` to submit jobs"
        )
    return GridKey(public, secret, source)


def write_grid_key(key: GridKey, directory: Path) -> None:
    """Store `key` in `directory` (used to hand an ephemeral key to local workers)."""
    directory.mkdir(parents=True, exist_ok=True)
    public_file = directory / f"{_BASENAME}.key"
    public_file.write_text(
        f'# BonjourGrid grid key (public)\ncurve\n    public-key = "{key.public.decode()}"\n'
    )
    if key.secret is not None:
        secret_file = directory / f"{_BASENAME}.key_secret"
        secret_file.write_text(
            "# BonjourGrid grid key (secret)\ncurve\n"
            f'    public-key = "{key.public.decode()}"\n'
            f'    secret-key = "{key.secret.decode()}"\n'
        )
        os.chmod(secret_file, 0o600)


def ephemeral_grid_key() -> GridKey:
    """A throwaway grid, for `bgrid submit --local`."""
    pair = Keypair.generate()
    return GridKey(pair.public, pair.secret)
