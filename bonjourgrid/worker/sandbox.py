"""Running one task: inputs into a private directory, the command, outputs into the store.

A task's sandbox is a fresh directory holding hard links to its inputs at their declared
relative paths. The command runs there under /bin/sh in a session (process group) of its
own, so stopping it stops everything it started. Declared outputs must be regular files
inside the sandbox; they are moved into the content store and reported by digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bonjourgrid import wire
from bonjourgrid.cache.local import CacheFullError, LocalCache
from bonjourgrid.cache.store import FileRef, is_digest
from bonjourgrid.cache.transfer import Fetcher, Source
from bonjourgrid.errors import ProtocolError, TransferError
from bonjourgrid.worker.limits import Limits, limits_from_wire

log = logging.getLogger(__name__)

# Between SIGTERM and SIGKILL of a task's process group: with the daemon's owner sampling
# period (0.2 s), a returning owner gets the machine back within a second.
STOP_GRACE_S = 0.5
_STDERR_TAIL = 2000  # characters of stderr kept in a report
_MAX_PARALLEL_FETCHES = 4
_DISK_FULL_BYTES = 1024 * 1024  # a failed task on a disk with less free than this: disk full


@dataclass(frozen=True)
class TaskInput:
    path: str
    ref: FileRef
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class RunSpec:
    """What a `run` message asks for, checked."""

    command: str
    inputs: tuple[TaskInput, ...]
    outputs: tuple[str, ...]
    env: dict[str, str]
    limits: Limits


def safe_relative(path: str) -> str:
    """`path` if it is relative and stays inside the sandbox; ProtocolError otherwise."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\x00" in path
        or pure.is_absolute()
        or ".." in pure.parts
        or path.startswith("~")
    ):
        raise ProtocolError(f"path {path[:200]!r} would escape the task directory")
    return str(pure)


def parse_spec(msg: dict[str, Any]) -> RunSpec:
    """The task in a decoded `run` message; ProtocolError if any part is malformed."""
    inputs = []
    for path, digest, size, sources in wire.check_list(
        msg["inputs"], (str, str, int, list), "input"
    ):
        if not is_digest(digest) or size < 0:
            raise ProtocolError(f"input {path!r} has a bad digest or size")
        srcs = tuple(Source(*s) for s in wire.check_list(sources, (str, str, str), "source"))
        inputs.append(TaskInput(safe_relative(path), FileRef(digest, size), srcs))
    outputs = tuple(
        safe_relative(p)
        for (p,) in wire.check_list([[o] for o in msg["outputs"]], (str,), "output")
    )
    paths = [i.path for i in inputs] + list(outputs)
    if len(set(paths)) != len(paths):
        raise ProtocolError("a path is listed twice among the task's inputs and outputs")
    env = wire.str_mapping(msg["env"], "env")
    if any("\x00" in k or "=" in k or not k or "\x00" in v for k, v in env.items()):
        raise ProtocolError("env names must be non-empty without '=' or NUL; values without NUL")
    if "\x00" in msg["command"]:
        raise ProtocolError("the command contains a NUL byte")
    return RunSpec(msg["command"], tuple(inputs), outputs, env, limits_from_wire(msg["limits"]))


class TaskRun:
    """One attempt of one task on this peer; `stop()` ends it from outside.

    Layout: `workdir/sandbox/` is the task's directory (its cwd), and its stdout and stderr
    go to `workdir/` beside it, where no declared path can reach them.
    """

    def __init__(
        self,
        job: str,
        task: str,
        attempt: int,
        spec: RunSpec,
        workdir: Path,
        store: LocalCache,
        fetcher: Fetcher,
        inflight: dict[str, asyncio.Task[None]],
    ) -> None:
        self.job, self.task, self.attempt = job, task, attempt
        self.spec = spec
        self.workdir = workdir
        self.sandbox = workdir / "sandbox"
        self.store = store
        self.fetcher = fetcher
        self._inflight = inflight  # digest -> its fetch, shared by the daemon's runs
        self._proc: asyncio.subprocess.Process | None = None
        self._stopped = False

    async def execute(self) -> dict[str, Any]:
        """Fetch, run, store; the fields of the `task_done` report. Never raises."""
        report: dict[str, Any] = {
            "job": self.job,
            "task": self.task,
            "attempt": self.attempt,
            "exit_code": -1,
            "outputs": [],
            "stderr_tail": "",
            "error": "",
            "fetch_s": 0.0,
            "run_s": 0.0,
            "bytes_fetched": 0,
        }
        started = time.monotonic()
        for item in self.spec.inputs:  # no input may be evicted while this task needs it
            self.store.pin(item.ref.digest)
        try:
            report["bytes_fetched"] = await self._stage_inputs()
            report["fetch_s"] = time.monotonic() - started
            before = {i.ref.digest: self.store.fingerprint(i.ref.digest) for i in self.spec.inputs}
            started = time.monotonic()
            report["exit_code"] = await self._run_command()
            report["run_s"] = time.monotonic() - started
            self._evict_changed_inputs(before)
            report["stderr_tail"] = self._stderr_tail()
            report["error"] = self.spec.limits.explain(report["exit_code"], report["stderr_tail"])
            if report["exit_code"] != 0 and not report["error"] and self._disk_full():
                # The command's own complaint may be lost: its stderr file is on that disk.
                report["error"] = self._disk_full_message("No space left on device")
            if report["exit_code"] == 0:
                # Hashing a big output takes seconds: off the loop, heartbeats keep flowing.
                report["outputs"] = await asyncio.to_thread(self._store_outputs)
        except CacheFullError as err:
            report["error"] = f"{err.strerror}; the task should run on another peer"
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                report["error"] = self._disk_full_message(err.strerror or "no space left")
            else:
                report["error"] = str(err)
        except (TransferError, OutputError) as err:
            report["error"] = str(err)
        except Exception as err:  # the promise: a report always goes back, whatever happened
            log.exception("task %s/%s failed in the worker", self.job, self.task)
            report["error"] = f"the worker could not run the task: {type(err).__name__}: {err}"
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            for item in self.spec.inputs:
                self.store.unpin(item.ref.digest)
        return report

    def _disk_full(self) -> bool:
        try:
            return shutil.disk_usage(self.workdir).free < _DISK_FULL_BYTES
        except OSError:
            return False

    def _disk_full_message(self, detail: str) -> str:
        return (
            f"this peer's disk is full ({self.workdir.parent}): {detail}; "
            "the task should run on another peer"
        )

    async def _stage_inputs(self) -> int:
        self.sandbox.mkdir(parents=True)
        limit = asyncio.Semaphore(_MAX_PARALLEL_FETCHES)

        async def fetch(item: TaskInput) -> None:
            async with limit:
                self.store.admit(item.ref.size, f"input {item.path!r}")
                partial = self.store.incoming_path(item.ref.digest)
                await self.fetcher.fetch(item.ref, item.sources, partial)
                self.store.commit(partial, item.ref.digest)

        async def stage(item: TaskInput) -> int:
            digest = item.ref.digest
            # Off the loop: an entry changed on disk is hashed again (and dropped if corrupt).
            if await asyncio.to_thread(self.store.has, item.ref):
                return 0
            shared = self._inflight.get(digest)
            if shared is not None:  # another task on this peer is fetching the same bytes
                await asyncio.shield(shared)
                return 0
            mine = self._inflight[digest] = asyncio.ensure_future(fetch(item))
            try:
                await asyncio.shield(mine)
            finally:
                if self._inflight.get(digest) is mine:
                    del self._inflight[digest]
            return item.ref.size

        fetched = sum(await asyncio.gather(*(stage(i) for i in self.spec.inputs)))
        for item in self.spec.inputs:
            self.store.link_into(item.ref.digest, self.sandbox / item.path)
            self.store.touch(item.ref.digest)
        return fetched

    def _evict_changed_inputs(self, before: dict[str, tuple[int, int]]) -> None:
        # Inputs are hard links into the store. A task running with enough rights (root
        # ignores the read-only mode) can write through one: never serve those bytes again.
        for digest, seen in before.items():
            try:
                changed = self.store.fingerprint(digest) != seen
            except FileNotFoundError:
                continue
            if changed:
                log.warning(
                    "task %s/%s modified its input %s: dropped from the cache",
                    self.job,
                    self.task,
                    digest[:12],
                )
                self.store.evict(digest)

    async def _run_command(self) -> int:
        if self._stopped:
            raise OutputError("stopped before it started")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.sandbox),
            "TMPDIR": str(self.sandbox),
            "LANG": "C.UTF-8",
            "BGRID_JOB": self.job,
            "BGRID_TASK": self.task,
            "BGRID_ATTEMPT": str(self.attempt),
            **self.spec.env,
        }
        with (
            open(self.workdir / "stdout", "wb") as out,
            open(self.workdir / "stderr", "wb") as err,
        ):
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    self.spec.command,
                    cwd=self.sandbox,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=self.spec.limits.preexec(),  # why a preexec: worker/limits.py
                )
            except OSError as failure:
                if self.spec.limits == Limits():
                    raise
                raise OutputError(
                    f"the command could not start under its limits "
                    f"({self.spec.limits.describe()}): {failure.strerror or failure}"
                ) from None
        code = await self._proc.wait()
        # What the shell left running in the background must not outlive the task: it would
        # keep the owner's CPU busy after the job, and could change the sandbox while the
        # outputs are checked and moved into the store.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        return code

    def _stderr_tail(self) -> str:
        path = self.workdir / "stderr"
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - _STDERR_TAIL))
            return f.read().decode("utf-8", "replace")

    def _store_outputs(self) -> list[list[Any]]:
        stored = []
        root = self.sandbox.resolve()
        for rel in self.spec.outputs:
            path = self.sandbox / rel
            if not path.exists() and not path.is_symlink():
                raise OutputError(f"the command exited 0 but did not write its output {rel!r}")
            if path.is_symlink() or not path.is_file():
                raise OutputError(
                    f"output {rel!r} is not a regular file (symlink, directory or device): refused"
                )
            if root not in path.resolve().parents:
                raise OutputError(f"output {rel!r} lies outside the task directory: refused")
            self.store.admit(path.stat().st_size, f"output {rel!r}")
            ref = self.store.adopt(path)
            stored.append([rel, ref.digest, ref.size])
        return stored

    async def stop(self) -> None:
        """Stop the command and all it started: SIGTERM, a grace period, then SIGKILL."""
        self._stopped = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        # The shell may be gone while its children linger in the group: end them all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class OutputError(Exception):
    """A task's outputs cannot be accepted; the message goes to the user's report."""
