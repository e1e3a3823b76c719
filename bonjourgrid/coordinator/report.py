"""The job report (DESIGN.md): what ran where, when, how often, and the bytes it moved.

Built from a `ReportInputs` record that the coordinator assembles once the job is over:
the report reads nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.journal import ResumePlan
from bonjourgrid.coordinator.logs import LogKeeper
from bonjourgrid.dag import Workflow
from bonjourgrid.discovery.txt import PeerRecord


@dataclass(frozen=True)
class ReportInputs:
    """What the report is made of, as the job ended."""

    job: str
    workflow: Workflow
    finished: core.Finished | None  # None: interrupted before the core finished
    started_at: float  # wall-clock time the job started
    tasks: Mapping[str, core.TaskState]
    story: Callable[[str], list[tuple[float, str]]]  # why a task ran where it ran
    logs: LogKeeper  # the attempts' kept stdout and stderr
    peers: tuple[PeerRecord, ...]  # every peer the job held
    bytes: Mapping[str, int]
    prefetch: str  # the data policy
    journal: Path | None
    resume: ResumePlan | None
    # speculative copies made, per task: (peer, attempt, why) (core.copies_made)
    copies: Mapping[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    # tasks under quorum: their votes (core.quorum_votes); peers outvoted, and how often
    quorum: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    outvoted: Mapping[str, int] = field(default_factory=dict)
    distrusted: tuple[str, ...] = ()  # outvoted too often: no more runs for the job


def build_report(inputs: ReportInputs) -> dict[str, Any]:
    finished, started_at = inputs.finished, inputs.started_at
    tasks: dict[str, dict[str, Any]] = {}
    for name, task in inputs.tasks.items():
        tasks[name] = {
            "status": task.status.value,
            "peer": task.peer,
            "start": _round(task.start),
            "end": _round(task.end),
            "attempts": task.attempts,
            "exit_code": task.exit_code,
            "fetch_s": _round(task.fetch_s),
            "run_s": _round(task.run_s),
            "bytes_fetched": task.bytes_fetched,
        }
        if task.resumed:
            tasks[name]["resumed"] = True  # done in an earlier run; its outputs were intact
        if task.rerun:
            tasks[name]["rerun"] = task.rerun  # it ran again after it was done: why
        if task.error:
            tasks[name]["error"] = task.error
        if task.status is core.TaskStatus.FAILED:
            tasks[name]["stderr_tail"] = task.stderr_tail
        story = inputs.story(name)
        suspensions = suspension_facts(story)
        if suspensions:
            tasks[name].update(suspensions)  # its owner came back while it ran: paused
        history = attempt_history(story)
        kept_logs = inputs.logs.kept.get(name, {})
        for entry in history:  # an attempt that ended badly: where its logs are, if it sent any
            attempt_logs = kept_logs.get(entry.get("attempt", 0))
            if attempt_logs is not None:
                entry["logs"] = attempt_logs.as_json()
        if history:
            tasks[name]["history"] = history
        logs = inputs.logs.report(name)
        if logs is not None:
            tasks[name]["logs"] = logs  # where its stdout and stderr are kept (logs.py)
        copies = inputs.copies.get(name)
        if copies:  # why copies were made, and which run won (the task's peer and attempt)
            tasks[name]["copies"] = [
                {"peer": peer, "attempt": attempt, "why": why} for peer, attempt, why in copies
            ]
            if task.status is core.TaskStatus.DONE and name not in inputs.quorum:
                won = "a copy" if task.attempts in {a for _, a, _ in copies} else "the first run"
                tasks[name]["won"] = (
                    f"{won}: attempt {task.attempts} on {task.peer}, first to exit 0"
                )
        if name in inputs.quorum:  # each run's peer and output digests, and what was accepted
            tasks[name]["quorum"] = dict(inputs.quorum[name])
        scripts = inputs.logs.scripts.get(name)
        if scripts:
            tasks[name]["scripts"] = scripts  # its pre/post scripts' exit codes and logs
    ends = [t.end for t in inputs.tasks.values() if t.end is not None]
    report: dict[str, Any] = {
        "job": inputs.job,
        "workflow": inputs.workflow.name,
        "status": finished.status if finished is not None else "failed",
        "reason": finished.reason if finished is not None else "interrupted",
        "started_at": round(started_at, 3),
        "makespan_s": _round(max(ends) if ends else 0.0),
        "tasks": tasks,
        # [parent, child]: child needs parent (a file it reads, or `after`).
        "edges": [[u, v] for u, v in inputs.workflow.graph.edges],
        "peers": [
            {"name": p.name, "cpus": p.cpus, "ram": p.ram, "cost": p.cost} for p in inputs.peers
        ],
        "bytes": dict(inputs.bytes),
        # Summed over tasks: time spent waiting for input data on the peer (fetch_s) and
        # running the command (run_s). Prefetching turns the first into the second's shadow.
        "time": {
            "data_wait_s": _round(sum(t.fetch_s for t in inputs.tasks.values())),
            "compute_s": _round(sum(t.run_s for t in inputs.tasks.values())),
        },
        "prefetch": inputs.prefetch,
    }
    if inputs.outvoted:  # peers whose outputs a quorum's majority did not share
        report["outvoted"] = dict(inputs.outvoted)
        report["distrusted"] = list(inputs.distrusted)
    # what `bgrid submit` exits with: 0 succeeded, 1 failed, or an abort_on task's status
    report["exit_status"] = finished.exit_code() if finished is not None else 1
    if finished is not None and finished.aborted_by:
        aborter = inputs.tasks[finished.aborted_by]
        report["aborted"] = {
            "task": finished.aborted_by,
            "exit_code": aborter.exit_code,
            "exit_status": finished.exit_status,
        }
    if inputs.journal is not None:
        report["journal"] = str(inputs.journal)
    plan = inputs.resume
    if plan is not None:
        report["resumed_from"] = {
            "job": plan.journal.job,
            "kept": len(plan.kept),
            "rerun": dict(plan.rerun),  # recorded done, run again: why
            "workflow_changed": plan.workflow_changed,
        }
    return report


def write_report(path: Path, report: dict[str, Any]) -> None:
    """`--report FILE`: a page to look at when FILE ends in .html (or .htm), JSON otherwise."""
    if path.suffix.lower() in (".html", ".htm"):
        from bonjourgrid.coordinator.html_report import render_html

        path.write_text(render_html(report), encoding="utf-8")
    else:
        # Streamed: the text of a 100,000-task report is never whole in memory (with indent,
        # json.dumps joins millions of small pieces: 7x the report's size at its peak).
        with path.open("w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
            out.write("\n")


def format_summary(report: dict[str, Any]) -> str:
    """What `bgrid submit` prints when it ends (without --json)."""
    tasks = report["tasks"]
    done = sum(1 for t in tasks.values() if t["status"] == "done")
    kept = sum(1 for t in tasks.values() if t.get("resumed"))
    lines = [
        f"job {report['job']}: {report['status']} - {report['reason']}",
        f"  {done}/{len(tasks)} tasks done"
        + (f" ({kept} kept from an earlier run)" if kept else "")
        + f" in {report['makespan_s']:.2f} s "
        + (
            f"on {len(report['peers'])} peer(s): " + ", ".join(p["name"] for p in report["peers"])
            if report["peers"]
            else "on no peer"
        ),
    ]
    for name, task in sorted(tasks.items()):
        if task["status"] == "failed":
            lines.append(
                f"  task {name} failed on {task['peer']} after {task['attempts']} "
                f"attempt(s): {task.get('error', '')}"
            )
            tail = task.get("stderr_tail", "").strip()
            if tail:
                lines += ["    | " + line for line in tail.splitlines()[-10:]]
    return "\n".join(lines)


def suspension_facts(story: list[tuple[float, str]]) -> dict[str, Any]:
    """How often a task was suspended (its peer's owner came back) and for how long in all,
    from its story: `{"suspensions": n, "suspended_s": seconds}`, {} if never. A spell ends
    when it resumed, or at the next step of the story (vacated: its peer lost)."""
    count, total = 0, 0.0
    since: float | None = None
    for now, what in story:
        if since is not None:
            total += now - since
            since = None
        if what.startswith(core.SUSPENDED_NOTE):
            count += 1
            since = now
    if not count:
        return {}
    return {"suspensions": count, "suspended_s": round(total, 3)}


def attempt_history(story: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """The attempts of a task that did not end well (failed, peer lost, preempted), from its
    story, oldest first: `{"t": when it ended, "what": why}`, plus `"peer"`, `"attempt"` and
    `"start"` (seconds since the job started) when the story says where it was placed. An
    attempt that its post script decides ends with the post's verdict (a failure only)."""
    history: list[dict[str, Any]] = []
    placed: re.Match[str] | None = None
    started = 0.0
    deciding = False  # its post runs: the next step of the story is the post's verdict
    for now, what in story:
        verdict, deciding = deciding, what.endswith(_POST_DECIDES)
        if " -> running: " in what:
            placed, started = _PLACED.search(what), now
        elif deciding:
            continue  # not over yet
        elif (verdict and not what.startswith("waiting -> done")) or (
            what.startswith(("running -> ", "collecting -> ")) and not what.startswith(_WENT_WELL)
        ):
            entry: dict[str, Any] = {"t": round(now, 3), "what": what}
            if placed is not None:
                entry.update(
                    peer=placed["peer"], attempt=int(placed["attempt"]), start=round(started, 3)
                )
            history.append(entry)
    return history


_WENT_WELL = ("running -> done", "running -> collecting", "collecting -> done")
_POST_DECIDES = "its post script decides"  # core.py's words when an attempt's post starts
_PLACED = re.compile(r"placed on (?P<peer>.+) \(attempt (?P<attempt>\d+)\)$")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
