"""`Commands`, the one seam every external command of a backend goes through: what a test
observes, what a user reads when a command fails, and that nothing outlives its caller."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from bonjourgrid.backends.base import CommandFailed, Commands
from tests.waiting import async_wait_until


async def test_every_command_is_observed_in_order() -> None:
    seen: list[tuple[str, ...]] = []
    commands = Commands(observer=seen.append)
    done = await commands.run(["sh", "-c", "echo out; echo err >&2"])
    await commands.run(["true"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    assert commands.history == seen == [("sh", "-c", "echo out; echo err >&2"), ("true",)]


async def test_a_failing_command_says_what_ran_and_what_it_said() -> None:
    commands = Commands()
    with pytest.raises(CommandFailed, match=r"sh -c echo nope >&2; exit 3 exited 3: nope"):
        await commands.run(["sh", "-c", "echo nope >&2; exit 3"])
    unchecked = await commands.run(["sh", "-c", "exit 4"], check=False)
    assert unchecked.returncode == 4


async def test_a_missing_program_is_named_with_what_to_do() -> None:
    with pytest.raises(CommandFailed, match=r"no-such-program-bgrid: not found .*installed"):
        await Commands().run(["no-such-program-bgrid"])


async def test_a_command_whose_caller_gives_up_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    running = asyncio.ensure_future(
        Commands().run(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"])
    )
    await async_wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 10,
                           "the command started")  # fmt: skip
    pid = int(pid_file.read_text())
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_spawned_daemons_stop_with_their_group_at_close(tmp_path: Path) -> None:
    commands = Commands()
    log = tmp_path / "daemon.log"
    daemon = await commands.spawn(["sh", "-c", "sleep 60 & echo started; wait"], log=log)
    await async_wait_until(lambda: log.exists() and "started" in log.read_text(), 10,
                           "the daemon started")  # fmt: skip
    group = [p for p in psutil.process_iter() if _pgid(p) == daemon.pid]
    assert len(group) >= 2  # sh and its sleep
    await commands.close()
    assert daemon.returncode is not None
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (OSError, psutil.Error):
        return None
