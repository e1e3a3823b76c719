"""Every error a user can meet, in one tree.

    BonjourGridError          base: the CLI prints str(err) and exits with `exit_code`
    ├── DagError              the workflow file is wrong (exit 2, before any peer is touched)
    ├── RequirementError      a `--require` / `require:` expression is wrong (exit 2)
    ├── ConfigError           a flag, config file or key store is wrong (exit 2)
    ├── KeyStoreError         no grid key where one is needed (exit 2)
    ├── StageError            an input file or URL cannot be staged (exit 2, before any peer)
    ├── ProtocolError         a message on the wire is malformed (never fatal to a daemon)
    ├── TransferError         a file could not be fetched or failed its digest check
    └── RecruitError          no peer of this grid fits the job (exit 3)

Messages say what was wrong and what to do about it.

    KeyboardInterrupt
    └── Interrupted           SIGINT or SIGTERM stopped a command (exit 128 + the signal)
"""

from __future__ import annotations

import signal


class BonjourGridError(Exception):
    exit_code = 1


class DagError(BonjourGridError):
    exit_code = 2


class RequirementError(BonjourGridError):
    exit_code = 2


class ConfigError(BonjourGridError):
    exit_code = 2


class KeyStoreError(ConfigError):
    pass


class StageError(BonjourGridError):
    exit_code = 2


class ProtocolError(BonjourGridError):
    pass


class TransferError(BonjourGridError):
    pass


class RecruitError(BonjourGridError):
    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command; a KeyboardInterrupt, so `except Exception` never eats it."""

    def __init__(self, sig: signal.Signals, detail: str = "") -> None:
        super().__init__(sig.name)
        self.signal = sig
        self.detail = detail  # what was going on, and what became of it

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)

    def __str__(self) -> str:
        return f"interrupted by {self.signal.name}" + (f" {self.detail}" if self.detail else "")
