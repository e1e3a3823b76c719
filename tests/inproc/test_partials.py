"""Partial downloads left by a coordinator that died mid-collection are removed at the next
start, and only those: a live coordinator's partials in the same directory stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bonjourgrid.coordinator.dataflow import remove_stale_partials

DIGEST = "ab" * 32


def test_stale_partials_go_and_a_live_coordinator_s_stay(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)  # reaped: no process has this pid now (or soon a new one)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        partials = tmp_path / ".bgrid" / "partial"
        partials.mkdir(parents=True)
        stale = partials / f"{DIGEST}.{dead_pid}.0a0b0c0d.part"
        legacy = partials / f"{DIGEST}.0a0b0c0d.part"  # before partials carried a pid
        mine = partials / f"{DIGEST}.{os.getpid()}.0a0b0c0d.part"  # a run of ours that ended
        kept = partials / f"{DIGEST}.{live.pid}.0a0b0c0d.part"
        for path in (stale, legacy, mine, kept):
            path.write_bytes(b"x" * 1000)
        assert remove_stale_partials(partials) == 3
        assert [p.name for p in partials.iterdir()] == [kept.name]
    finally:
        live.kill()
        live.wait()


def test_no_partial_directory_is_nothing_to_do(tmp_path: Path) -> None:
    assert remove_stale_partials(tmp_path / ".bgrid" / "partial") == 0
    assert not (tmp_path / ".bgrid").exists()  # made when needed, not before
