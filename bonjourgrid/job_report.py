"""The job report, typed: what `bonjourgrid.run` returns and `Report.from_dict` reads back.

The report is born a JSON-shaped dict (coordinator/report.py builds it; `--report FILE` and
`--json` write it; DESIGN.md fixes its keys). `Report` is a read-only view of that dict as
frozen dataclasses, so a program gets names and types (`report.tasks["t1"].peer`) instead
of string keys. The dict itself stays the source: `as_dict()` returns a copy of it, keys this
view does not know included, so a report read with `from_dict` and written again loses nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bonjourgrid.errors import ConfigError

__all__ = ["ByteCounts", "PeerReport", "Report", "TaskReport"]


@dataclass(frozen=True)
class TaskReport:
    """One task as the job ended: where it ran, when (seconds since the job started), how often."""

    name: str
    status: str  # done | failed | skipped | cancelled | ... (core.TaskStatus values)
    peer: str | None
    start: float | None
    end: float | None
    attempts: int
    exit_code: int | None
    fetch_s: float | None = None  # waiting for input data on the peer
    run_s: float | None = None  # running the command
    bytes_fetched: int = 0
    error: str | None = None
    stderr_tail: str | None = None  # a failed task's last stderr lines
    resumed: bool = False  # done in an earlier run; kept by --resume
    rerun: str | None = None  # why it ran again after it was done
    logs: Mapping[str, Any] | None = None  # where its stdout and stderr are kept
    # Speculative copies made of it ({"peer", "attempt", "why"}) and which run's outputs won.
    copies: tuple[Mapping[str, Any], ...] = ()
    won: str | None = None
    quorum: Mapping[str, Any] | None = None  # {"quorum", "votes", "accepted"} under quorum

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> TaskReport:
        return cls(
            name=name,
            status=str(data["status"]),
            peer=data.get("peer"),
            start=data.get("start"),
            end=data.get("end"),
            attempts=int(data.get("attempts", 0)),
            exit_code=data.get("exit_code"),
            fetch_s=data.get("fetch_s"),
            run_s=data.get("run_s"),
            bytes_fetched=int(data.get("bytes_fetched") or 0),
            error=data.get("error"),
            stderr_tail=data.get("stderr_tail"),
            resumed=bool(data.get("resumed", False)),
            rerun=data.get("rerun"),
            logs=MappingProxyType(dict(data["logs"])) if data.get("logs") else None,
            copies=tuple(MappingProxyType(dict(c)) for c in data.get("copies", ())),
            won=data.get("won"),
            quorum=MappingProxyType(dict(data["quorum"])) if data.get("quorum") else None,
        )


@dataclass(frozen=True)
class PeerReport:
    """A peer the job held: its name and what it offered."""

    name: str
    cpus: int
    ram: int  # bytes
    cost: float  # per CPU-hour


@dataclass(frozen=True)
class ByteCounts:
    """Bytes the job moved, by way (DESIGN.md)."""

    from_coordinator: int = 0
    peer_to_peer: int = 0
    cache_hits: int = 0
    to_submitter: int = 0


@dataclass(frozen=True)
class Report:
    """A job's report. `exit_status` is what `bgrid submit` exits with: 0 when it succeeded
    (or an `abort_on` said 0), else 1 or the `abort_on` status."""

    job: str
    workflow: str
    status: str  # "succeeded" | "failed" | "aborted" (a task's `abort_on`)
    reason: str
    makespan_s: float
    tasks: Mapping[str, TaskReport]  # in the workflow's order
    peers: tuple[PeerReport, ...]
    bytes: ByteCounts
    edges: tuple[tuple[str, str], ...] = ()  # (parent, child): child needs parent
    started_at: float = 0.0  # wall-clock time (s since the epoch)
    prefetch: str = ""  # the data policy
    journal: Path | None = None
    signal: str | None = None  # the signal that cancelled the job, e.g. "SIGINT"
    # What `bgrid submit` exits with: 0 when it succeeded, 1 when not, or an `abort_on` status.
    exit_status: int = 1
    aborted: Mapping[str, Any] | None = None  # {"task", "exit_code", "exit_status"} of an abort
    # Peers whose outputs a quorum's majority did not share (how often), and those that were
    # released for it (outvoted too often).
    outvoted: Mapping[str, int] = field(default_factory=dict)
    distrusted: tuple[str, ...] = ()
    _source: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def failed_tasks(self) -> tuple[str, ...]:
        return tuple(name for name, task in self.tasks.items() if task.status == "failed")

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (a copy), as `bgrid submit --json` prints it."""
        return copy.deepcopy(dict(self._source))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, copy_data: bool = True) -> Report:
        """The report of a dict such as `bgrid submit --report FILE.json` writes.

        `copy_data=False` when nobody else holds `data` (a 100,000-task report is big)."""
        try:
            bytes_ = data.get("bytes") or {}
            return cls(
                job=str(data["job"]),
                workflow=str(data.get("workflow", "")),
                status=str(data["status"]),
                reason=str(data.get("reason", "")),
                makespan_s=float(data.get("makespan_s") or 0.0),
                tasks=MappingProxyType(
                    {name: TaskReport.from_dict(name, t) for name, t in data["tasks"].items()}
                ),
                peers=tuple(
                    PeerReport(p["name"], p["cpus"], p["ram"], p["cost"])
                    for p in data.get("peers", ())
                ),
                bytes=ByteCounts(
                    **{k: int(v) for k, v in bytes_.items() if k in ByteCounts.__annotations__}
                ),
                edges=tuple((str(u), str(v)) for u, v in data.get("edges", ())),
                started_at=float(data.get("started_at") or 0.0),
                prefetch=str(data.get("prefetch", "")),
                journal=Path(data["journal"]) if data.get("journal") else None,
                signal=data.get("signal"),
                exit_status=_exit_status(data),
                aborted=MappingProxyType(dict(data["aborted"])) if data.get("aborted") else None,
                outvoted=MappingProxyType(
                    {str(k): int(v) for k, v in (data.get("outvoted") or {}).items()}
                ),
                distrusted=tuple(str(p) for p in data.get("distrusted", ())),
                _source=copy.deepcopy(dict(data)) if copy_data else data,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(
                f"not a bgrid report ({type(err).__name__}: {err}); "
                "give one written by `bgrid submit --report FILE.json`"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """A report file written by `bgrid submit --report FILE.json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the report {path}: {err}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path} is not a bgrid report (`bgrid submit --report FILE.json`)")
        return cls.from_dict(data)


def _exit_status(data: Mapping[str, Any]) -> int:
    """The report's exit status; a report written before `abort_on` existed has none."""
    status = data.get("exit_status")
    if isinstance(status, int) and not isinstance(status, bool):
        return status
    return 0 if data["status"] == "succeeded" else 1
