"""The job journal: what finished, written as it happens, so `bgrid submit --resume` can go on.

One append-only JSON-lines file per workflow in the submit directory,
`.bgrid/<workflow name>.journal`:

    {"t": "job", "v": 1, "job", "workflow", "workflow_digest", "started", "lease_s", "local"}
    {"t": "done", "task", "spec", "inputs": [[path, digest, size], ...], "outputs": [...],
     "peer", "attempts"}
    {"t": "failed", "task", "error", "attempts"}
    {"t": "end", "status", "reason"}

Durability: each line goes out in one write(2) on an O_APPEND descriptor, so a `kill -9`
leaves at most a torn last line, which reading ignores (the task it named runs again).
fsync runs at most once every FSYNC_S and when the job ends: a power cut, unlike a kill,
may lose the last second of finished tasks, which then run again too.

Resuming trusts nothing it cannot check: a task recorded done is kept only if its command,
files and environment are unchanged (the `spec` digest), the inputs it read are the bytes
there now, each of its outputs in the submit directory still has the recorded digest, and
every task it depends on is kept too. Everything else runs again. "The bytes there now" are
read unless the digest cache (`cache/digests.py`) vouches that the file is the one an earlier
submit hashed: same device, inode, size, mtime and ctime.

An intermediate output stays in the cache of the peer that made it. A resumed run on the
same grid asks its peers' caches for it (and makes it again if none holds it any more). A
local grid's workers (`--local`) are new at every run and their caches go with them: when
the earlier run or this one is local, an intermediate that only such a cache held is gone,
and a task whose lost output an unkept task still needs runs again, with that reason, rather
than being counted as kept and then run again behind the user's back.

Every submit starts a new journal; the previous one is kept as `.journal.1`. A resumed
submit's new journal first carries the done records of the tasks it kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid.cache.digests import DIGESTS_FILE, DigestCache
from bonjourgrid.cache.store import FileRef, is_digest
from bonjourgrid.dag import TaskSpec, Workflow
from bonjourgrid.errors import ConfigError

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
FSYNC_S = 1.0  # at most one fsync per this many seconds while the job runs

Refs = tuple[tuple[str, FileRef], ...]


@dataclass(frozen=True)
class DoneRecord:
    """A task that finished: its outputs are in the submit directory, or (intermediates) in
    the cache of the peer that made them."""

    task: str
    spec: str  # task_digest() of the task as it ran
    inputs: Refs
    outputs: Refs
    peer: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class JournalState:
    """What a journal says, read back; `skipped` counts lines that were torn or unreadable."""

    job: str
    workflow: str
    workflow_digest: str
    started: float
    lease_s: float
    done: Mapping[str, DoneRecord] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    end: tuple[str, str] | None = None  # (status, reason) of a job that ended
    skipped: int = 0
    local: bool = False  # the run was on a local grid: its workers' caches are gone


@dataclass(frozen=True)
class ResumePlan:
    """Which recorded tasks a resumed run keeps, and why the others run again."""

    journal: JournalState
    kept: Mapping[str, DoneRecord]
    rerun: Mapping[str, str]  # task recorded done -> why it runs again
    source_refs: Mapping[str, FileRef]  # source inputs hashed while checking
    workflow_changed: bool


# -- names and digests ----------------------------------------------------------------------


def journal_path(workflow: Workflow) -> Path:
    """Where the journal of `workflow` lives: `<submit dir>/.bgrid/<name>.journal`."""
    stem = re.sub(r"[^\w.-]+", "_", workflow.name).lstrip(".") or "workflow"
    return workflow.root / ".bgrid" / f"{stem}.journal"


def workflow_digest(path: Path) -> str:
    """SHA-256 of the workflow file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_digest(spec: TaskSpec) -> str:
    """SHA-256 of what decides a task's outputs: command, inputs, outputs, environment (and
    its pre and post scripts, which may write its inputs and outputs)."""
    what: list[object] = [
        spec.command, list(spec.inputs), list(spec.outputs), sorted(spec.env.items())
    ]  # fmt: skip
    if spec.noop:  # its command never ran: the same task without noop must run (and v.v.)
        what.append("noop")
    if spec.pre is not None or spec.post is not None:  # only then: older digests stay valid
        what.append([spec.pre, spec.post, spec.script_dir, spec.pre_skip])
    return hashlib.sha256(json.dumps(what, separators=(",", ":")).encode()).hexdigest()


# -- writing --------------------------------------------------------------------------------


class JournalWriter:
    """Appends one line per state change that a resume needs; see the module docstring."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._synced = time.monotonic()

    @classmethod
    def start(
        cls,
        path: Path,
        *,
        job: str,
        workflow: str,
        digest: str,
        started: float,
        lease_s: float,
        carried: Iterable[DoneRecord] = (),
        local: bool = False,
    ) -> JournalWriter:
        """A new journal at `path` (the old one becomes `.journal.1`), ready to append to."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "t": "job",
            "v": JOURNAL_VERSION,
            "job": job,
            "workflow": workflow,
            "workflow_digest": digest,
            "started": started,
            "lease_s": lease_s,
            "local": local,
        }
        lines = [_line(header), *(_line(_done_fields(r)) for r in carried)]
        # Written aside and renamed: a crash here leaves the old journal whole.
        scratch = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        with open(scratch, "wb") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".1"))
        os.replace(scratch, path)
        return cls(path, os.open(path, os.O_WRONLY | os.O_APPEND))

    def done(self, record: DoneRecord) -> None:
        self._append(_done_fields(record))

    def failed(self, task: str, error: str, attempts: int) -> None:
        self._append({"t": "failed", "task": task, "error": error, "attempts": attempts})

    def end(self, status: str, reason: str) -> None:
        self._append({"t": "end", "status": status, "reason": reason}, sync=True)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as err:
                log.error("journal %s: %s", self.path, err)
            os.close(fd)

    def _append(self, fields: Mapping[str, Any], sync: bool = False) -> None:
        if self._fd is None:
            return
        data = _line(fields)
        try:
            written = os.write(self._fd, data)  # one syscall: a kill leaves it whole or torn
            if written != len(data):
                os.write(self._fd, data[written:])
            now = time.monotonic()
            if sync or now - self._synced >= FSYNC_S:
                os.fsync(self._fd)
                self._synced = now
        except OSError as err:
            # The job goes on: a journal that stops here only means more reruns on --resume.
            log.error(
                "journal %s: %s; stopped writing it (--resume reruns what follows)", self.path, err
            )
            self.close()


def _line(fields: Mapping[str, Any]) -> bytes:
    return (json.dumps(fields, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _done_fields(record: DoneRecord) -> dict[str, Any]:
    return {
        "t": "done",
        "task": record.task,
        "spec": record.spec,
        "inputs": [[p, r.digest, r.size] for p, r in record.inputs],
        "outputs": [[p, r.digest, r.size] for p, r in record.outputs],
        "peer": record.peer,
        "attempts": record.attempts,
    }


# -- reading --------------------------------------------------------------------------------


def read_journal(path: Path) -> JournalState:
    """The journal at `path`; a torn or unreadable line is skipped (its task runs again)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no journal at {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read the journal {path}: {err}") from None
    lines = data.split(b"\n")
    skipped = 1 if lines[-1].strip() else 0  # no newline after it: cut by a kill mid-write
    records: list[dict[str, Any]] = []
    for raw in lines[:-1]:
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("t"), str):
            records.append(value)
        elif raw.strip():
            skipped += 1
    if not records or records[0]["t"] != "job":
        raise ConfigError(
            f"{path} is not a bgrid journal (no job line at its top): remove it and run "
            "without --resume"
        )
    head = records[0]
    if head.get("v") != JOURNAL_VERSION:
        raise ConfigError(
            f"{path} was written by another bgrid (journal version {head.get('v')!r}, this one "
            f"reads {JOURNAL_VERSION}): run without --resume"
        )
    try:
        job, workflow, digest = (_text(head, k) for k in ("job", "workflow", "workflow_digest"))
        started, lease_s = _number(head, "started"), _number(head, "lease_s")
    except ValueError as err:
        raise ConfigError(
            f"{path}: its job line is damaged ({err}): run without --resume"
        ) from None
    done: dict[str, DoneRecord] = {}
    failed: dict[str, str] = {}
    end: tuple[str, str] | None = None
    for record in records[1:]:
        try:
            match record["t"]:
                case "done":
                    entry = _read_done(record)
                    done[entry.task] = entry
                    failed.pop(entry.task, None)
                case "failed":
                    failed[_text(record, "task")] = _text(record, "error", empty=True)
                case "end":
                    end = (_text(record, "status"), _text(record, "reason", empty=True))
                case _:
                    raise ValueError(f"unknown line type {record['t']!r}")
        except ValueError as err:
            log.warning("%s: skipping a damaged line: %s", path, err)
            skipped += 1
    local = head.get("local") is True  # absent in journals of older runs: a grid's
    return JournalState(job, workflow, digest, started, lease_s, done, failed, end, skipped, local)


def _text(record: Mapping[str, Any], key: str, empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise ValueError(f"{key!r} is not a text")
    return value


def _number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key!r} is not a number >= 0")
    return float(value)


def _refs(value: Any, key: str) -> Refs:
    if not isinstance(value, list):
        raise ValueError(f"{key!r} is not a list")
    refs = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
            or not is_digest(item[1])
            or isinstance(item[2], bool)
            or not isinstance(item[2], int)
            or item[2] < 0
        ):
            raise ValueError(f"an entry of {key!r} is not [path, sha256, size]")
        refs.append((item[0], FileRef(item[1], item[2])))
    return tuple(refs)


def _read_done(record: Mapping[str, Any]) -> DoneRecord:
    peer = record.get("peer")
    attempts = record.get("attempts")
    if peer is not None and not isinstance(peer, str):
        raise ValueError("'peer' is not a text")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError("'attempts' is not a count")
    return DoneRecord(
        task=_text(record, "task"),
        spec=_text(record, "spec"),
        inputs=_refs(record.get("inputs"), "inputs"),
        outputs=_refs(record.get("outputs"), "outputs"),
        peer=peer,
        attempts=attempts,
    )


# -- resuming -------------------------------------------------------------------------------


def plan_resume(
    workflow: Workflow,
    workflow_file: Path | None,
    url_refs: Mapping[str, FileRef] | None = None,
    *,
    local: bool = False,
    digest: str | None = None,
) -> ResumePlan:
    """Read this workflow's journal and check every task it says is done (re-hashing files).

    `workflow_file`: None for a workflow built in memory, whose `digest` (of its canonical
    form) then stands for the file's. `url_refs`: the contents of the workflow's URL inputs
    as staged now; without them, a task reading a URL runs again. `local`: this run is on a
    new local grid, whose workers' caches hold nothing of an earlier run."""
    path = journal_path(workflow)
    if not path.exists():
        how = "it without resume=True"  # the Python API's words
        if workflow_file is not None:
            how = f"`bgrid submit {workflow_file}` without --resume"
        raise ConfigError(
            f"no journal of workflow {workflow.name!r} in {path.parent}: there is nothing to "
            f"resume; run {how}"
        )
    state = read_journal(path)
    sources: dict[str, FileRef] = {}
    hashed: dict[str, FileRef | None] = {}  # submit-directory files hashed so far
    digests = DigestCache(workflow.root / DIGESTS_FILE)  # unchanged files are not read again

    def on_disk(rel: str) -> FileRef | None:
        if rel in workflow.urls:
            return (url_refs or {}).get(rel)
        if rel not in hashed:
            try:
                hashed[rel] = digests.hash(workflow.root / rel)
            except OSError:  # missing, a directory, unreadable: not the bytes we recorded
                hashed[rel] = None
        return hashed[rel]

    kept: dict[str, DoneRecord] = {}
    rerun: dict[str, str] = {}
    order = workflow.topological_order()
    read = {path for spec in workflow.tasks.values() for path in spec.inputs}
    for name in order:
        record = state.done.get(name)
        if record is None:
            continue
        if workflow.tasks[name].final:
            rerun[name] = "a final task runs again on every submit, once the others ended"
            continue
        why = _why_not_kept(workflow, workflow.tasks[name], record, kept, on_disk, sources, read)
        if why is None:
            kept[name] = record
        else:
            rerun[name] = why
    if state.local:
        gone = "a worker of the earlier run's local grid, gone with it"
        _drop_lost_intermediates(workflow, kept, rerun, on_disk, gone, order)
    elif local:
        gone = "which this run's local grid does not include"
        _drop_lost_intermediates(workflow, kept, rerun, on_disk, gone, order)
    digests.save()
    if digest is None:
        assert workflow_file is not None, "a workflow built in memory has no file to hash"
        digest = workflow_digest(workflow_file)
    changed = digest != state.workflow_digest
    return ResumePlan(state, kept, rerun, sources, changed)


def _drop_lost_intermediates(
    workflow: Workflow,
    kept: dict[str, DoneRecord],
    rerun: dict[str, str],
    on_disk: Any,
    gone: str,
    order: list[str],
) -> None:
    """Run again each kept task whose output, gone with the earlier run's peers, a task
    that runs again needs; and the kept tasks after it. Until nothing changes: a task that
    runs again may need another lost output."""
    readers: dict[str, list[str]] = {}
    for name in order:
        for path in workflow.tasks[name].inputs:
            readers.setdefault(path, []).append(name)
    lost = {
        path: name
        for name, record in kept.items()
        for path, _ in record.outputs
        if path in readers and on_disk(path) is None
    }
    changed = True
    while changed:
        changed = False
        for path, producer in lost.items():
            needy = next((r for r in readers[path] if r not in kept), None)
            if producer not in kept or needy is None:
                continue
            peer = kept.pop(producer).peer or "a peer"
            rerun[producer] = (
                f"its output {path}, which {needy} needs, was only in the cache of {peer}, {gone}"
            )
            changed = True
        for name in order if changed else ():
            pred = next((p for p in workflow.graph.predecessors(name) if p not in kept), None)
            if name in kept and pred is not None:
                del kept[name]
                rerun[name] = f"it comes after {pred}, which runs again"


def _why_not_kept(
    workflow: Workflow,
    spec: TaskSpec,
    record: DoneRecord,
    kept: Mapping[str, DoneRecord],
    on_disk: Any,
    sources: dict[str, FileRef],
    read: set[str],
) -> str | None:
    if record.spec != task_digest(spec):
        return "its command, files or environment changed since it ran"
    for pred in sorted(workflow.graph.predecessors(spec.name)):
        if pred not in kept:
            return f"it comes after {pred}, which runs again"
    recorded_inputs = dict(record.inputs)
    for path in spec.inputs:
        producer = workflow.producer.get(path)
        if producer is not None:
            now = dict(kept[producer].outputs).get(path)
        else:
            now = on_disk(path)
            if now is not None:
                sources[path] = now
        if now is None or recorded_inputs.get(path) != now:
            return f"its input {path} changed since it ran"
    recorded_outputs = dict(record.outputs)
    if set(recorded_outputs) != set(spec.outputs):
        return "its outputs are not the ones recorded"
    for path in spec.outputs:
        now = on_disk(path)
        if now is None and path in read:
            # An intermediate stays on the peer that made it: the resumed coordinator asks
            # its peers' caches for it, and makes it again if none holds it any more.
            continue
        if now is None:
            return f"its output {path} is missing"
        if now != recorded_outputs[path]:
            return f"its output {path} changed since it ran (digest)"
    return None
