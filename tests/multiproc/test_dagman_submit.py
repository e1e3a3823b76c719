"""`bgrid submit FILE.dag --local N`: HTCondor DAGs run with their submit files, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.multiproc.conftest import Grid

DIAMOND = Path(__file__).resolve().parents[1] / "data" / "dagman-diamond"


def test_the_seeds_eight_job_dag_runs_with_its_file_flow(tmp_path: Path, grid: Grid) -> None:
    """As a user gets it: `bgrid examples DIR`, then `bgrid submit DIR/condor-j8/j8.dag`."""
    grid.run("examples", str(tmp_path / "ex"), check=True)
    dag_dir = tmp_path / "ex" / "condor-j8"
    out = grid.run("submit", str(dag_dir / "j8.dag"), "--local", "2", "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "succeeded"
    assert sorted(report["tasks"]) == [f"0{n}" for n in range(1, 9)]
    # 40 = 8 + j6 (6 + 3 + 1) + j7 (7 + 4 + 2 + 1 + 5 + 2 + 1): each job read its parents' files
    assert (dag_dir / "results" / "j8.out").read_text() == "40\n"


def test_a_dagman_diamond_with_vars_retry_and_a_post_script(tmp_path: Path, grid: Grid) -> None:
    """Needs the `stdout`/`stderr` and `post` keys (issue 10's scripts part)."""
    dag_dir = tmp_path / "diamond"
    shutil.copytree(DIAMOND, dag_dir)
    out = grid.run("submit", str(dag_dir / "diamond.dag"), "--local", "2", "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"
    assert (dag_dir / "total.txt").read_text() == "55\n"
    # the POST script refused D's first attempt: RETRY ran D again, with $RETRY = 1
    assert (dag_dir / "post.log").read_text().splitlines() == ["D 0 0", "D 0 1"]
    assert (dag_dir / "node-B.out").read_text() == "summed left.txt: 15\n"
    assert (dag_dir / "node-C.out").read_text() == "summed right.txt: 40\n"
