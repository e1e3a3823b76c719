"""The task sandbox across a worker's death: real `bgrid` processes over 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from bonjourgrid.cache.local import SANDBOXES
from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, write_workflow
from tests.waiting import wait_until as wait_for

pytestmark = pytest.mark.timeout(120)


def ended(pid: int) -> bool:
    """Whether `pid` has ended; a zombie of this process (a subreaper) is reaped here."""
    try:
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE:
            return False
        if process.ppid() == os.getpid():
            os.waitpid(pid, os.WNOHANG)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass
    return True


def test_a_worker_restarted_after_kill_9_kills_the_task_its_previous_life_left(
    tmp_path: Path, grid: Grid
) -> None:
    cache = tmp_path / "worker-cache"
    name = grid.start_worker("w", "--cache-dir", str(cache))
    grid.wait_all_idle()
    flags = tmp_path / "flags"
    flags.mkdir()
    # The task runs until told to go on, then makes its side effect.
    command = (
        f"echo $$ > {flags}/task.pid; until [ -e {flags}/go ]; do sleep 0.05; done; "
        f"echo ran >> {flags}/side-effects; echo done > t.txt"
    )
    workflow = write_workflow(
        tmp_path / "wf", f"tasks:\n  t: {{command: '{command}', outputs: [t.txt]}}\n"
    )
    submit = subprocess.Popen(
        bgrid_cmd("submit", str(workflow), "--interface", LOOPBACK),
        env=grid.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pidfile = flags / "task.pid"
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the task's start")
        task = int(pidfile.read_text())
        grid.procs[name].kill()  # kill -9: the daemon cleans up nothing
        grid.procs[name].wait()
        submit.send_signal(signal.SIGTERM)  # its coordinator must not run the task again
        submit.wait(30)
        assert not ended(task), "the task did not outlive its daemon: nothing to test"
        assert list((cache / SANDBOXES).iterdir()), "the task's sandbox is already gone"

        grid.start_worker("w", "--cache-dir", str(cache))  # the same peer, the same cache
        wait_for(lambda: ended(task), 15, f"the end of the orphaned task {task}")
        grid.wait_all_idle()
        assert list((cache / SANDBOXES).iterdir()) == []
        (flags / "go").touch()  # had the task survived, it would make its side effect now
        assert not (flags / "side-effects").exists()
        assert re.search(r"killed [1-9]\d* task processes left by a previous daemon", grid.logs())
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
        if pidfile.exists():
            with contextlib.suppress(ValueError, psutil.Error):
                psutil.Process(int(pidfile.read_text())).kill()


def test_a_task_over_its_wall_clock_limit_fails_and_says_so(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("w", "--cpus", "2")
    grid.wait_all_idle()
    text = """
tasks:
  slow: {command: "sleep 300 & sleep 300", outputs: [s.txt], limits: {wall_s: 1}}
  fine: {command: "echo fine > f.txt", outputs: [f.txt], limits: {wall_s: 60}}
"""
    workflow = write_workflow(tmp_path / "wf", text)
    report_file = tmp_path / "report.json"
    out = grid.run("submit", str(workflow), "--interface", LOOPBACK, "--report", str(report_file))
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(report_file.read_text())
    slow = report["tasks"]["slow"]
    assert "exceeded its wall-clock limit of 1 s" in slow["error"], slow
    assert report["tasks"]["fine"]["status"] == "done"
    assert "exceeded its wall-clock limit of 1 s" in out.stdout + out.stderr
    grid.wait_all_idle()
