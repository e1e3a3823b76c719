"""The coordinator drives a middleware that holds the DAG's edges (as HTCondor's DAGMan
does), on real worker daemons over 127.0.0.1: the DAG goes to it whole, the core follows its
news, the journal and the report stay right, and `--resume` hands it only what is left.

The middleware is `FakeDagMiddleware` (tests/fake_middleware.py), a named stand-in for
DAGMan, which cannot run on this machine."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.coordinator.journal import plan_resume, workflow_digest
from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.coordinator.submit import admission
from bonjourgrid.dag import Workflow, load_workflow, workflow_from_mapping
from bonjourgrid.errors import ConfigError
from bonjourgrid.worker.local import LocalGrid
from tests.fake_middleware import FakeDagMiddleware
from tests.multiproc.conftest import LOOPBACK
from tests.waiting import async_wait_until

pytestmark = pytest.mark.timeout(120)

# Each command notes that it ran in ran.log: what a user would check for "it did not run".
DIAMOND = {
    "name": "diamond",
    "tasks": {
        "a": {"command": "echo a >> ran.log; echo A > a.txt", "outputs": ["a.txt"]},
        "b": {
            "command": "echo b >> ran.log; cat a.txt > b.txt; echo B >> b.txt",
            "inputs": ["a.txt"],
            "outputs": ["b.txt"],
        },
        # Fails its first attempt; its one retry succeeds.
        "c": {
            "command": "echo c >> ran.log; if [ ! -e c.tried ]; then touch c.tried; exit 4; fi;"
            " cat a.txt > c.txt; echo C >> c.txt",
            "inputs": ["a.txt"],
            "outputs": ["c.txt"],
            "retries": 1,
        },
        "d": {
            "command": "echo d >> ran.log; cat b.txt c.txt > d.txt",
            "inputs": ["b.txt", "c.txt"],
            "outputs": ["d.txt"],
        },
    },
}


def on_fake_dagman(
    cluster: LocalGrid, workflow: Workflow, path: Path, resume: bool = False
) -> Coordinator:
    """A coordinator for `workflow` on `cluster`'s workers, the fake DAGMan running it."""
    workers = len(cluster.names)
    needs = needs_from(
        workflow, cluster.grid.fingerprint, None, None, (workers, workers),
        admission(cluster.grid),
    )  # fmt: skip
    return Coordinator(
        workflow,
        needs,
        cluster.grid,
        interface=LOOPBACK,
        expected_peers=workers,
        resume=plan_resume(workflow, path, local=True) if resume else None,
        workflow_digest=workflow_digest(path),
        backend=FakeDagMiddleware,
    )


def run(work: Path, spec: dict[str, Any], resume: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Run the workflow through the coordinator on the fake DAGMan: the report, and the
    names of the two workers."""
    path = work / "wf.json"
    path.write_text(json.dumps(spec))
    workflow = load_workflow(path)
    with LocalGrid(2, cpus_each=1) as cluster:
        coordinator = on_fake_dagman(cluster, workflow, path, resume)
        return asyncio.run(coordinator.run()), cluster.names


def ran(work: Path) -> list[str]:
    return (work / "ran.log").read_text().split()


def test_a_diamond_with_files_and_a_retry_runs_on_the_middleware(tmp_path: Path) -> None:
    report, workers = run(tmp_path, DIAMOND)
    assert report["status"] == "succeeded", report
    assert (tmp_path / "d.txt").read_text() == "A\nB\nA\nC\n"
    tasks = report["tasks"]
    assert {name: t["attempts"] for name, t in tasks.items()} == {"a": 1, "b": 1, "c": 2, "d": 1}
    assert all(t["peer"] in workers for t in tasks.values()), tasks
    assert sorted(ran(tmp_path)) == ["a", "b", "c", "c", "d"]
    assert ran(tmp_path)[0] == "a" and ran(tmp_path)[-1] == "d"  # the edges held


def test_a_task_out_of_retries_fails_its_descendants_are_skipped_and_a_branch_finishes(
    tmp_path: Path,
) -> None:
    spec = {
        "name": "branches",
        "tasks": {
            "bad": {"command": "echo bad >> ran.log; exit 3", "outputs": ["bad.txt"]},
            "after_bad": {
                "command": "echo after_bad >> ran.log; cp bad.txt after.txt",
                "inputs": ["bad.txt"],
                "outputs": ["after.txt"],
            },
            "good": {"command": "echo good >> ran.log; echo G > g.txt", "outputs": ["g.txt"]},
            "good2": {
                "command": "echo good2 >> ran.log; cat g.txt g.txt > g2.txt",
                "inputs": ["g.txt"],
                "outputs": ["g2.txt"],
            },
        },
    }
    report, _ = run(tmp_path, spec)
    assert report["status"] == "failed"
    tasks = report["tasks"]
    assert tasks["bad"]["status"] == "failed" and tasks["bad"]["attempts"] == 1
    assert tasks["bad"]["exit_code"] == 3
    assert tasks["after_bad"]["status"] == "skipped"
    assert tasks["good2"]["status"] == "done"
    assert (tmp_path / "g2.txt").read_text() == "G\nG\n"
    assert "after_bad" not in ran(tmp_path)  # the middleware did not run it either


def test_resume_hands_the_middleware_only_the_tasks_left(tmp_path: Path) -> None:
    spec = json.loads(json.dumps(DIAMOND))
    # d fails the first time round, with no retry: the job fails after a, b and c.
    spec["tasks"]["d"]["command"] = (
        "echo d >> ran.log; if [ ! -e d.tried ]; then touch d.tried; exit 5; fi;"
        " cat b.txt c.txt > d.txt"
    )
    report, _ = run(tmp_path, spec)
    assert report["status"] == "failed" and report["tasks"]["d"]["exit_code"] == 5
    (tmp_path / "ran.log").unlink()
    report, workers = run(tmp_path, spec, resume=True)
    assert report["status"] == "succeeded", report
    assert ran(tmp_path) == ["d"]  # a, b and c were kept from the journal
    assert (tmp_path / "d.txt").read_text() == "A\nB\nA\nC\n"
    assert report["tasks"]["d"]["peer"] in workers


def test_cancel_stops_the_middlewares_runs(tmp_path: Path) -> None:
    spec = {
        "name": "long",
        "tasks": {"sleepy": {"command": "echo $$ > pid; exec sleep 60", "outputs": ["x"]}},
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(spec))
    workflow = load_workflow(path)

    async def cancel_once_running(coordinator: Coordinator) -> dict[str, Any]:
        job = asyncio.ensure_future(coordinator.run())
        pid = tmp_path / "pid"
        await async_wait_until(
            lambda: pid.exists() and pid.read_text().strip(), 30, "the run never started"
        )
        coordinator.cancel("cancelled by the user (test)")
        return await job

    with LocalGrid(1, cpus_each=1) as cluster:
        coordinator = on_fake_dagman(cluster, workflow, path)
        report = asyncio.run(cancel_once_running(coordinator))
    assert report["status"] == "failed"
    sleeper = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)  # stopped, not left behind


def test_a_middleware_that_places_the_runs_refuses_pre_and_post_scripts(tmp_path: Path) -> None:
    # DAGMan runs its own scripts: bgrid's would run twice, or never in step with its runs.
    workflow = workflow_from_mapping(
        {"tasks": {"a": {"command": "true", "post": "exit 0"}}}, tmp_path
    )
    needs = needs_from(workflow, "grid", None, None, (1, 1))
    with pytest.raises(ConfigError, match="cannot run pre or post scripts \\(task 'a'\\)"):
        Coordinator(workflow, needs, None, backend=FakeDagMiddleware)
