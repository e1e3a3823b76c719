"""Task logs: every attempt's stdout and stderr, kept in the submit directory.

Where: `<submit dir>/.bgrid/logs/<job>/<task>.<attempt>.out` and `.err`, one pair per attempt
that reached its peer's `task_done`, whether it succeeded or not. The report names the
latest attempt's pair for each task (and every attempt's, when there were several);
`bgrid logs JOB TASK` prints them.

Bounded: a worker sends the last MAX_LOG bytes (1 MiB) of each stream. When a command wrote
more, the kept file opens with one line saying how many bytes were dropped before it.

How they travel: as two bytes fields of the `task_done` message (protocol/messages.py),
rather than as content-addressed files the coordinator fetches like outputs. The logs then
arrive with the result they explain, in the one message the coordinator already waits for:
no second round trip, nothing for the peer to pin in its cache until a fetch that a lost
peer would never serve, and no fetch that could fail after the task succeeded. The price is
the bound: 2 MiB per attempt, well under the 4 MiB control frame (a worker whose report
would still not fit, with very many outputs, cuts the logs further: daemon.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonjourgrid.errors import ConfigError
from bonjourgrid.protocol import MAX_LOG

LOGS_DIR = Path(".bgrid") / "logs"  # in the submit directory
_SUFFIX = {"stdout": "out", "stderr": "err"}
_LOG_FILE = re.compile(r"(?P<task>.+)\.(?P<attempt>[0-9]+)\.(?P<kind>out|err)\Z")


def job_stem(workflow_name: str) -> str:
    """The part of a job id that its workflow's name gives (the job id adds `-<6 hex>`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", workflow_name).strip("-._")[:40] or "job"


def truncation_note(dropped: int) -> bytes:
    """The line a kept log opens with when its first `dropped` bytes were not kept."""
    return f"[bgrid: the first {dropped} bytes were dropped; the last {MAX_LOG} follow]\n".encode()


@dataclass(frozen=True, slots=True)
class AttemptLogs:
    """Where one attempt's stdout and stderr are kept, and how many bytes each lost.

    One per attempt of every task lives until the report: it holds the job's log directory
    (one object, shared) and the task's name, and makes its two paths when asked, rather
    than holding two `Path` objects (about 1 KB per task in a 100,000-task job)."""

    directory: Path
    task: str
    attempt: int
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def stdout(self) -> Path:
        return self.directory / f"{self.task}.{self.attempt}.{_SUFFIX['stdout']}"

    @property
    def stderr(self) -> Path:
        return self.directory / f"{self.task}.{self.attempt}.{_SUFFIX['stderr']}"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attempt": self.attempt,
            "stdout": str(self.stdout),
            "stderr": str(self.stderr),
        }
        if self.stdout_dropped:
            out["stdout_dropped_bytes"] = self.stdout_dropped
        if self.stderr_dropped:
            out["stderr_dropped_bytes"] = self.stderr_dropped
        return out


class LogKeeper:
    """Writes the logs of one job's attempts; remembers where, for the report."""

    def __init__(self, submit_dir: Path, job: str) -> None:
        self.dir = submit_dir / LOGS_DIR / job
        self.kept: dict[str, dict[int, AttemptLogs]] = {}

    def keep(
        self,
        task: str,
        attempt: int,
        stdout: bytes,
        stdout_size: int,
        stderr: bytes,
        stderr_size: int,
    ) -> AttemptLogs:
        """Write one attempt's logs (the task name is one of the workflow's: a file name);
        OSError if the submit directory cannot take them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dropped = {"stdout": max(0, stdout_size - len(stdout)), "stderr": 0}
        dropped["stderr"] = max(0, stderr_size - len(stderr))
        logs = AttemptLogs(self.dir, task, attempt, dropped["stdout"], dropped["stderr"])
        for stream, data, path in (
            ("stdout", stdout, logs.stdout),
            ("stderr", stderr, logs.stderr),
        ):
            note = truncation_note(dropped[stream]) if dropped[stream] else b""
            path.write_bytes(note + data)
        self.kept.setdefault(task, {})[attempt] = logs
        return logs

    def report(self, task: str) -> dict[str, Any] | None:
        """The report's `logs` of a task: its latest attempt's, and every attempt's if several."""
        attempts = self.kept.get(task)
        if not attempts:
            return None
        out = attempts[max(attempts)].as_json()
        if len(attempts) > 1:
            out["attempts"] = [attempts[n].as_json() for n in sorted(attempts)]
        return out


def find_log(
    submit_dir: Path, job: str, task: str, attempt: int | None = None, stderr: bool = False
) -> Path:
    """The kept stdout (or stderr) of `task` in `job` (a job id, or a workflow name: its
    latest job that ran the task), of `attempt` or the latest; ConfigError saying what
    there is otherwise."""
    root = submit_dir / LOGS_DIR
    jobs = sorted(p for p in _listing(root) if p.is_dir())
    if not jobs:
        raise ConfigError(
            f"no task logs in {root}: give the directory the job was submitted from (--dir DIR)"
        )
    chosen = [p for p in jobs if p.name == job]
    if not chosen:
        named = re.compile(re.escape(job_stem(job)) + r"-[0-9a-f]{6}\Z")
        chosen = [p for p in jobs if named.match(p.name)]
    if not chosen:
        raise ConfigError(f"no job {job!r} in {root}; its jobs: {', '.join(p.name for p in jobs)}")
    runs: list[tuple[float, Path, dict[int, Path]]] = []
    for directory in chosen:
        found = _attempts(directory, task, "err" if stderr else "out")
        if found:
            newest = max(found.values(), key=_mtime)
            runs.append((_mtime(newest), directory, found))
    if not runs:
        tasks = sorted({m["task"] for d in chosen for f in _listing(d) if (m := _match(f))})
        raise ConfigError(
            f"no logs of task {task!r} in job {chosen[-1].name}"
            + (f"; tasks with logs: {', '.join(tasks[:20])}" if tasks else "")
            + ("..." if len(tasks) > 20 else "")
        )
    _, directory, found = max(runs, key=lambda run: run[0])
    number = max(found) if attempt is None else attempt
    if number not in found:
        have = ", ".join(str(n) for n in sorted(found))
        raise ConfigError(f"task {task!r} of job {directory.name} has no attempt {number}: {have}")
    return found[number]


def _attempts(directory: Path, task: str, kind: str) -> dict[int, Path]:
    found = {}
    for path in _listing(directory):
        m = _match(path)
        if m is not None and m["task"] == task and m["kind"] == kind:
            found[int(m["attempt"])] = path
    return found


def _match(path: Path) -> re.Match[str] | None:
    return _LOG_FILE.match(path.name)


def _listing(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
