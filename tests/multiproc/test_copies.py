"""Speculative copies as a user sees them: `bgrid submit --local N` with bgrid.toml's
`[schedule]`, checked in the report, the files and the processes, never by timing."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.job_report import Report
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
    typed = Report.from_dict(report).tasks["slow"]  # as bonjourgrid.run returns it
    assert typed.won == slow["won"] and typed.copies[0]["peer"] == copy["peer"]
    # Exactly one result landed in the submit directory: the copy's, written once.
    assert (work / "slow.txt").read_text() == "attempt 2\n"
    # The losing run was stopped: its process is gone (reaped by its worker).
    wait_until(lambda: not hanging(hang), 15, f"the first run's `sleep {hang}` still runs")


# Each run writes the name of the worker that ran it: the outputs differ from peer to peer.
PER_PEER = """
name: per-peer
tasks:
  who: {command: 'echo "$BGRID_WORKER" > who.txt', outputs: [who.txt], quorum: 2}
"""

DETERMINISTIC = """
name: deterministic
defaults: {quorum: 3}
tasks:
  square: {command: "echo $((7 * 7)) > square.txt", outputs: [square.txt]}
  who: {command: 'echo "$BGRID_WORKER" > who.txt', outputs: [who.txt], quorum: 1}
"""


def submit_local(grid: Grid, work: Path, text: str, workers: int) -> tuple[int, dict[str, Any]]:
    workflow = write_workflow(work, text)
    report_file = work / "report.json"
    out = grid.run(
        "submit", str(workflow), "--local", str(workers), "--report", str(report_file),
        timeout=120,
    )  # fmt: skip
    assert report_file.exists(), out.stderr
    return out.returncode, json.loads(report_file.read_text())


@pytest.mark.slow
def test_a_per_peer_result_under_quorum_2_fails_naming_both_peers_and_digests(
    tmp_path: Path, grid: Grid
) -> None:
    code, report = submit_local(grid, tmp_path / "per-peer", PER_PEER, 2)
    assert code == 1 and report["status"] == "failed"
    who = report["tasks"]["who"]
    votes = who["quorum"]["votes"]
    assert who["quorum"]["quorum"] == 2 and who["quorum"]["accepted"] == ""
    assert len({v["peer"] for v in votes}) == 2  # two distinct peers ran it
    for vote in votes:  # each wrote its own name: its digest is that of its name
        digest = hashlib.sha256(f"{vote['peer']}\n".encode()).hexdigest()
        assert vote["digests"] == {"who.txt": digest}
        assert f"{vote['peer']}: who.txt={digest[:12]}" in who["error"]
    assert not (tmp_path / "per-peer" / "who.txt").exists()  # no result was accepted
    typed = Report.from_dict(report).tasks["who"].quorum
    assert typed is not None and typed["votes"] == votes


@pytest.mark.slow
def test_a_deterministic_task_under_quorum_3_succeeds_and_quorum_1_opts_out(
    tmp_path: Path, grid: Grid
) -> None:
    code, report = submit_local(grid, tmp_path / "det", DETERMINISTIC, 3)
    assert code == 0, report["reason"]
    square = report["tasks"]["square"]
    votes = square["quorum"]["votes"]
    assert len({v["peer"] for v in votes}) >= 2  # a majority of 3: at least 2 agreeing peers
    digest = hashlib.sha256(b"49\n").hexdigest()
    assert all(v["digests"] == {"square.txt": digest} for v in votes)
    assert (tmp_path / "det" / "square.txt").read_text() == "49\n"
    assert "quorum" not in report["tasks"]["who"]  # quorum: 1, one run
    assert report["tasks"]["who"]["attempts"] == 1
