"""Task logs end to end: every attempt's stdout and stderr come back to the submit
directory, the report names them, `bgrid logs` prints them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.multiproc.conftest import LOOPBACK, Grid, write_workflow


def submit_local(grid: Grid, workflow: Path) -> dict:  # type: ignore[type-arg]
    out = grid.run(
        "submit", str(workflow), "--local", "2", "--interface", LOOPBACK, "--json", timeout=90
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_succeeding_task_keeps_its_stdout_and_stderr(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: chatty
tasks:
  talk: {command: "echo to stdout; echo to stderr >&2; echo ok > ok.txt", outputs: [ok.txt]}
  quiet: {command: "true"}
""",
    )
    report = submit_local(grid, wf)
    logs = report["tasks"]["talk"]["logs"]
    out, err = Path(logs["stdout"]), Path(logs["stderr"])
    assert out == work / ".bgrid" / "logs" / report["job"] / "talk.1.out"
    assert out.read_text() == "to stdout\n"
    assert err.read_text() == "to stderr\n"
    assert logs["attempt"] == 1 and "attempts" not in logs

    printed = grid.run("logs", report["job"], "talk", "--dir", str(work), check=True)
    assert printed.stdout == "to stdout\n"
    printed = grid.run("logs", "chatty", "talk", "--err", "--dir", str(work), check=True)
    assert printed.stdout == "to stderr\n"
    # A task that wrote nothing: no file to open, and `bgrid logs` prints nothing.
    quiet = report["tasks"]["quiet"]["logs"]
    assert quiet["stdout"] is None and quiet["stderr"] is None
    printed = grid.run("logs", "chatty", "quiet", "--dir", str(work), check=True)
    assert printed.stdout == ""
    missing = grid.run("logs", "chatty", "nobody", "--dir", str(work))
    assert missing.returncode == 2 and "no logs of task 'nobody'" in missing.stderr


def test_a_retried_task_keeps_both_attempts_logs(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: flaky
tasks:
  flaky:
    command: >-
      echo "try $BGRID_ATTEMPT"; echo "err $BGRID_ATTEMPT" >&2;
      test "$BGRID_ATTEMPT" -ge 2 || exit 3; echo ok > ok.txt
    outputs: [ok.txt]
    retries: 1
""",
    )
    report = submit_local(grid, wf)
    task = report["tasks"]["flaky"]
    assert task["attempts"] == 2
    logs = task["logs"]
    assert logs["attempt"] == 2 and Path(logs["stdout"]).read_text() == "try 2\n"
    first, second = logs["attempts"]
    assert Path(first["stdout"]).read_text() == "try 1\n"
    assert Path(first["stderr"]).read_text() == "err 1\n"
    assert Path(second["stderr"]).read_text() == "err 2\n"
    (failed,) = task["history"]  # the attempt that ended badly says where its logs are
    assert failed["attempt"] == 1 and failed["logs"]["stdout"] == first["stdout"]
    first_out = grid.run("logs", "flaky", "flaky", "--attempt", "1", "--dir", str(work))
    assert first_out.returncode == 0 and first_out.stdout == "try 1\n"
