"""Service runs: a middleware daemon (munged, slurmd, condor_master) on this peer, under a lease.

Theory of operation. A backend's deployment asks a recruited peer to run a long-lived daemon
(`service_start`, protocol/messages.py). The worker core admits it from the job holding the
lease only and stops it whenever that lease ends; this module is what the daemon does with
one:

- a private directory per service (0700), a sibling of the task sandboxes, laid out as a task's
  is: `workdir/service/` is the daemon's `{dir}` (its cwd and HOME), its stdout and stderr go to
  `workdir/log` beside it, where no file the coordinator sends can reach;
- the config files written there (secrets 0600, written as they came), free TCP ports picked on
  the peer's address (held bound until the moment the daemon starts, so two services of one
  peer never get the same one), and `{dir}`, `{host}`, `{port:NAME}` substituted in the
  command line, the files and the environment (`substitute`);
- the command in a session of its own, at the desktop's lowest priority, carrying the same
  marker as a task (worker/reaper.py): stopping it ends its process group and everything that
  carries the marker, and a daemon restarted after a crash kills what its previous life left
  running (its marker names a directory under the cache's sandboxes);
- `service_up` once `ready_file` exists (at once without one), or `service_failed` with the end
  of its log if it exits first or is not ready by `READY_TIMEOUT_S`. The daemon must stay in
  the foreground (`munged -F`, `slurmd -D`, `condor_master -f`): a process that forks into
  the background and exits has ended, as far as the worker can tell.

- with `task_steps` (a Slurm slurmd), a socket in `{dir}` through which its jobs claim the
  job's external runs, and the `{dir}/task-step` command that claims one
  (worker/task_steps.py); both exist before the daemon starts and go when it stops.

It stops like a task: SIGTERM to its group, STOP_GRACE_S, SIGKILL; then its directory goes.

`ServiceRuns` holds a daemon's services, each with the asyncio task that supervises it from
start to end, and tells the core what became of them (`ServiceIsUp`, `ServiceStartFailed`,
`ServiceEnded`). A service the core stopped leaves the table at once; its end is reported by
the stop, so a late report of its supervisor never reaches a later service of that name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from bonjourgrid.protocol import (
    SERVICE_PLACEHOLDER,
    SERVICE_READY_S,
    ServiceExited,
    ServiceStart,
    ServiceUp,
)
from bonjourgrid.worker import core, reaper
from bonjourgrid.worker.limits import Limits, task_preexec
from bonjourgrid.worker.sandbox import STOP_GRACE_S, read_tail
from bonjourgrid.worker.task_steps import TaskSteps

log = logging.getLogger(__name__)

READY_TIMEOUT_S = SERVICE_READY_S  # a daemon not ready by then failed to start
_READY_POLL_S = 0.05  # how often the ready file is looked for
LOG_TAIL = 16 * 1024  # bytes of a service's log that a `service_failed`/`service_exited` carries
# Where the system's daemons live on Debian and most distributions, even when a desktop
# user's PATH lacks them.
SYSTEM_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class ServiceStartError(Exception):
    """The service could not start; the message goes back in `service_failed`."""


def substitute(text: str, directory: str, host: str, ports: Mapping[str, int]) -> str:
    """`text` with `{dir}`, `{host}` and `{port:NAME}` replaced; other braces stay as they are.
    A port not in `ports` is a KeyError (the message's checks refuse that before)."""

    def value(match: re.Match[str]) -> str:
        if match[1] == "dir":
            return directory
        if match[1] == "host":
            return host
        return str(ports[match[2]])

    return SERVICE_PLACEHOLDER.sub(value, text)


def pick_ports(host: str, names: tuple[str, ...]) -> tuple[dict[str, int], list[socket.socket]]:
    """A free TCP port on `host` for each name, and the sockets holding them: the caller
    closes those just before the service starts, so no other pick takes the same port."""
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, 0))
            ports[name] = sock.getsockname()[1]
    except OSError:
        for sock in held:
            sock.close()
        raise
    return ports, held


class ServiceRun:
    """One service on this peer, from `start()` to `stop()`; `workdir` is its own (fresh)."""

    def __init__(
        self,
        job: str,
        spec: ServiceStart,
        workdir: Path,
        host: str,
        steps: TaskSteps | None = None,
    ) -> None:
        self.job = job
        self.steps = steps if spec.task_steps else None  # where its jobs' claims go
        self.name = spec.name
        self.spec = spec
        self.host = host
        self.workdir = workdir
        self.directory = workdir / "service"
        self.log_path = workdir / "log"
        self.marker = str(workdir.resolve())
        self.ports: dict[str, int] = {}
        self.exit_code: int | None = None  # None: its process never started
        self.final_log = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._stopped = False

    async def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> dict[str, int]:
        """Write its files, pick its ports, start it, wait until it is ready: its ports.
        ServiceStartError (the process stopped again) when it cannot."""
        spec = self.spec
        try:
            self.workdir.chmod(0o700)
            self.directory.mkdir(mode=0o700)
            self.ports, held = pick_ports(self.host, spec.ports)
        except OSError as err:
            raise ServiceStartError(f"could not prepare its directory or ports: {err}") from None
        if spec.task_steps:
            try:
                if self.steps is None:
                    raise OSError("this worker takes no task-step claims")
                await self.steps.open(self.job, self.directory)
            except OSError as err:
                for sock in held:
                    sock.close()
                raise ServiceStartError(f"could not open its task-step socket: {err}") from None
        try:
            here = str(self.directory)
            for rel, text in spec.files.items():
                _write(self.directory, rel, substitute(text, here, self.host, self.ports).encode())
            for rel, data in spec.secrets.items():
                _write(self.directory, rel, data, secret=True)
            argv = [substitute(word, here, self.host, self.ports) for word in spec.argv]
            env = {
                "PATH": _path_with_sbin(os.environ.get("PATH", "/usr/bin:/bin")),
                "HOME": here,
                "TMPDIR": here,
                "LANG": "C.UTF-8",
                "BGRID_JOB": self.job,
                "BGRID_SERVICE": self.name,
                **{k: substitute(v, here, self.host, self.ports) for k, v in spec.env.items()},
                reaper.MARKER: self.marker,  # last: the backend's env cannot remove it
            }
        except OSError as err:
            for sock in held:
                sock.close()
            raise ServiceStartError(f"could not write its files: {err}") from None
        with open(self.log_path, "wb") as log:
            for sock in held:  # the daemon binds them now
                sock.close()
            if self._stopped:
                raise ServiceStartError("stopped before it started")
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=self.directory,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    preexec_fn=_service_preexec(),
                )
            except OSError as err:
                raise ServiceStartError(
                    f"{argv[0]!r} could not start on this peer: {err.strerror or err} "
                    f"(is it installed? PATH: {env['PATH']})"
                ) from None
        await self._wait_ready(ready_timeout_s)
        return self.ports

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        ready = self.spec.ready_file
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._stopped:  # a stop that came while it was being started
                raise ServiceStartError("stopped before it was ready")
            if not ready or (self.directory / ready).exists():
                return
            if self.proc.returncode is not None:
                raise ServiceStartError(
                    f"{self.spec.argv[0]!r} exited ({self.proc.returncode}) before it wrote "
                    f"{ready!r}; its log ends: {self.log_tail()[-2000:]!r}"
                )
            if loop.time() >= deadline:
                raise ServiceStartError(
                    f"{self.spec.argv[0]!r} did not write {ready!r} within {timeout_s:g} s; "
                    f"its log ends: {self.log_tail()[-2000:]!r}"
                )
            await asyncio.sleep(_READY_POLL_S)  # the loop's child watcher sets returncode

    async def wait(self) -> int:
        """Until its process ends (stopped, or on its own): its exit code (-N: signal N)."""
        assert self.proc is not None
        self.exit_code = await self.proc.wait()
        return self.exit_code

    async def stop(self) -> None:
        """End its process group and everything carrying its marker: SIGTERM, grace, SIGKILL."""
        self._stopped = True
        if self.steps is not None:  # no more claims through it (runs claimed go on)
            await self.steps.close(self.directory)
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.exit_code = await proc.wait()
        # Daemons fork and call setsid: those carry the marker still. What they start that
        # clears its environment (slurmstepd) works in the service's directory.
        await asyncio.to_thread(reaper.kill_marked, self.marker)
        await asyncio.to_thread(reaper.kill_working_in, self.workdir)
        reaper.reap_group(proc.pid)

    def log_tail(self, limit: int = LOG_TAIL) -> str:
        return read_tail(self.log_path, limit)[0].decode("utf-8", "replace")

    async def remove(self) -> None:
        """Its directory goes (after `stop`); the end of its log is kept in `final_log`."""
        self.final_log = self.log_tail()
        await asyncio.to_thread(shutil.rmtree, self.workdir, True)


def _service_preexec() -> Callable[[], None]:
    """The desktop's lowest priority, as a task; and the daemon dies with its worker (even
    on `kill -9`): nothing else could stop it at lease expiry."""
    lowest = task_preexec(Limits())

    def apply() -> None:
        lowest()
        reaper.stop_with_parent(os.getppid())

    return apply


def _write(root: Path, rel: str, data: bytes, secret: bool = False) -> None:
    """Write `data` at `rel` under `root` (relative and normalized: checked at decode), never
    through a symlink or over an existing file."""
    path = root / rel
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with open(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if secret else 0o644)  # whatever the umask took away or left


def _path_with_sbin(path: str) -> str:
    parts = path.split(os.pathsep)
    return os.pathsep.join([*parts, *(d for d in SYSTEM_SBIN if d not in parts)])


Report = Callable[[core.Event], Awaitable[None]]


class ServiceRuns:
    """The service runs of one worker daemon, started and stopped as its core instructs."""

    def __init__(
        self,
        sandboxes: Path,
        host: Callable[[], str],
        report: Report,
        steps: TaskSteps | None = None,
    ) -> None:
        self.sandboxes = sandboxes  # a daemon restarted after a crash kills what runs there
        self.steps = steps  # where claims of services with task_steps go
        self.host = host  # the peer's address, for {host} and the ports
        self.report = report
        # (job, service name) -> the run and the task supervising it until it ends
        self.runs: dict[tuple[str, str], tuple[ServiceRun, asyncio.Task[None]]] = {}
        self._stops: set[asyncio.Task[None]] = set()
        self._closing = False  # the daemon stops: nothing is reported any more

    def __bool__(self) -> bool:
        return bool(self.runs)

    def start(self, job: str, spec: ServiceStart) -> None:
        """core.StartService: prepare and start it in the background."""
        key = (job, spec.name)
        try:
            self.sandboxes.mkdir(exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="service-", dir=self.sandboxes))
            run = ServiceRun(job, spec, workdir, self.host(), self.steps)
        except Exception as err:  # no directory, or no address: a report goes back
            why = f"the worker could not prepare it: {err}"
            self._later(self.report(core.ServiceStartFailed(job, spec.name, why)))
            return
        self.runs[key] = (run, asyncio.create_task(self._supervise(key, run)))

    def stop(self, job: str, name: str, reason: str) -> None:
        """core.StopService: stop it with its process group, then report its end."""
        entry = self.runs.pop((job, name), None)
        if entry is not None:
            log.info("stopping service %s of job %s: %s", name, job, reason)
            self._later(self._stop(*entry))

    async def close(self) -> None:
        """The daemon stops: every service with it, directories removed."""
        self._closing = True
        entries = list(self.runs.values())
        self.runs.clear()
        await asyncio.gather(*(run.stop() for run, _ in entries))
        await asyncio.gather(*(task for _, task in entries), *self._stops, return_exceptions=True)

    def _mine(self, key: tuple[str, str], run: ServiceRun) -> bool:
        """Whether `run` is still the one under `key`: not stopped meanwhile."""
        entry = self.runs.get(key)
        return entry is not None and entry[0] is run and not self._closing

    async def _supervise(self, key: tuple[str, str], run: ServiceRun) -> None:
        job, name = key
        try:
            ports = await run.start()
        except Exception as err:  # whatever it was, the coordinator hears of it
            if not isinstance(err, ServiceStartError):
                log.exception("service %s of job %s: the worker could not start it", name, job)
                err = ServiceStartError(f"the worker could not start it: {err!r}")
            await run.stop()
            await run.remove()
            if self._mine(key, run):
                del self.runs[key]
                log.warning("service %s of job %s did not start: %s", name, job, err)
                await self.report(core.ServiceStartFailed(job, name, str(err)[:10_000]))
            return
        if self._mine(key, run):
            log.info("service %s of job %s is up (ports %s)", name, job, ports)
            up = ServiceUp(job, name, ports, str(run.directory))
            await self.report(core.ServiceIsUp(job, name, up))
        code = await run.wait()
        await run.stop()  # what it left behind in its group, or carrying its marker
        await run.remove()
        if self._mine(key, run):
            del self.runs[key]
            log.warning("service %s of job %s exited on its own (%d)", name, job, code)
            ended = ServiceExited(job, name, code, False, run.final_log)
            await self.report(core.ServiceEnded(job, name, ended))

    async def _stop(self, run: ServiceRun, supervisor: asyncio.Task[None]) -> None:
        await run.stop()
        await asyncio.gather(supervisor, return_exceptions=True)  # its directory is gone then
        if self._closing:
            return
        code = run.exit_code if run.exit_code is not None else 0  # 0: it never began
        ended = ServiceExited(run.job, run.name, code, True, run.final_log)
        await self.report(core.ServiceEnded(run.job, run.name, ended))

    def _later(self, step: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(step)
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)
