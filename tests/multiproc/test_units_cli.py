"""What the user types on the command line means one thing: sizes, `--require`, flags, exits."""

from __future__ import annotations

import json
from pathlib import Path

from tests.multiproc.conftest import LOOPBACK, Grid, write_workflow

ONE_TASK = "tasks:\n  t: {command: 'echo ok > out.txt', outputs: [out.txt]}\n"


def test_a_4g_worker_is_shown_as_4_gib_and_matches_ram_4g(tmp_path: Path, grid: Grid) -> None:
    name = grid.start_worker("four", "--ram", "4G")
    peers = grid.wait_all_idle()
    assert peers[name]["ram"] == 4096  # MiB: G is 2**30, as in HTCondor and Slurm
    table = grid.run("peers", "--interface", LOOPBACK, "--wait", "0.7", check=True).stdout
    assert any(name in line and "4.0 GiB" in line for line in table.splitlines()), table
    wf = write_workflow(tmp_path / "wf", ONE_TASK)
    out = grid.run(
        "submit", str(wf), "--interface", LOOPBACK, "--json",
        "--require", "ram>=4G and ram<=4G",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["tasks"]["t"]["peer"] == name


def test_a_quiet_worker_logs_errors_only(grid: Grid) -> None:
    loud, quiet = grid.start_worker("loud"), grid.start_worker("quiet", "-q")
    grid.wait_all_idle()
    grid.stop()
    logs = {name: (grid.root / f"{name}.log").read_text() for name in (loud, quiet)}
    assert " INFO " in logs[loud]  # what a worker says at start: the test would see it
    assert " INFO " not in logs[quiet] and " WARNING " not in logs[quiet], logs[quiet]


def test_a_workflow_with_an_unknown_key_is_refused_by_submit(tmp_path: Path, grid: Grid) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text("tasks:\n  a: {command: 'cat x > y', input: [x], outputs: [y]}\n")
    (tmp_path / "x").write_text("x")
    out = grid.run("submit", str(path), "--local", "1")
    assert out.returncode == 2, out.stderr
    assert "wf.yaml: unknown key 'input' in task 'a'; did you mean 'inputs'?" in out.stderr


def test_an_unknown_attribute_in_require_is_refused_listing_the_known_ones(
    tmp_path: Path, grid: Grid
) -> None:
    wf = write_workflow(tmp_path / "wf", ONE_TASK)
    out = grid.run("submit", str(wf), "--local", "1", "--require", "Memory2 >= 4096")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "unknown attribute 'Memory2' (did you mean Memory?); known: cpus, ram" in out.stderr


def test_a_peer_that_fails_require_is_told_which_clause_and_what_it_has(
    tmp_path: Path, grid: Grid
) -> None:
    name = grid.start_worker("small", "--ram", "4G")
    grid.wait_all_idle()
    wf = write_workflow(tmp_path / "wf", ONE_TASK)
    out = grid.run("submit", str(wf), "--interface", LOOPBACK, "--require", "Memory>=8GiB")
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"{name}: does not satisfy ram>=8GiB (it has 4.0 GiB)" in out.stderr
