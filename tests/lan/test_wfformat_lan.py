"""WfCommons workflows on a LAN (issue 10, "WfFormat input"): instances that wfcommons' own
recipes generate run end to end on three peers, each task a stand-in, with their file flow.

Four hosts in network namespaces, shared by the module: hosts 1-3 run a one-slot worker each
(fresh names, so fresh caches, per test), host 4 submits. The check is the one a user of a past
run would make: every task done, every final output back in the submit directory at its
recorded size, every intermediate written before any of its readers started (the report's
start and end times), and the work spread over the peers.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from tests.wfinstances import check_file_flow, generate

from .conftest import Bgrid
from .harness import SEEN_S, SUBMIT_S, LanGrid, share_grid_key
from .netns import Lan

_SUBMITTER = 3  # host index; workers run on hosts 0-2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_lan(lan4: Lan, bgrid: Bgrid) -> Lan:
    share_grid_key(lan4, bgrid)
    return lan4


@pytest.fixture
def grid(keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[LanGrid, None, None]:
    lan_grid = LanGrid(keyed_lan, bgrid, tmp_path, _SUBMITTER)
    try:
        yield lan_grid
    finally:
        lan_grid.stop_workers()


@pytest.mark.parametrize("recipe", ["Montage", "Epigenomics", "Blast", "Srasearch"])
def test_a_wfcommons_workflow_runs_on_the_lan_with_its_file_flow(
    grid: LanGrid, recipe: str
) -> None:
    workers = [grid.start_worker(f"wf{index}", index, 0.0) for index in range(3)]
    grid.wait_idle(workers, SEEN_S, "the three workers listed idle")
    work = grid.tmp / recipe.lower()
    work.mkdir()
    instance = generate(recipe, work / "wf.json")
    (work / "bgrid.toml").write_text("[wfformat]\nruntime_scale = 0.01\n")

    done = grid.start_submit(work / "wf.json", "--workers", "3..3").finish(timeout=3 * SUBMIT_S)
    assert done.code == 0, done.explain()
    check_file_flow(instance, done.report, work)
    assert done.peers_used() == {w.name for w in workers}, done.explain()
    assert done.moved["peer_to_peer"] > 0, done.explain()  # intermediates went peer to peer
