"""Runs at the wire's limits, end to end on real worker daemons over 127.0.0.1: a task with
30,000 inputs runs (its `run` travels in parts), and a run the worker refuses ends the job
with the worker's reason instead of leaving the task running forever."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from bonjourgrid import wire
from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.coordinator.submit import admission
from bonjourgrid.dag import load_workflow
from bonjourgrid.worker.local import LocalGrid
from tests.multiproc.conftest import LOOPBACK, Grid, submit

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_a_task_with_30000_inputs_runs_on_a_real_worker(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "reduce"
    (work / "parts").mkdir(parents=True)
    names = [f"parts/shard-{i:05d}-of-30000.txt" for i in range(30_000)]
    for i, name in enumerate(names):
        (work / name).write_text(f"{i % 7}\n")  # seven contents: the cache moves seven files
    workflow = work / "wf.json"
    task = {
        "command": "ls parts | wc -l > count.txt; cat parts/shard-29999-of-30000.txt >> count.txt",
        "inputs": names,
        "outputs": ["count.txt"],
    }
    workflow.write_text(json.dumps({"name": "reduce", "tasks": {"reduce": task}}))
    # The run's inputs alone need more than one control frame: each also carries its digest
    # (64 characters) and at least one source (endpoint, key, label).
    assert sum(len(name) + 64 + 60 for name in names) > wire.MAX_CONTROL_FRAME
    code, report, logs = submit(grid, workflow, "--local", "1", timeout=240)
    assert code == 0, logs
    assert report["tasks"]["reduce"]["attempts"] == 1
    assert (work / "count.txt").read_text().split() == ["30000", str(29_999 % 7)]


def test_a_run_the_worker_refuses_fails_with_the_workers_reason(tmp_path: Path) -> None:
    work = tmp_path / "refused"
    work.mkdir()
    task = {"command": "true", "outputs": ["never.txt"], "retries": 1}
    (work / "wf.json").write_text(json.dumps({"name": "refused", "tasks": {"big": task}}))
    workflow = load_workflow(work / "wf.json")
    # A command over the wire's 64 KiB string limit, which the loader refuses, set here as a
    # coordinator with a bug would send it: the worker cannot read the run, but it can tell
    # which run it was, and says why it refuses it.
    big = "true " + "x" * (wire.MAX_STRING + 10)
    workflow.tasks["big"] = dataclasses.replace(workflow.tasks["big"], command=big)
    with LocalGrid(1) as cluster:
        needs = needs_from(
            workflow, cluster.grid.fingerprint, None, None, (1, 1), admission(cluster.grid)
        )
        coordinator = Coordinator(
            workflow, needs, cluster.grid, interface=LOOPBACK, expected_peers=1
        )
        report = asyncio.run(coordinator.run())
    assert report["status"] == "failed"
    big_task = report["tasks"]["big"]
    assert big_task["status"] == "failed" and big_task["attempts"] == 2  # retried once
    assert "refused the run" in big_task["error"], big_task["error"]
    assert "max_str_len" in big_task["error"], big_task["error"]
