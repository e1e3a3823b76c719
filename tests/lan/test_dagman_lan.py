"""HTCondor DAGs on a LAN of namespaces (issue 10): the seed's eight-job DAG and a DAGMan
diamond, submitted as .dag files from one host and run by worker daemons on three others.

Each test starts its own three one-slot workers (so each has fresh caches) and stops them
when it ends; host 4 submits. The file flow is checked in the submit directory: every
namespace shares the filesystem, and each job's output depends on its parents' files.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator
from pathlib import Path

import pytest

from bonjourgrid.dag.examples import examples_root

from .conftest import Bgrid
from .harness import SEEN_S, LanGrid, share_grid_key
from .netns import Lan

pytestmark = [pytest.mark.lan, pytest.mark.slow]

_SUBMITTER = 3  # host index; workers run on hosts 0-2
_DIAMOND = Path(__file__).resolve().parents[1] / "data" / "dagman-diamond"


@pytest.fixture(scope="module")
def keyed_lan(lan4: Lan, bgrid: Bgrid) -> Lan:
    share_grid_key(lan4, bgrid)
    return lan4


@pytest.fixture
def grid(keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[LanGrid, None, None]:
    """Three workers listed idle on hosts 1-3; stopped when the test ends."""
    lan_grid = LanGrid(keyed_lan, bgrid, tmp_path, _SUBMITTER)
    try:
        workers = [lan_grid.start_worker(f"w{i}", i, 0.0) for i in range(3)]
        lan_grid.wait_idle(workers, SEEN_S, "three workers listed idle")
        yield lan_grid
    finally:
        lan_grid.stop_workers()


def test_the_seeds_eight_job_dag_runs_on_the_lan(grid: LanGrid, tmp_path: Path) -> None:
    dag_dir = tmp_path / "condor-j8"
    shutil.copytree(examples_root() / "condor-j8", dag_dir)
    done = grid.submit(dag_dir / "j8.dag", "--workers", "3..3")
    assert done.code == 0, done.explain()
    assert done.report["status"] == "succeeded", done.explain()
    assert len(done.peers_used()) >= 2, done.explain()
    assert (dag_dir / "results" / "j8.out").read_text() == "40\n"


def test_a_dagman_diamond_runs_on_the_lan(grid: LanGrid, tmp_path: Path) -> None:
    """VARS (with $(JOB)), RETRY and SCRIPT POST; needs issue 10's scripts part (post, stdout)."""
    dag_dir = tmp_path / "diamond"
    shutil.copytree(_DIAMOND, dag_dir)
    done = grid.submit(dag_dir / "diamond.dag", "--workers", "3..3")
    assert done.code == 0, done.explain()
    assert (dag_dir / "total.txt").read_text() == "55\n"
    assert (dag_dir / "post.log").read_text().splitlines() == ["D 0 0", "D 0 1"]
    assert (dag_dir / "node-B.out").read_text() == "summed left.txt: 15\n"
