"""The owner comes first: real `bgrid worker` processes watching an activity file on loopback.

A returning owner suspends the job's runs (SIGSTOP: off the CPU, memory kept); an owner gone
again within `--vacate-after` lets them go on where they were, one who stays vacates them
(killed, run elsewhere, no retry used). `--vacate-after 0` is the old kill-at-once path.

The test machine is shared and busy, so these workers ignore CPU load (`--max-load 1`): the
owner is simulated with `--activity-file` (the supported hook: `touch` it, the owner is back).
How load is measured is tested on its own, against a real CPU burner.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

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
    desk = start_desktop(
        grid, "desk", active, "--cost", "0", "--idle-minutes", "10", "--vacate-after", "0"
    )
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


# A task that holds BALLAST_MIB of memory and counts to STEPS, one line a step, each line
# naming its pid: a run that went on where it was writes one pid and every step once.
BALLAST_MIB = 64
STEPS = 40
COUNTER = f"""
import os, sys, time
ballast = bytearray({BALLAST_MIB} << 20)
for page in range(0, len(ballast), 4096):  # resident, not just reserved
    ballast[page] = 1
with open(sys.argv[1], "a") as progress:
    for step in range({STEPS}):
        progress.write(f"{{os.getpid()}} {{step}}\\n")
        progress.flush()
        time.sleep(0.1)
open("t.txt", "w").write("ok\\n")
"""


def counting_job(tmp_path: Path, grid: Grid) -> tuple[subprocess.Popen[str], Path, Path]:
    """Submit a one-task job running COUNTER: the job, the script and its progress file."""
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    progress = tmp_path / "progress"
    wf = write_workflow(
        tmp_path / "wf",
        f"tasks:\n  t:\n    command: {sys.executable} {script} {progress}\n    outputs: [t.txt]\n",
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK, "--workers", "1..1", "--json"),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return job, script, progress


def _counters(script: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if str(script) in cmdline and proc.info["status"] != "zombie":
            found.append(proc)
    return found


def _group(pid: int) -> list[psutil.Process]:
    """The live processes of `pid`'s process group (the task's shell and what it started)."""
    pgid = os.getpgid(pid)
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != "zombie":
                found.append(proc)
    return found


def _all_stopped(script: Path) -> bool:
    """Whether the task running `script` is there and every process of its group stopped."""
    counters = _counters(script)
    if not counters:
        return False
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        group = _group(counters[0].pid)
        return bool(group) and all(p.status() == psutil.STATUS_STOPPED for p in group)
    return False


def _steps(progress: Path) -> list[tuple[str, int]]:
    if not progress.exists():
        return []
    lines = progress.read_text().splitlines()
    return [(pid, int(step)) for pid, step in (line.split() for line in lines if " " in line)]


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _report(job: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        stdout, stderr = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stdout + stderr
    report: dict[str, Any] = json.loads(stdout)
    return report


def test_an_owner_back_for_a_moment_suspends_the_task_which_then_goes_on_where_it_was(
    tmp_path: Path, grid: Grid
) -> None:
    active = tmp_path / "owner-active"
    # Back for IDLE_S (3 s) after a touch, then away: well within the default vacate_after.
    desk = start_desktop(grid, "desk", active, "--idle-minutes", str(IDLE_MINUTES))
    grid.wait_all_idle()
    job, script, progress = counting_job(tmp_path, grid)
    try:
        wait_for(lambda: len(_steps(progress)) >= 5, 30, "the task counting on the desk")
        active.touch()
        # Off the CPU (state T, every process of its group) with its memory still its own.
        wait_for(
            lambda: _all_stopped(script),
            5,
            "the task's processes stopped",
        )
        (counter,) = [p for p in _counters(script) if p.name().startswith("python")]
        status = _proc_status(counter.pid)
        assert status["State"].startswith("T")
        assert int(status["VmRSS"].split()[0]) >= BALLAST_MIB * 1024  # kB: nothing swapped out
        grid.wait_peers(lambda ps: ps.get(desk, {}).get("state") == "busy", timeout=5)
    except BaseException:
        job.kill()
        raise
    report = _report(job)
    task = report["tasks"]["t"]
    assert task["peer"] == desk and task["attempts"] == 1
    assert task["suspensions"] == 1 and task["suspended_s"] > 0
    steps = _steps(progress)
    assert [step for _, step in steps] == list(range(STEPS))  # went on: no step twice
    assert {pid for pid, _ in steps} == {str(counter.pid)}  # the same process throughout
    log = (grid.root / f"{desk}.log").read_text()
    assert "suspended 1 run(s)" in log and "resumed 1 run(s)" in log


def test_an_owner_who_stays_has_the_task_vacated_after_vacate_after_and_run_elsewhere(
    tmp_path: Path, grid: Grid
) -> None:
    active = tmp_path / "owner-active"
    desk = start_desktop(
        grid, "desk", active, "--cost", "0", "--idle-minutes", "10", "--vacate-after", "2"
    )
    spare = grid.start_worker("spare", "--cost", "1")  # --always-idle: never suspended
    grid.wait_all_idle()
    job, script, progress = counting_job(tmp_path, grid)
    try:
        wait_for(lambda: len(_steps(progress)) >= 3, 30, "the task counting on the desk")
        (first,) = {pid for pid, _ in _steps(progress)}
        active.touch()
        wait_for(
            lambda: _all_stopped(script),
            5,
            "the task's processes stopped",
        )
    except BaseException:
        job.kill()
        raise
    report = _report(job)
    task = report["tasks"]["t"]
    # Its second attempt ran on the spare, with no retry to spend: the vacate cost none.
    assert task["peer"] == spare and task["attempts"] == 2 and task["suspensions"] == 1
    assert (tmp_path / "wf" / "t.txt").read_text() == "ok\n"
    pids = [pid for pid, _ in _steps(progress)]
    assert pids[0] == first and pids[-1] != first  # killed on the desk, started afresh
    assert not psutil.pid_exists(int(first)) or psutil.Process(int(first)).status() == "zombie"
    peers = grid.wait_peers(lambda ps: ps.get(spare, {}).get("state") == "idle", timeout=5)
    assert peers[desk]["state"] == "busy"  # its owner is still at the desk
    assert "vacated" in (grid.root / f"{desk}.log").read_text()


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


# Three quick siblings and a task that runs long on its first attempt, writing the worker it
# runs on, and is quick on any other: what speculation needs to see a straggler.
SUSPENDED_STRAGGLER = """
name: suspended-straggler
tasks:
  s1: {{command: "sleep 0.3; echo one > s1.txt", outputs: [s1.txt]}}
  s2: {{command: "sleep 0.3; echo two > s2.txt", outputs: [s2.txt]}}
  s3: {{command: "sleep 0.3; echo three > s3.txt", outputs: [s3.txt]}}
  slow:
    command: >-
      if [ "$BGRID_ATTEMPT" = 1 ]; then
      for i in $(seq 600); do echo "$BGRID_WORKER" >> {progress}; sleep 0.1; done; fi;
      echo "attempt $BGRID_ATTEMPT" >> slow.txt
    outputs: [slow.txt]
"""


@pytest.mark.slow
def test_a_task_suspended_by_an_owner_who_stays_gets_a_copy_that_wins_on_another_desk(
    tmp_path: Path, grid: Grid
) -> None:
    """Suspend and speculation together: the copy finishes long before the vacate would."""
    owners = {}
    for name in ("desk-a", "desk-b"):
        activity = tmp_path / f"{name}-owner"
        desk = start_desktop(grid, name, activity, "--idle-minutes", "10", "--cpus", "1")
        owners[desk] = activity
    grid.wait_all_idle()
    progress = tmp_path / "progress"
    work = tmp_path / "job"
    wf = write_workflow(work, SUSPENDED_STRAGGLER.format(progress=progress))
    (work / "bgrid.toml").write_text(
        "[schedule]\nspeculation_factor = 2\nspeculation_min_s = 2\n"
        "speculation_min_siblings = 3\n"
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK, "--workers", "2..2", "--json"),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: progress.exists() and progress.read_text(), 30, "the slow task to start")
        (first_desk,) = set(progress.read_text().split())
        owners[first_desk].touch()  # its owner is back, and stays (10 minutes)
    except BaseException:
        job.kill()
        raise
    report = _report(job)
    slow = report["tasks"]["slow"]
    # Suspended on the first desk, copied to the other (idle, nothing ready), the copy won.
    assert slow["suspensions"] == 1 and len(slow["copies"]) == 1, slow
    assert slow["peer"] != first_desk and slow["won"].startswith("a copy: attempt 2")
    assert (work / "slow.txt").read_text() == "attempt 2\n"  # one result, written once
    # The suspended first run was stopped for good, not left frozen on the owner's desk.
    wait_for(lambda: not _running_with(str(progress)), 15, "the first run to be gone")


def _running_with(word: str) -> list[int]:
    """The pids of live processes whose command line holds `word`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != "zombie" and word in " ".join(proc.info["cmdline"] or ()):
            found.append(proc.pid)
    return found
