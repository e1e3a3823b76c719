"""From HTCondor's job event log to BonjourGrid's task events.

DAGMan writes every node job's events into one log (`bgrid.dag.nodes.log`). The reader is a
small state machine fed with `htcondor2.JobEvent`s, IO-free so it is tested on real event-log
text; `EventLogTail` reads new events from the file as they are appended.

Which task a cluster runs comes from its submit event: DAGMan puts `DAG Node: NAME` in the
submit notes. A plain submit (no DAGMan) is recognised by the `BgridTask`/`BgridAttempt`
attributes that `job_ad_information_attrs` writes into the log.

  submit (000)                      -> the cluster runs task T, attempt base+k (k-th submit)
  execute (001)                     -> TaskStarted
  terminated (005), normal, 0       -> TaskFinished
  terminated (005), non-zero/signal -> TaskFailed (exit_code / the signal)
  held (012)                        -> TaskFailed (the hold reason; the job is removed)
  aborted (009)                     -> TaskFailed, unless already reported or cancelled
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import htcondor2
from htcondor2 import JobEventType

from bonjourgrid.backends.base import TaskEvent, TaskFailed, TaskFinished, TaskStarted

_DAG_NODE = re.compile(r"DAG Node:\s*(\S+)")
_SINSFUL_HOST = re.compile(r"<\[?([^\]>:?]+)\]?(?::\d+)?")


@dataclass
class _Cluster:
    task: str
    attempt: int
    peer: str = ""
    started_at: int | None = None
    settled: bool = False


class EventLogReader:
    """Turns job events into task events. `first_attempt` is each task's attempt number in
    the plan (DAGMan retries count up from it); `peers_by_address` names the execute hosts."""

    def __init__(
        self,
        first_attempt: Mapping[str, int] | None = None,
        peers_by_address: Mapping[str, str] | None = None,
    ) -> None:
        self._first_attempt = dict(first_attempt or {})
        self._peers = dict(peers_by_address or {})
        self._submits: dict[str, int] = {}  # task -> submits seen
        self._clusters: dict[tuple[int, int], _Cluster] = {}
        self._cancelled: set[tuple[str, int]] = set()

    def cancelled(self, task: str, attempt: int) -> None:
        """No event is owed for this run any more."""
        self._cancelled.add((task, attempt))

    def task_of(self, cluster: int, proc: int = 0) -> tuple[str, int] | None:
        known = self._clusters.get((cluster, proc))
        return None if known is None else (known.task, known.attempt)

    def feed(self, event: Any) -> list[TaskEvent]:
        """The task events one job event means (often none)."""
        key = (event.cluster, event.proc)
        kind = event.type
        if kind == JobEventType.SUBMIT:
            self._on_submit(key, event)
            return []
        if kind == JobEventType.JOB_AD_INFORMATION:
            self._on_ad_information(key, event)
            return []
        run = self._clusters.get(key)
        if run is None or run.settled:
            return []
        if kind == JobEventType.EXECUTE:
            return self._on_execute(run, event)
        if kind == JobEventType.JOB_TERMINATED:
            return self._settle(run, self._terminated(run, event))
        if kind == JobEventType.JOB_HELD:
            reason = str(event.get("HoldReason", "no reason given"))
            code = event.get("HoldReasonCode", "?")
            subcode = event.get("HoldReasonSubCode", "?")
            why = f"held by HTCondor: {reason} (code {code}, subcode {subcode})"
            return self._settle(run, self._failed(run, why))
        if kind == JobEventType.JOB_ABORTED:
            reason = str(event.get("Reason", "") or "removed")
            return self._settle(run, self._failed(run, f"removed from the queue: {reason}"))
        return []

    # -- the events -------------------------------------------------------------------------

    def _on_submit(self, key: tuple[int, int], event: Any) -> None:
        task = _node_name(event)
        if task is None or key in self._clusters:
            return
        k = self._submits.get(task, 0)
        self._submits[task] = k + 1
        self._clusters[key] = _Cluster(task, self._first_attempt.get(task, 1) + k)

    def _on_ad_information(self, key: tuple[int, int], event: Any) -> None:
        task = event.get("BgridTask")
        if key in self._clusters or not isinstance(task, str):
            return
        attempt = event.get("BgridAttempt")
        self._clusters[key] = _Cluster(task, attempt if isinstance(attempt, int) else 1)

    def _on_execute(self, run: _Cluster, event: Any) -> list[TaskEvent]:
        if run.started_at is not None:
            return []  # restarted after an eviction: still the same run
        run.peer = self._peer_of(str(event.get("ExecuteHost", "")))
        run.started_at = event.timestamp
        return [TaskStarted(run.task, run.attempt, run.peer)]

    def _terminated(self, run: _Cluster, event: Any) -> TaskEvent:
        run_s = float(event.timestamp - run.started_at) if run.started_at is not None else 0.0
        if event.get("TerminatedNormally"):
            code = int(event.get("ReturnValue", -1))
            if code == 0:
                return TaskFinished(run.task, run.attempt, run.peer, run_s=run_s)
            return TaskFailed(run.task, run.attempt, run.peer, f"exited {code}", exit_code=code)
        signal = event.get("TerminatedBySignal", "?")
        return self._failed(run, f"killed by signal {signal}")

    def _failed(self, run: _Cluster, reason: str) -> TaskFailed:
        return TaskFailed(run.task, run.attempt, run.peer, reason)

    def _settle(self, run: _Cluster, outcome: TaskEvent) -> list[TaskEvent]:
        run.settled = True
        if (run.task, run.attempt) in self._cancelled:
            return []
        return [outcome]

    def _peer_of(self, sinful: str) -> str:
        """The peer behind an address like `<10.77.0.2:9618?addrs=...>`; the host itself for
        machines we did not recruit (an existing pool)."""
        match = _SINSFUL_HOST.match(sinful)
        host = match.group(1) if match else sinful
        return self._peers.get(host, host)


def _node_name(event: Any) -> str | None:
    notes = event.get("StructuredNotes")
    if notes is not None and isinstance(notes.get("DAGNodeName"), str):
        return str(notes["DAGNodeName"])
    match = _DAG_NODE.search(str(event.get("LogNotes", "")))
    return match.group(1) if match else None


class EventLogTail:
    """New events of a job event log, read without blocking: the file may not exist yet,
    and it grows while DAGMan runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._log: htcondor2.JobEventLog | None = None

    def read_new(self) -> list[Any]:
        if self._log is None:
            if not self.path.exists():
                return []
            self._log = htcondor2.JobEventLog(str(self.path))
        return list(self._log.events(stop_after=0))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
