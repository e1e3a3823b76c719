"""The owner comes first: real `bgrid worker` processes watching an activity file on loopback.

The test machine is shared and busy, so these workers ignore CPU load (`--max-load 1`): the
owner is simulated with `--activity-file` (the supported hook: `touch` it, the owner is back).
How load is measured is tested on its own, against a real CPU burner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from bonjourgrid.worker.idle import NonGridLoad
from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, write_workflow
from tests.waiting import wait_until as wait_for

IDLE_MINUTES = 0.05  # 3 s: long enough for a listing (0.7 s) to see `busy`, short for CI
IDLE_S = 60 * IDLE_MINUTES
STOP_BUDGET_S = 1.0  # the contract: the owner has the machine back within a second


def start_desktop(grid: Grid, name: str, activity: Path, *flags: str) -> str:
    """A worker that watches its owner through `activity` (the helper's --always-idle undone)."""
    return grid.start_worker(
        name, "--no-always-idle", "--activity-file", str(activity), "--max-load", "1", *flags
    )


def test_touching_the_activity_file_makes_the_peer_busy_then_idle_after_the_idle_time(
    tmp_path: Path, grid: Grid
) -> None:
    active = tmp_path / "owner-active"
    name = start_desktop(grid, "desk", active, "--idle-minutes", str(IDLE_MINUTES))
    grid.wait_all_idle()  # no file yet: input unknown, load ignored: idle
    active.touch()
    touched = time.monotonic()
    grid.wait_peers(lambda ps: ps.get(name, {}).get("state") == "busy", timeout=IDLE_S)
    grid.wait_peers(lambda ps: ps.get(name, {}).get("state") == "idle", timeout=IDLE_S + 5)
    # A listing that shows `idle` ends after the change: never before the idle time is up.
    assert time.monotonic() - touched >= IDLE_S
    log = (grid.root / f"{name}.log").read_text()
    assert "owner back: keyboard/mouse used" in log and "owner away" in log


def test_a_peer_whose_owner_is_at_the_desk_starts_busy(tmp_path: Path, grid: Grid) -> None:
    active = tmp_path / "owner-active"
    active.touch()
    name = start_desktop(grid, "desk", active, "--idle-minutes", "10")
    first = grid.wait_peers(lambda ps: name in ps, timeout=10)
    assert first[name]["state"] == "busy"  # never advertised idle, not even for a moment


def _sleepers(marker: str) -> list[psutil.Process]:
    """Live processes of the task: its `sleep` (zombies waiting for a reaper do not count)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", marker] and proc.info["status"] != "zombie":
            found.append(proc)
    return found


def test_an_owner_coming_back_stops_the_task_within_a_second_and_the_job_moves(
    tmp_path: Path, grid: Grid
) -> None:
    active = tmp_path / "owner-active"
    desk = start_desktop(grid, "desk", active, "--cost", "0", "--idle-minutes", "10")
    spare = grid.start_worker("spare", "--cost", "1")  # --always-idle: never preempted
    grid.wait_all_idle()
    marker = f"30.{uuid.uuid4().int % 10**9}"  # a unique `sleep` to find among the processes
    first = tmp_path / "first-run"
    # The first run ignores SIGTERM (so the stop goes to SIGKILL after the grace period, the
    # slow path) and sleeps; the rerun elsewhere finishes at once.
    wf = write_workflow(
        tmp_path / "wf",
        "tasks:\n  t:\n    command: >-\n"
        f"      if mkdir {first} 2>/dev/null; then trap '' TERM; sleep {marker}; fi;\n"
        "      echo ok > t.txt\n"
        "    outputs: [t.txt]\n",
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK, "--workers", "1..1", "--json"),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: bool(_sleepers(marker)), 30, "the task starting on the cheap peer")
        (sleeper,) = _sleepers(marker)
        assert grid.procs[desk].pid in [p.pid for p in sleeper.parents()]
        active.touch()
        touched = time.monotonic()
        wait_for(lambda: not _sleepers(marker), 5, "the task's processes ending")
        stop_s = time.monotonic() - touched
        print(f"\nowner back -> task process group gone in {stop_s:.3f} s")
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stdout + stderr
    report = json.loads(stdout)
    task = report["tasks"]["t"]
    assert task["peer"] == spare and task["attempts"] == 2
    assert (tmp_path / "wf" / "t.txt").read_text() == "ok\n"
    peers = grid.wait_peers(lambda ps: ps.get(spare, {}).get("state") == "idle", timeout=5)
    assert peers[desk]["state"] == "busy"  # its owner is still at the desk
    assert "the owner came back" in (grid.root / f"{desk}.log").read_text()


def test_cpu_used_by_the_daemon_and_its_descendants_is_not_the_owners() -> None:
    # This test process plays the daemon; a grandchild burning a core plays a grid task.
    burner = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} -c 'while True: pass'; :"],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: bool(psutil.Process(burner.pid).children()), 10, "the burner starting")
        (python,) = psutil.Process(burner.pid).children()
        grid_load = NonGridLoad(grid_root=os.getpid())
        all_load = NonGridLoad(grid_root=None)
        before = python.cpu_times()
        total_before = sum(psutil.cpu_times())
        time.sleep(1.0)  # the measurement interval itself, not a wait for a condition
        burned = sum(python.cpu_times()[:2]) - sum(before[:2])
        share = burned / (sum(psutil.cpu_times()) - total_before)
        without_grid = grid_load.measure(tasks_running=True)
        everything = all_load.measure(tasks_running=True)
    finally:
        for child in psutil.Process(burner.pid).children(recursive=True):
            child.kill()
        burner.kill()
        burner.wait()
    print(
        f"\nburner {share:.0%} of the CPUs; load seen {everything:.0%}, non-grid {without_grid:.0%}"
    )
    assert share > 0.15, "the burner hardly ran: the machine is too loaded to tell"
    assert everything - without_grid == pytest.approx(share, abs=0.1)
