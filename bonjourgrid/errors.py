"""Every error a user can meet, in one tree.

    BonjourGridError          base: the CLI prints str(err) and exits with `exit_code`
    ├── DagError              the workflow file is wrong (exit 2, before any peer is touched)
    ├── RequirementError      a `--require` / `require:` expression is wrong (exit 2)
    ├── ConfigError           a flag, config file or key store is wrong (exit 2)
    ├── KeyStoreError         no grid key where one is needed (exit 2)
    ├── StageError            an input file or URL cannot be staged (exit 2, before any peer)
    ├── ProtocolError         a message on the wire is malformed (never fatal to a daemon)
    ├── TransferError         a file could not be fetched or failed its digest check
    ├── RecruitError          no peer of this grid fits the job (exit 3)
    └── JobFailed             `bonjourgrid.run`: the job ran and did not succeed (its report
                              on `.report`; `bgrid submit` says so with exit 1 instead)

Messages say what was wrong and what to do about it.

    KeyboardInterrupt
    └── Interrupted           SIGINT or SIGTERM stopped a command (exit 128 + the signal)
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # errors.py is imported by every process: the report types only when checked
    from bonjourgrid.job_report import Report


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


class JobFailed(BonjourGridError):
    """The job ran to its end without succeeding: a task failed for good, or it was cancelled."""

    def __init__(self, report: Report) -> None:
        # the reason names the failed tasks already: "2 task(s) failed (a, b)"
        super().__init__(f"job {report.job} {report.status}: {report.reason}")
        self.report = report
        self.exit_code = report.exit_status or 1  # an `abort_on` status, as `bgrid submit`


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command; a KeyboardInterrupt, so `except Exception` never eats it."""

    def __init__(self, sig: signal.Signals, detail: str = "", report: Report | None = None) -> None:
        super().__init__(sig.name)
        self.signal = sig
        self.detail = detail  # what was going on, and what became of it
        self.report = report  # `bonjourgrid.run`: the cancelled job's report, once tasks ran

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)

    def __str__(self) -> str:
        return f"interrupted by {self.signal.name}" + (f" {self.detail}" if self.detail else "")
