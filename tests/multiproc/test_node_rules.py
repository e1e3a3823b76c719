"""Node semantics as a user sees them: one `bgrid submit --local N` per workflow key
(priority, category caps, abort_on, final, noop, retry_unless_exit), checked in the report,
the exit status and the files, never by timing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.dag import load_workflow
from bonjourgrid.errors import ConfigError
from bonjourgrid.keys import INSECURE_FINGERPRINT
from tests.fake_middleware import FakeDagMiddleware
from tests.multiproc.conftest import Grid, write_workflow


def run_local(grid: Grid, workflow: Path, workers: int, *flags: str) -> tuple[int, dict[str, Any]]:
    """`bgrid submit WORKFLOW --local N`: its exit status and its report."""
    report_file = workflow.parent / "report.json"
    report_file.unlink(missing_ok=True)
    out = grid.run(
        "submit", str(workflow), "--local", str(workers), "--report", str(report_file), *flags,
        timeout=120,
    )  # fmt: skip
    assert report_file.exists(), out.stderr
    return out.returncode, json.loads(report_file.read_text())


def by_start(report: dict[str, Any], names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (report["tasks"][n]["start"], n))


PRIORITY = """
name: priority
categories: {one-at-a-time: {max_running: 1}}
defaults: {category: one-at-a-time}
tasks:
  low:    {command: "true", priority: -3}
  plain:  {command: "true"}
  high:   {command: "true", priority: 10}
  middle: {command: "true", priority: 4}
"""


def test_ready_tasks_start_by_priority(tmp_path: Path, grid: Grid) -> None:
    # one slot (a category of one: the local workers' cpus depend on the machine)
    code, report = run_local(grid, write_workflow(tmp_path / "p", PRIORITY), 1)
    assert code == 0, report["reason"]
    assert by_start(report, list(report["tasks"])) == ["high", "middle", "plain", "low"]


CATEGORY = """
name: category
categories: {db: {max_running: 1}}
tasks:
""" + "".join(
    f'  load{i}: {{command: "sleep 0.3", category: db}}\n  other{i}: {{command: "sleep 0.3"}}\n'
    for i in range(4)
)


@pytest.mark.slow
def test_a_category_of_one_never_runs_two_of_its_tasks_at_once(tmp_path: Path, grid: Grid) -> None:
    code, report = run_local(grid, write_workflow(tmp_path / "c", CATEGORY), 2)
    assert code == 0, report["reason"]
    loads = by_start(report, [f"load{i}" for i in range(4)])
    spans = [(report["tasks"][n]["start"], report["tasks"][n]["end"]) for n in loads]
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two db tasks overlap: {spans}"


ABORT = """
name: abort
tasks:
  check:  {command: "exit 3", abort_on: {exit: 3, status: 7}, retries: 2}
  slow:   {command: "sleep 60"}
  later:  {command: "true", after: [check]}
"""


def test_abort_on_stops_the_job_and_submit_exits_with_its_status(
    tmp_path: Path, grid: Grid
) -> None:
    code, report = run_local(grid, write_workflow(tmp_path / "a", ABORT), 2)
    assert code == 7
    assert report["status"] == "aborted" and report["exit_status"] == 7
    assert report["aborted"] == {"task": "check", "exit_code": 3, "exit_status": 7}
    assert report["reason"].startswith("task check exited 3, which aborts the job")
    tasks = report["tasks"]
    assert tasks["check"]["status"] == "failed" and tasks["check"]["attempts"] == 1
    assert tasks["slow"]["status"] == "failed"
    assert tasks["slow"]["error"] == "stopped: the job was aborted by check"
    assert tasks["later"]["status"] == "skipped"


FINAL = """
name: final
tasks:
  fails:   {command: "exit 1"}
  needs:   {command: "true", inputs: [x.txt]}
  makes:   {command: "echo x > x.txt; exit 1", outputs: [x.txt]}
  works:   {command: "echo ok > ok.txt", outputs: [ok.txt]}
  summary:
    final: true
    command: 'echo "status=$BGRID_DAG_STATUS failed=$BGRID_FAILED_COUNT" > summary.txt'
    outputs: [summary.txt]
"""


def test_the_final_task_runs_after_a_failure_and_decides_the_job(
    tmp_path: Path, grid: Grid
) -> None:
    workflow = write_workflow(tmp_path / "f", FINAL)
    code, report = run_local(grid, workflow, 2)
    tasks = report["tasks"]
    assert tasks["fails"]["status"] == tasks["makes"]["status"] == "failed"
    assert tasks["needs"]["status"] == "skipped"
    assert (workflow.parent / "summary.txt").read_text() == "status=1 failed=2\n"
    others_end = max(t["end"] for n, t in tasks.items() if n != "summary" and t["end"])
    assert tasks["summary"]["start"] >= others_end
    # as DAGMan's FINAL node: its success is the job's, whatever came before
    assert code == 0 and report["status"] == "succeeded"
    assert report["reason"].startswith("final task summary succeeded after: 2 task(s) failed")
    # a resume keeps what is done but runs the final task again, once the others ended
    (workflow.parent / "summary.txt").unlink()
    code, report = run_local(grid, workflow, 2, "--resume")
    assert report["resumed_from"]["kept"] == 1  # works
    assert "final task" in report["resumed_from"]["rerun"]["summary"]
    assert report["tasks"]["summary"]["attempts"] == 1
    assert (workflow.parent / "summary.txt").read_text() == "status=1 failed=2\n"


NOOP = """
name: noop
tasks:
  first: {command: "echo one > one.txt", outputs: [one.txt]}
  gate:  {noop: true, after: [first]}
  then:  {command: "cat one.txt > two.txt", inputs: [one.txt], outputs: [two.txt], after: [gate]}
"""


def test_a_noop_task_is_done_without_running_and_its_dependents_follow(
    tmp_path: Path, grid: Grid
) -> None:
    workflow = write_workflow(tmp_path / "n", NOOP)
    code, report = run_local(grid, workflow, 2)
    assert code == 0, report["reason"]
    gate = report["tasks"]["gate"]
    assert gate["status"] == "done" and gate["attempts"] == 0 and gate["peer"] is None
    assert (workflow.parent / "two.txt").read_text() == "one\n"
    assert "logs" not in gate  # nothing ran, nothing was logged
    # the journal vouches for it like any done task: a resume keeps all three
    code, report = run_local(grid, workflow, 2, "--resume")
    assert code == 0 and report["resumed_from"]["kept"] == 3


UNLESS = """
name: unless
tasks:
  flaky:  {command: "exit 5", retries: 3, retry_unless_exit: 5}
"""


def test_retry_unless_exit_gives_up_at_once(tmp_path: Path, grid: Grid) -> None:
    code, report = run_local(grid, write_workflow(tmp_path / "u", UNLESS), 1)
    assert code == 1
    assert report["tasks"]["flaky"]["attempts"] == 1  # three retries left, none used


def test_a_middleware_that_places_the_runs_refuses_node_rules(tmp_path: Path) -> None:
    workflow = load_workflow(write_workflow(tmp_path / "m", NOOP))
    needs = needs_from(workflow, INSECURE_FINGERPRINT, None, None, (1, 1))
    with pytest.raises(ConfigError, match=r"places the runs itself.*task 'gate' sets some"):
        Coordinator(workflow, needs, None, backend=FakeDagMiddleware)
