"""Task logs: every attempt's stdout and stderr, kept in the submit directory.

Where: `<submit dir>/.bgrid/logs/<job>/<task>.<attempt>.out` and `.err`, one pair per attempt
that reached its peer's `task_done`, whether it succeeded or not. The report names the
latest attempt's pair for each task (and every attempt's, when there were several);
`bgrid logs JOB TASK` prints them.

Bounded: a worker sends the last MAX_LOG bytes (1 MiB) of each stream. When a command wrote
more, the kept file opens with one line saying how many bytes were dropped before it.

Empty streams are not written. Most tasks of a large workflow print nothing, and creating a
file costs a disk's directory update (a few hundred microseconds here, as much as the rest of
a tiny task's path through the coordinator). Instead every attempt that came back gets one
line in the job's `attempts` index (`<task>\t<attempt>`, appended to a file held open), so
`bgrid logs` tells a task that printed nothing (it prints nothing) from one that never ran
(an error). The report names no file for an empty stream (`"stdout": null`).

Pre and post scripts (scripts.py) run here: each writes its stdout and stderr straight into
`<task>.<attempt>.pre.out`/`.err` (or `.post.`) next to its task's logs, even when empty (a
script is rare; its files say that it ran). The report lists every script that ran, with its
exit code and files (`"scripts"` of the task), and `bgrid logs JOB TASK --script pre` prints
them.

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
from typing import Any, TextIO

from bonjourgrid.errors import ConfigError
from bonjourgrid.protocol import MAX_LOG

LOGS_DIR = Path(".bgrid") / "logs"  # in the submit directory
INDEX = "attempts"  # per job directory: one `<task>\t<attempt>` line per attempt that came back
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
    stdout_kept: bool = True  # False: the stream was empty, no file
    stderr_kept: bool = True

    @property
    def stdout(self) -> Path | None:
        if not self.stdout_kept:
            return None
        return self.directory / f"{self.task}.{self.attempt}.{_SUFFIX['stdout']}"

    @property
    def stderr(self) -> Path | None:
        if not self.stderr_kept:
            return None
        return self.directory / f"{self.task}.{self.attempt}.{_SUFFIX['stderr']}"

    def as_json(self) -> dict[str, Any]:
        stdout, stderr = self.stdout, self.stderr
        out: dict[str, Any] = {
            "attempt": self.attempt,
            "stdout": None if stdout is None else str(stdout),
            "stderr": None if stderr is None else str(stderr),
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
        # task -> the scripts that ran, in order: {"attempt", "script", "exit_code", paths}
        self.scripts: dict[str, list[dict[str, Any]]] = {}
        self._index: TextIO | None = None  # the job's `attempts` file, opened at the first

    def close(self) -> None:
        """Flush and close the index (the job is over); keeping more reopens it."""
        if self._index is not None:
            self._index.close()
            self._index = None

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
        if self._index is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered: `bgrid logs` run while the job goes on sees every attempt so far.
            self._index = open(self.dir / INDEX, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (held for the job, closed by close())
        logs = AttemptLogs(
            self.dir,
            task,
            attempt,
            max(0, stdout_size - len(stdout)),
            max(0, stderr_size - len(stderr)),
            # An empty stream gets no file (why: the module's docstring).
            stdout_kept=bool(stdout_size or stdout),
            stderr_kept=bool(stderr_size or stderr),
        )
        for data, path, dropped in (
            (stdout, logs.stdout, logs.stdout_dropped),
            (stderr, logs.stderr, logs.stderr_dropped),
        ):
            if path is not None:
                path.write_bytes((truncation_note(dropped) if dropped else b"") + data)
        self._index.write(f"{task}\t{attempt}\n")
        self.kept.setdefault(task, {})[attempt] = logs
        return logs

    def script_paths(
        self, task: str, attempt: int, script: str, make: bool = False
    ) -> tuple[Path, Path]:
        """Where a script's stdout and stderr go; `make`: the directory made (OSError if it
        cannot be)."""
        if make:
            self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"{task}.{attempt}.{script}"
        return stem.with_name(stem.name + ".out"), stem.with_name(stem.name + ".err")

    def script_ended(self, task: str, attempt: int, script: str, exit_code: int | None) -> None:
        """Remember a script's end for the report (None: it could not start)."""
        stdout, stderr = self.script_paths(task, attempt, script)
        self.scripts.setdefault(task, []).append(
            {
                "attempt": attempt,
                "script": script,
                "exit_code": exit_code,
                "stdout": str(stdout),
                "stderr": str(stderr),
            }
        )

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
    submit_dir: Path,
    job: str,
    task: str,
    attempt: int | None = None,
    stderr: bool = False,
    script: str | None = None,
) -> Path | None:
    """The kept stdout (or stderr) of `task` in `job` (a job id, or a workflow name: its
    latest job that ran the task), of `attempt` or the latest; None when that attempt wrote
    nothing on the stream; ConfigError saying what there is otherwise. `script` ("pre" or
    "post"): that script's instead of the command's."""
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
    runs: list[tuple[float, Path, set[int]]] = []
    for directory in chosen:
        found = (
            _attempts(directory).get(task) if script is None else _scripts(directory, task, script)
        )
        if found:
            runs.append((max(_mtime(directory / INDEX), _mtime(directory)), directory, found))
    if not runs:
        tasks = sorted(_attempts(chosen[-1]))
        raise ConfigError(
            f"no {f'{script} script ' if script else ''}logs of task {task!r} "
            f"in job {chosen[-1].name}"
            + (f"; tasks with logs: {', '.join(tasks[:20])}" if tasks else "")
            + ("..." if len(tasks) > 20 else "")
        )
    _, directory, found = max(runs, key=lambda run: run[0])
    number = max(found) if attempt is None else attempt
    if number not in found:
        have = ", ".join(str(n) for n in sorted(found))
        raise ConfigError(f"task {task!r} of job {directory.name} has no attempt {number}: {have}")
    kind = f"{script}." if script else ""
    path = directory / f"{task}.{number}.{kind}{'err' if stderr else 'out'}"
    return path if path.exists() else None


def _scripts(directory: Path, task: str, script: str) -> set[int]:
    """The attempts of `task` whose `script` ran (their files are always written)."""
    found = set()
    prefix, suffix = f"{task}.", f".{script}.out"
    for path in _listing(directory):
        name = path.name
        if name.startswith(prefix) and name.endswith(suffix):
            number = name[len(prefix) : -len(suffix)]
            if number.isdigit():
                found.add(int(number))
    return found


def _attempts(directory: Path) -> dict[str, set[int]]:
    """The attempts of each task that came back, from the job's index and its log files
    (a job kept before the index existed has files only)."""
    found: dict[str, set[int]] = {}
    try:
        with open(directory / INDEX, encoding="utf-8") as index:
            for line in index:
                task, _, number = line.rstrip("\n").rpartition("\t")
                if task and number.isdigit():
                    found.setdefault(task, set()).add(int(number))
    except OSError:
        pass
    for path in _listing(directory):
        m = _match(path)
        if m is not None:
            found.setdefault(m["task"], set()).add(int(m["attempt"]))
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
