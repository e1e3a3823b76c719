"""The owner comes back on a real LAN: a suspended peer stays held past `--peer-timeout`.

Four hosts in network namespaces. A desk (cost 0) watches its owner through an activity
file; a spare (cost 1) never has one. The submit shrinks the timeouts (`--peer-timeout 2
--lease 3`, harness.FAST), and the owner stays longer than both: the suspended desk still
answers heartbeats, so the coordinator keeps its run, which goes on where it was.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from tests.waiting import wait_until

from .conftest import Bgrid
from .harness import (
    LEASE_S,
    PEER_TIMEOUT_S,
    SEEN_S,
    STARTED_S,
    LanGrid,
    count_starts,
    mark_start,
    share_grid_key,
)
from .netns import Lan

_SUBMITTER = 3
_OWNER_S = 6.0  # how long the owner stays: longer than --peer-timeout and --lease
_STEPS = 60  # steps of 0.1 s the task counts


@pytest.fixture
def grid(lan4: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[LanGrid, None, None]:
    share_grid_key(lan4, bgrid)
    owner_grid = LanGrid(lan4, bgrid, tmp_path, _SUBMITTER)
    try:
        yield owner_grid
    finally:
        owner_grid.stop_workers()


def _steps(progress: Path) -> list[int]:
    return [int(line) for line in progress.read_text().split()] if progress.exists() else []


def test_a_suspended_peer_is_held_past_the_peer_timeout_and_its_task_goes_on(
    grid: LanGrid,
) -> None:
    assert _OWNER_S > PEER_TIMEOUT_S + LEASE_S
    active = grid.tmp / "owner-active"
    owner = ["--no-always-idle", "--activity-file", str(active), "--max-load", "1"]
    desk = grid.start_worker("desk", 0, 0.0, *owner, "--idle-minutes", str(_OWNER_S / 60))
    spare = grid.start_worker("spare", 1, 1.0)
    grid.wait_idle([desk, spare], SEEN_S, "both workers listed idle")
    starts, progress = grid.tmp / "t.starts", grid.tmp / "progress"
    count = f"for i in $(seq 1 {_STEPS}); do echo $i >> {progress}; sleep 0.1; done"
    wf = grid.workflow(
        "owner",
        {"t": {"command": f"{mark_start(starts)}; {count}; echo ok > t.txt", "outputs": ["t.txt"]}},
    )
    job = grid.start_submit(wf, "--workers", "1..1")  # the cheaper desk runs it
    wait_until(lambda: len(_steps(progress)) >= 10, STARTED_S, "t counting on the desk")
    active.touch()
    grid.wait_peers(
        lambda peers: peers.get(desk.name, {}).get("state") == "busy",
        SEEN_S,
        "the desk listed busy (its owner is back)",
    )
    done = job.finish()
    assert done.code == 0, done.explain()
    t = done.task("t")
    assert (t["peer"], t["attempts"], t["suspensions"]) == (desk.name, 1, 1), done.explain()
    assert count_starts(starts) == 1
    assert _steps(progress) == list(range(1, _STEPS + 1))  # went on where it was
    assert (wf.parent / "t.txt").read_text() == "ok\n"
