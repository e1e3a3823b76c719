"""Pre and post scripts, pre_skip and stdout/stderr copies, end to end: `bgrid submit
--local 2` runs the scripts on the coordinator's host, in the submit directory."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, write_workflow
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def submit_local(grid: Grid, workflow: Path, status: int = 0) -> dict[str, Any]:
    out = grid.run(
        "submit", str(workflow), "--local", "2", "--interface", LOOPBACK, "--json", timeout=90
    )
    assert out.returncode == status, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_post_script_turns_a_failing_command_into_a_success(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: rescued
tasks:
  bad:
    command: "echo partial > part.txt; exit 3"
    outputs: [part.txt]
    retries: 2
    post: >-
      echo "ret=$BGRID_RETURN pre=$BGRID_PRE_RETURN retry=$BGRID_RETRY
      max=$BGRID_MAX_RETRIES task=$BGRID_TASK" > seen.txt; echo rescued > ../part.txt
    script_dir: scripts
  after: {command: "cat part.txt > final.txt", inputs: [part.txt], outputs: [final.txt]}
""",
    )
    (work / "scripts").mkdir()
    report = submit_local(grid, wf)
    bad = report["tasks"]["bad"]
    assert report["status"] == "succeeded"
    assert bad["status"] == "done" and bad["attempts"] == 1 and bad["exit_code"] == 3
    # the post ran in script_dir, saw the command's exit code, and decided
    assert (work / "scripts" / "seen.txt").read_text() == ("ret=3 pre=-1 retry=0 max=2 task=bad\n")
    (post,) = bad["scripts"]
    assert post["script"] == "post" and post["exit_code"] == 0 and post["attempt"] == 1
    # what the post wrote in the submit directory is what the next task read
    assert (work / "part.txt").read_text() == "rescued\n"
    assert (work / "final.txt").read_text() == "rescued\n"


def test_a_pre_script_writes_the_input_its_task_reads(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: prepared
tasks:
  use:
    command: "tr a-z A-Z < in.txt > out.txt"
    inputs: [in.txt]
    outputs: [out.txt]
    pre: "echo made by the pre > in.txt; echo pre-said-this"
""",
    )
    report = submit_local(grid, wf)
    assert report["status"] == "succeeded", report
    assert (work / "out.txt").read_text() == "MADE BY THE PRE\n"
    (pre,) = report["tasks"]["use"]["scripts"]
    assert Path(pre["stdout"]).read_text() == "pre-said-this\n"
    printed = grid.run("logs", "prepared", "use", "--script", "pre", "--dir", str(work))
    assert printed.returncode == 0 and printed.stdout == "pre-said-this\n", printed.stderr


def test_a_pre_that_makes_no_input_fails_the_attempt_with_staging_s_words(
    tmp_path: Path, grid: Grid
) -> None:
    wf = write_workflow(
        tmp_path / "wf",
        "tasks:\n  use: {command: 'cat in.txt', inputs: [in.txt], pre: 'true'}\n",
    )
    report = submit_local(grid, wf, status=1)
    use = report["tasks"]["use"]
    assert use["status"] == "failed"
    assert "cannot read input in.txt" in use["error"] and "after its pre script" in use["error"]


def test_a_failing_pre_is_retried_and_the_command_runs_once(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: second-time
tasks:
  t:
    command: "echo ran > out.txt"
    outputs: [out.txt]
    retries: 1
    pre: 'echo "$BGRID_RETRY" >> tries.txt; test "$BGRID_RETRY" -ge 1'
""",
    )
    report = submit_local(grid, wf)
    t = report["tasks"]["t"]
    assert t["status"] == "done" and t["attempts"] == 2
    assert (work / "tries.txt").read_text() == "0\n1\n"
    assert [(s["attempt"], s["exit_code"]) for s in t["scripts"]] == [(1, 1), (2, 0)]
    # the command ran once, as attempt 2: the first ended with its pre
    assert t["logs"]["attempt"] == 2 and "attempts" not in t["logs"]
    assert (work / "out.txt").read_text() == "ran\n"


def test_pre_skip_makes_the_task_done_without_running_it(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: skipper
tasks:
  skip:
    command: "exit 7"
    pre: "echo already > done.txt; echo ran >> pre-ran.txt; exit 4"
    pre_skip: 4
    post: "exit 1"
    outputs: [done.txt]
    stdout: skip.out
  next: {command: "cat done.txt > next.txt", inputs: [done.txt], outputs: [next.txt]}
""",
    )
    report = submit_local(grid, wf)
    skip = report["tasks"]["skip"]
    assert report["status"] == "succeeded"
    assert skip["status"] == "done" and skip["attempts"] == 0 and skip["exit_code"] is None
    assert [s["script"] for s in skip["scripts"]] == ["pre"]  # neither command nor post ran
    assert (work / "next.txt").read_text() == "already\n"
    assert (work / "skip.out").read_bytes() == b""  # it never ran: an empty copy
    # --resume keeps it as done: its pre does not run again
    out = grid.run("submit", str(wf), "--local", "2", "--interface", LOOPBACK, "--json", "--resume")
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)["tasks"]
    assert resumed["skip"].get("resumed") and resumed["next"].get("resumed")
    assert (work / "pre-ran.txt").read_text() == "ran\n"


def test_stdout_and_stderr_are_copied_when_the_task_ends(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: copies
tasks:
  talk:
    command: "echo to stdout; echo to stderr >&2"
    stdout: logs/talk.out
    stderr: logs/talk.err
  fail:
    command: 'echo "try $BGRID_ATTEMPT"; exit 2'
    retries: 1
    stdout: fail.out
    stderr: fail.err
""",
    )
    report = submit_local(grid, wf, status=1)
    assert report["tasks"]["fail"]["status"] == "failed"
    assert (work / "logs" / "talk.out").read_text() == "to stdout\n"
    assert (work / "logs" / "talk.err").read_text() == "to stderr\n"
    assert (work / "fail.out").read_text() == "try 2\n"  # the last attempt's
    assert (work / "fail.err").read_bytes() == b""


def test_ctrl_c_while_a_script_runs_leaves_no_process(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
tasks:
  t:
    command: "true"
    pre: 'echo $$ > pre.pid; sleep 300 & echo $! > child.pid; wait'
""",
    )
    log = work / "submit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            bgrid_cmd("-v", "submit", str(wf), "--local", "2", "--interface", LOOPBACK),
            env=grid.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (work / "child.pid").exists() and (work / "child.pid").read_text().strip(),
            30,
            lambda: f"the pre script started its child:\n{log.read_text()}",
        )
        pids = [int((work / name).read_text()) for name in ("pre.pid", "child.pid")]
        assert all(psutil.pid_exists(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(pid) for pid in pids), 10, "the script and its child ended")
