"""Prefetch policies and broadcast end to end: which run moved which bytes (per-task
`bytes_fetched` and the report's byte counters), over loopback with real daemons."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.multiproc.conftest import LOOPBACK, Grid

MB = 1024 * 1024


def bag(directory: Path, n: int, size: int, sleep_s: float = 0.0) -> Path:
    """`n` independent tasks, each reading its own random input of `size` bytes."""
    (directory / "in").mkdir(parents=True)
    tasks = []
    for i in range(n):
        (directory / "in" / f"{i}.bin").write_bytes(os.urandom(size))
        tasks.append(
            f"  t{i}:\n"
            f'    command: "sha256sum in/{i}.bin > {i}.txt && sleep {sleep_s:g}"\n'
            f"    inputs: [in/{i}.bin]\n"
            f"    outputs: [{i}.txt]\n"
        )
    path = directory / "wf.yaml"
    path.write_text("name: bag\ntasks:\n" + "".join(tasks))
    return path


def run(grid: Grid, workflow: Path, *flags: str) -> dict[str, Any]:
    report_file = workflow.parent / "report.json"
    out = grid.run(
        "submit", str(workflow), "--interface", LOOPBACK, "--report", str(report_file), *flags
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report: dict[str, Any] = json.loads(report_file.read_text())
    return report


@pytest.mark.parametrize("policy", ["lookahead", "none"])
def test_lookahead_moves_the_next_tasks_inputs_before_they_start(
    tmp_path: Path, grid: Grid, policy: str
) -> None:
    grid.start_worker("solo", "--cpus", "1")
    grid.wait_all_idle()
    report = run(grid, bag(tmp_path / "wf", 3, MB, sleep_s=0.2), "--prefetch", policy)
    moved_by_runs = sorted(t["bytes_fetched"] for t in report["tasks"].values())
    if policy == "lookahead":
        # The first task fetched its input; the other two found theirs moved (or moving)
        # by the prefetch ordered while the first one ran.
        assert moved_by_runs == [0, 0, MB]
    else:
        assert moved_by_runs == [MB, MB, MB]
    assert report["prefetch"] == policy
    assert report["bytes"]["from_coordinator"] == 3 * MB  # each input left us once
    assert report["bytes"]["cache_hits"] == 0
    for i in range(3):
        digest = hashlib.sha256((tmp_path / "wf" / "in" / f"{i}.bin").read_bytes()).hexdigest()
        assert (tmp_path / "wf" / f"{i}.txt").read_text().startswith(digest)


def test_a_file_many_tasks_read_leaves_the_coordinator_once(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("a", "--cpus", "1")
    grid.start_worker("b", "--cpus", "1")
    grid.wait_all_idle()
    work = tmp_path / "wf"
    work.mkdir()
    (work / "ref.bin").write_bytes(os.urandom(2 * MB))
    tasks = "".join(
        f'  t{i}: {{command: "sha256sum ref.bin > {i}.txt && sleep 0.3", '
        f"inputs: [ref.bin], outputs: [{i}.txt]}}\n"
        for i in range(6)
    )
    (work / "wf.yaml").write_text("name: ref\ntasks:\n" + tasks)
    report = run(grid, work / "wf.yaml", "--workers", "2..2", "--prefetch", "none")
    # Read by 6 >= 4 tasks (broadcast_min_consumers): the coordinator sends one copy, the
    # peer that has it sends the other; every task ran where the file already was.
    assert report["bytes"]["from_coordinator"] == 2 * MB
    assert report["bytes"]["peer_to_peer"] == 2 * MB
    assert {t["peer"] for t in report["tasks"].values()} == set(report_peers(report))
    assert all(t["bytes_fetched"] == 0 for t in report["tasks"].values())


def report_peers(report: dict[str, Any]) -> list[str]:
    return [p["name"] for p in report["peers"]]
