"""Pre and post scripts (DAGMan's SCRIPT PRE/POST), run on the coordinator's host.

The core says when (`RunScript`) and hears how it went (`ScriptEnded`); this module runs one
script and says that. A script is the task's `pre` or `post` shell command, run by /bin/sh in
the submit directory joined with the task's `script_dir`, with the coordinator's environment
plus:
    BGRID_TASK         the task's name
    BGRID_RETRY        its failed attempts so far (0 for the first attempt)
    BGRID_MAX_RETRIES  its `retries`
    BGRID_RETURN       the command's exit code (post only; -1 when it never ran)
    BGRID_PRE_RETURN   the pre's exit code (post only; -1 when there is no pre)
    BGRID_FAILED_COUNT tasks failed for good when it starts; BGRID_DAG_STATUS 1 if any, else 0
                       (DAGMan's $FAILED_COUNT and $DAG_STATUS, for a FINAL node's scripts)

At most MAX_SCRIPTS of each kind run at once (DAGMan's default); the others wait their turn
in the order the core asked. Each script is a child of the coordinator in a session (process
group) of its own: its stdout and stderr go straight into files next to the task's logs
(`<task>.<attempt>.pre.out`, see logs.py), so the event loop never reads a pipe and never
waits for one. When it exits, what it left behind in its group is killed; when the job stops
first (Ctrl-C, `bgrid cancel`, an error), the waiting coroutine is cancelled: the group gets
SIGTERM, then SIGKILL after `STOP_GRACE_S`, and the script is reaped before the coordinator
goes on. No script outlives its job.

What follows a script is checked here too, off the event loop: after a pre that exits 0, the
task's inputs from the submit directory are hashed again (the pre may have written them; a
missing one fails the attempt with staging's words); after a pre that skips the task
(`pre_skip`) or a post that exits 0, its declared outputs are hashed where they are (the post
may have rewritten them; a missing one fails the attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from bonjourgrid.cache.store import FileRef, hash_file
from bonjourgrid.coordinator.logs import LogKeeper
from bonjourgrid.coordinator.model import RunScript, ScriptEnded
from bonjourgrid.coordinator.stage import hash_deferred
from bonjourgrid.dag import Workflow
from bonjourgrid.errors import StageError

__all__ = ["MAX_SCRIPTS", "STOP_GRACE_S", "ScriptRunner", "script_env"]

STOP_GRACE_S = 2.0  # seconds a stopped script's group has between SIGTERM and SIGKILL
# Scripts of each kind running at once (DAGMan's DAGMAN_MAX_PRE_SCRIPTS/_POST_SCRIPTS default):
# 10,000 tasks ready together must not fork 10,000 shells on the submitting host.
MAX_SCRIPTS = {"pre": 20, "post": 20}


def script_env(order: RunScript, retries: int) -> dict[str, str]:
    """The variables a script sees on top of the coordinator's environment."""
    env = {
        "BGRID_TASK": order.task,
        "BGRID_RETRY": str(order.retry),
        "BGRID_MAX_RETRIES": str(retries),
    }
    if order.script == "post":
        env["BGRID_RETURN"] = str(order.returned)
        env["BGRID_PRE_RETURN"] = str(order.pre_returned)
    return env


class ScriptRunner:
    """Runs the pre and post scripts of one job's tasks."""

    def __init__(self, workflow: Workflow, logs: LogKeeper) -> None:
        self.workflow = workflow
        self.logs = logs
        # One rehash at a time: each reads and writes the submit directory's digest cache
        # (stage.py), whose writer is one per process, not one per thread.
        self._hashing = asyncio.Lock()
        self._slots = {kind: asyncio.Semaphore(n) for kind, n in MAX_SCRIPTS.items()}

    async def run(self, order: RunScript, failed: int = 0) -> ScriptEnded:
        """Run the script `order` names, `failed` tasks of the job failed for good so far;
        how it went, with what the core needs after it."""
        spec = self.workflow.tasks[order.task]
        command = spec.pre if order.script == "pre" else spec.post
        assert command is not None, f"{order.task} has no {order.script} script"
        try:
            async with self._slots[order.script]:
                env = {
                    **script_env(order, spec.retries),
                    "BGRID_FAILED_COUNT": str(failed),
                    "BGRID_DAG_STATUS": "1" if failed else "0",
                }
                code = await self._run(order, command, spec.script_dir, env)
        except OSError as err:
            error = f"{order.script} script could not start: {err.strerror or err}"
            self.logs.script_ended(order.task, order.attempt, order.script, None)
            return ScriptEnded(order.task, order.script, order.attempt, None, error)
        self.logs.script_ended(order.task, order.attempt, order.script, code)
        ended = ScriptEnded(order.task, order.script, order.attempt, code)
        root = self.workflow.root
        own = self._own_sources(order.task) if order.script == "pre" and code == 0 else []
        if order.script == "pre" and code == 0:
            try:
                async with self._hashing:
                    sources = await hash_deferred(self.workflow, own) if own else {}
            except StageError as err:
                return _with_error(ended, f"after its pre script: {err}")
            return ScriptEnded(order.task, "pre", order.attempt, 0, sources=sources)
        if code == (spec.pre_skip if order.script == "pre" else 0):
            try:
                outputs = await asyncio.to_thread(_hash_outputs, root, spec.outputs)
            except OSError as err:
                return _with_error(ended, f"after its {order.script} script: {err}")
            return ScriptEnded(order.task, order.script, order.attempt, code, outputs=outputs)
        return ended

    def _own_sources(self, task: str) -> list[str]:
        """The task's inputs read from the submit directory (no task makes them, no URL)."""
        workflow = self.workflow
        return [
            path
            for path in workflow.tasks[task].inputs
            if path not in workflow.producer and path not in workflow.urls
        ]

    async def _run(
        self, order: RunScript, command: str, script_dir: str, script_vars: dict[str, str]
    ) -> int:
        stdout, stderr = self.logs.script_paths(order.task, order.attempt, order.script, make=True)
        env = {**os.environ, **script_vars}
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            process = await asyncio.create_subprocess_shell(
                command,
                cwd=self.workflow.root / script_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: stopped whole, children included
            )
        try:
            code = await process.wait()
        except BaseException:  # cancelled (the job stops): nothing it started lives on
            await _stop_group(process)
            raise
        _kill_group(process.pid, signal.SIGKILL)  # what it left running in the background
        return code


def _with_error(ended: ScriptEnded, error: str) -> ScriptEnded:
    return ScriptEnded(ended.task, ended.script, ended.attempt, ended.exit_code, error)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the script's group, SIGKILL after the grace; the script reaped."""
    _kill_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(process.wait()), STOP_GRACE_S)
    _kill_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(process.wait())


def _hash_outputs(root: Path, outputs: tuple[str, ...]) -> tuple[tuple[str, FileRef], ...]:
    refs = []
    for path in outputs:
        if not (root / path).is_file():
            raise FileNotFoundError(f"declared output {path} is not in the submit directory {root}")
        refs.append((path, hash_file(root / path)))
    return tuple(refs)
