"""`bgrid submit wf.json` with a WfCommons instance, on the embedded local grid (`--local 2`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bonjourgrid.dag.wfformat import INPUTS_TASK
from tests.multiproc.conftest import Grid
from tests.wfinstances import check_file_flow, generate, writers_and_readers

pytestmark = pytest.mark.slow


def test_a_wfcommons_montage_runs_as_stand_ins_with_its_file_flow(
    tmp_path: Path, grid: Grid
) -> None:
    work = tmp_path / "montage"
    work.mkdir()
    instance = generate("Montage", work / "montage.json")
    (work / "bgrid.toml").write_text("[wfformat]\nruntime_scale = 0.01\n")
    out = grid.run("submit", str(work / "montage.json"), "--local", "2", "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    check_file_flow(instance, report, work)
    # the source files the instance only names were made by bgrid's own task, on a peer
    assert report["tasks"][INPUTS_TASK]["status"] == "done"
    writer, readers = writers_and_readers(instance)
    assert not any((work / file_id).exists() for file_id in set(readers) - set(writer))


def test_recorded_programs_that_are_not_installed_fail_the_task_with_its_stderr(
    tmp_path: Path, grid: Grid
) -> None:
    work = tmp_path / "recorded"
    work.mkdir()
    instance = {
        "name": "recorded",
        "schemaVersion": "1.6",
        "workflow": {
            "specification": {
                "tasks": [{"id": "t1", "name": "t", "parents": [], "children": []}],
            },
            "execution": {
                "makespanInSeconds": 1,
                "executedAt": "2024-01-01T00:00:00Z",
                "tasks": [
                    {"id": "t1", "runtimeInSeconds": 1, "command": {"program": "no-such-tool"}}
                ],
            },
        },
    }
    (work / "wf.json").write_text(json.dumps(instance))
    (work / "bgrid.toml").write_text('[wfformat]\nprograms = "recorded"\n')
    out = grid.run("submit", str(work / "wf.json"), "--local", "1", "--json", timeout=120)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["tasks"]["t1"]["status"] == "failed"
    assert report["tasks"]["t1"]["exit_code"] == 127  # the shell found no such command


def test_resume_keeps_every_stand_in_until_a_setting_changes_their_commands(
    tmp_path: Path, grid: Grid
) -> None:
    work = tmp_path / "resume"
    work.mkdir()
    instance = generate("Srasearch", work / "wf.json")
    (work / "bgrid.toml").write_text("[wfformat]\nruntime_scale = 0.01\n")
    submit = ("submit", str(work / "wf.json"), "--local", "2", "--json")
    first = grid.run(*submit, timeout=300)
    assert first.returncode == 0, first.stderr
    check_file_flow(instance, json.loads(first.stdout), work)

    again = grid.run(*submit, "--resume", timeout=300)
    assert again.returncode == 0, again.stderr
    kept = json.loads(again.stdout)
    assert all(task.get("resumed") for task in kept["tasks"].values())

    (work / "bgrid.toml").write_text("[wfformat]\nruntime_scale = 0.02\n")
    rerun = grid.run(*submit, "--resume", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["resumed_from"]["kept"] == 0
    assert "its command, files or environment changed" in rerun.stderr
    check_file_flow(instance, report, work)
