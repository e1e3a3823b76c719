"""What `bgrid submit` shows while it runs: lines in a pipe, a live panel on a terminal,
nothing but the JSON with --json, nothing but the summary with --quiet."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, write_workflow

SMALL = """
name: small
tasks:
  a: {command: "echo a > a.txt", outputs: [a.txt]}
  b: {command: "cp a.txt b.txt", inputs: [a.txt], outputs: [b.txt]}
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def submit_small(grid: Grid, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    wf = write_workflow(tmp_path / "wf", SMALL)
    out = grid.run("submit", str(wf), "--local", "2", "--interface", LOOPBACK, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_a_submit_into_a_pipe_writes_a_line_per_change(tmp_path: Path, grid: Grid) -> None:
    lines = submit_small(grid, tmp_path).stdout.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert any(re.search(r"\] peer local-\S+ joined", line) for line in progress)
    started = [i for i, line in enumerate(progress) if "] task a started on local-" in line]
    done = [i for i, line in enumerate(progress) if "] task a done on local-" in line]
    assert started and done and started[0] < done[0]
    assert any("task b done on" in line and "(2/2 done)" in line for line in progress)
    assert lines[-2].startswith("job small-") and "succeeded" in lines[-2]  # then the summary


def test_json_output_is_the_report_alone(tmp_path: Path, grid: Grid) -> None:
    out = submit_small(grid, tmp_path, "--json")
    report = json.loads(out.stdout)  # nothing else on stdout
    assert report["status"] == "succeeded"
    assert "started on" not in out.stderr  # no lines on a stderr that is not a terminal


def test_quiet_prints_the_summary_only(tmp_path: Path, grid: Grid) -> None:
    out = submit_small(grid, tmp_path, "--quiet")
    lines = out.stdout.splitlines()
    assert lines[0].startswith("job small-") and len(lines) == 2
    assert out.stderr == ""


def test_a_terminal_shows_the_live_panel(tmp_path: Path, grid: Grid) -> None:
    tasks = "\n".join(
        f'  t{i}: {{command: "sleep 0.2; echo {i} > o{i}.txt", outputs: [o{i}.txt]}}'
        for i in range(200)
    )
    wf = write_workflow(tmp_path / "many", f"name: many\ntasks:\n{tasks}\n")
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--local", "3", "--interface", LOOPBACK),
        env={**grid.env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    seen = b""
    saw_running_panel = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            text = ANSI.sub("", seen.decode(errors="replace"))
            # While it runs: a done count short of the total, and a peer with its task.
            if re.search(r"\b([1-9]|[1-9]\d|1\d\d)/200 done", text) and re.search(
                r"local-\S+\s+1\s+t\d+", text
            ):
                saw_running_panel = True
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    text = ANSI.sub("", seen.decode(errors="replace"))
    assert saw_running_panel, text[-3000:]
    assert "200/200 done" in text and "running now" in text and "ETA" in text
    assert "job many-" in text and "succeeded" in text


def test_status_watch_redraws_the_job_table_until_ctrl_c(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("s1", "--cpus", "1")
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "wf",
        """
name: watched
tasks:
  quick: {command: "echo done > q", outputs: [q]}
  slow: {command: "sleep 30; cat q > s", inputs: [q], outputs: [s]}
""",
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK, "--quiet"),
        env=grid.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    watch = subprocess.Popen(
        bgrid_cmd("status", "--watch", "--interface", LOOPBACK),
        env={**grid.env, "TERM": "xterm-256color"},
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    seen = ""
    try:
        deadline = time.monotonic() + 30
        # The table shows the job, then its progress as it changes: redrawn, not appended.
        while time.monotonic() < deadline and not re.search(r"watched-\S+\s+running\s+1/2", seen):
            if select.select([main], [], [], 1.0)[0]:
                seen += ANSI.sub("", os.read(main, 65536).decode(errors="replace"))
        assert re.search(r"watched-\S+\s+running\s+1/2", seen), seen[-2000:]
        assert "Ctrl-C to stop" in seen
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=15) == 0
    finally:
        for proc in (watch, job):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (watch, job):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(main)
    grid.wait_all_idle()
