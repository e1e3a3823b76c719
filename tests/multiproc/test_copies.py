"""Speculative copies as a user sees them: `bgrid submit --local N` with bgrid.toml's
`[schedule]`, checked in the report, the files and the processes, never by timing."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.multiproc.conftest import Grid, write_workflow
from tests.waiting import wait_until

# A task that hangs on its first attempt (a desktop gone slow) and is quick on any other;
# three siblings of its class that are quick. The hang is a unique `sleep`, to find it.
STRAGGLER = """
name: straggler
tasks:
  s1: {{command: "sleep 0.3; echo one > s1.txt", outputs: [s1.txt]}}
  s2: {{command: "sleep 0.3; echo two > s2.txt", outputs: [s2.txt]}}
  s3: {{command: "sleep 0.3; echo three > s3.txt", outputs: [s3.txt]}}
  slow:
    command: >-
      if [ "$BGRID_ATTEMPT" = 1 ]; then sleep {hang}; fi;
      echo "attempt $BGRID_ATTEMPT" >> slow.txt
    outputs: [slow.txt]
"""

SCHEDULE = """
[schedule]
speculation_factor = 2
speculation_min_s = 2
speculation_min_siblings = 3
"""


def hanging(marker: str) -> list[int]:
    """The pids of the processes still running `sleep <marker>`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in words:
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.slow
def test_a_straggler_gets_a_copy_and_exactly_one_result_lands(tmp_path: Path, grid: Grid) -> None:
    hang = f"{300 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    work = tmp_path / "job"
    workflow = write_workflow(work, STRAGGLER.format(hang=hang))
    (work / "bgrid.toml").write_text(SCHEDULE)
    report_file = work / "report.json"
    out = grid.run(
        "submit", str(workflow), "--local", "2", "--report", str(report_file), timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(report_file.read_text())
    slow = report["tasks"]["slow"]
    assert report["status"] == "succeeded"
    # One copy, made for a reason the report gives, and it won (the first run hung).
    assert len(slow["copies"]) == 1, slow
    copy = slow["copies"][0]
    assert copy["attempt"] == 2 and "median" in copy["why"]
    assert slow["attempts"] == 2 and slow["peer"] == copy["peer"]
    assert slow["won"].startswith("a copy: attempt 2")
    # Exactly one result landed in the submit directory: the copy's, written once.
    assert (work / "slow.txt").read_text() == "attempt 2\n"
    # The losing run was stopped: its process is gone (reaped by its worker).
    wait_until(lambda: not hanging(hang), 15, f"the first run's `sleep {hang}` still runs")
