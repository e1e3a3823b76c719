"""The script runner (coordinator/scripts.py) on its own: real shells in a real submit
directory, what a script sees, how many run at once, and that a stopped one leaves nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from bonjourgrid.coordinator import scripts
from bonjourgrid.coordinator.logs import LogKeeper
from bonjourgrid.coordinator.model import RunScript
from bonjourgrid.coordinator.scripts import ScriptRunner
from bonjourgrid.dag import workflow_from_mapping
from tests.waiting import async_wait_until


def gone(pid: int) -> bool:
    """Ended (a zombie is ended: its parent, init, reaps it when it will)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def runner(root: Path, tasks: dict[str, dict[str, object]]) -> ScriptRunner:
    workflow = workflow_from_mapping({"tasks": tasks}, root)
    return ScriptRunner(workflow, LogKeeper(root, "job-000000"))


async def test_a_post_sees_the_attempt_in_its_environment(tmp_path: Path) -> None:
    post = (
        'echo "$BGRID_TASK $BGRID_RETRY $BGRID_MAX_RETRIES $BGRID_RETURN $BGRID_PRE_RETURN'
        ' $BGRID_DAG_STATUS $BGRID_FAILED_COUNT"'
    )
    run = runner(tmp_path, {"a": {"command": "true", "retries": 3, "post": post}})
    ended = await run.run(RunScript("a", "post", 2, 1, 7, 0), failed=2)
    assert (ended.exit_code, ended.error, ended.outputs) == (0, "", ())
    (seen,) = run.logs.scripts["a"]
    assert Path(seen["stdout"]).read_text() == "a 1 3 7 0 1 2\n"
    assert seen["stdout"].endswith("a.2.post.out") and seen["exit_code"] == 0


async def test_a_post_exiting_0_reports_the_outputs_as_they_are_now(tmp_path: Path) -> None:
    (tmp_path / "o").write_text("from the command\n")
    run = runner(
        tmp_path,
        {
            "a": {"command": "true", "outputs": ["o"], "post": "echo x > o"},
            "b": {"command": "true", "outputs": ["p"], "post": "true"},
        },
    )
    ended = await run.run(RunScript("a", "post", 1, 0))
    assert [(path, ref.size) for path, ref in ended.outputs] == [("o", 2)]  # as the post left it
    ended = await run.run(RunScript("b", "post", 1, 0))
    assert ended.exit_code == 0 and ended.outputs == ()
    assert "declared output p is not in the submit directory" in ended.error


async def test_a_script_that_cannot_start_says_why(tmp_path: Path) -> None:
    (tmp_path / "gone").mkdir()
    run = runner(tmp_path, {"a": {"command": "true", "pre": "true", "script_dir": "gone"}})
    (tmp_path / "gone").rmdir()
    ended = await run.run(RunScript("a", "pre", 1, 0))
    assert ended.exit_code is None and ended.error.startswith("pre script could not start")


async def test_no_more_scripts_of_a_kind_run_at_once_than_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(scripts.MAX_SCRIPTS, "pre", 2)
    (tmp_path / "running").mkdir()
    pre = (
        'mkdir running/"$BGRID_TASK"; ls running | wc -l >> counts; '
        'sleep 0.2; rmdir running/"$BGRID_TASK"'
    )
    run = runner(tmp_path, {f"t{i}": {"command": "true", "pre": pre} for i in range(6)})
    ends = await asyncio.gather(*(run.run(RunScript(f"t{i}", "pre", 1, 0)) for i in range(6)))
    assert [e.exit_code for e in ends] == [0] * 6
    counts = [int(n) for n in (tmp_path / "counts").read_text().split()]
    assert len(counts) == 6 and max(counts) <= 2


async def test_a_stopped_script_leaves_no_process(tmp_path: Path) -> None:
    pre = "echo $$ > pre.pid; sleep 300 & echo $! > child.pid; wait"
    run = runner(tmp_path, {"a": {"command": "true", "pre": pre}})
    going = asyncio.create_task(run.run(RunScript("a", "pre", 1, 0)))
    child = tmp_path / "child.pid"
    await async_wait_until(lambda: child.exists() and child.read_text().strip(), 10, "started")
    pids = [int((tmp_path / name).read_text()) for name in ("pre.pid", "child.pid")]
    going.cancel()
    with pytest.raises(asyncio.CancelledError):
        await going
    for pid in pids:
        await async_wait_until(lambda pid=pid: gone(pid), 10, f"{pid} ends")


async def test_what_a_script_leaves_running_when_it_exits_is_killed(tmp_path: Path) -> None:
    run = runner(tmp_path, {"a": {"command": "true", "pre": "sleep 300 & echo $! > bg.pid"}})
    ended = await run.run(RunScript("a", "pre", 1, 0))
    assert ended.exit_code == 0
    pid = int((tmp_path / "bg.pid").read_text())
    await async_wait_until(lambda: gone(pid), 10, "the background sleep ends")
