"""benchmarks/compare.py keeps working: a smoke run prints its table, with or without Dask.

No figure is checked (timings belong to the benchmark's output, not to tests): only that the
runner ends well, shows each anchor with a ratio, and leaves no temp dir behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"


def smoke_run(tmp_path: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    """`compare.py --quick --only tiny --repeats 1 --markdown`: the table's rows, as cells."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = ["--quick", "--only", "tiny", "--repeats", "1", "--markdown", "--tmp", str(scratch)]
    done = subprocess.run(
        [sys.executable, str(COMPARE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(scratch.iterdir()) == []  # its temp dir is gone
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| measure | bgrid | anchor | ratio |", done.stdout
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
def test_a_quick_run_prints_bgrid_against_its_anchors_with_ratios(tmp_path: Path) -> None:
    (row,) = smoke_run(tmp_path)
    measure, bgrid, anchor, ratio = row
    assert measure == "200 `true` tasks"
    assert bgrid.endswith("/s")
    assert "Dask" in anchor and "spawn `sh -c true` on 2 threads" in anchor
    assert "of spawn" in ratio


@pytest.mark.slow
def test_without_dask_the_column_says_how_to_install_it(tmp_path: Path) -> None:
    # A `dask` package that cannot be imported stands first on the path: Dask is "missing".
    shadow = tmp_path / "shadow" / "dask"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    (row,) = smoke_run(tmp_path, env)
    assert "Dask not installed (pip install -e '.[bench]')" in row[2]
    assert "of spawn" in row[3]
