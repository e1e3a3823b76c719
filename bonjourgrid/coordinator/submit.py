"""`bgrid submit` as a library call: load, check, pick the grid, run, report.

`run_job` is the one engine: it runs a validated workflow and returns its report, printing
nothing. `submit` (the CLI) wraps it with a progress display, notices on stderr, the printed
summary and an exit code; `bonjourgrid.run` (api.py) with a typed Report and exceptions.

Settings come from the flags, then `bgrid.toml` in the submit directory, then the user's
`$XDG_CONFIG_HOME/bonjourgrid/config.toml` (the first that says wins, key by key):

```toml
[prefetch]
policy = "lookahead"          # none | lookahead | eager | critical-path  (--prefetch)
depth = 2                     # tasks planned ahead per peer  (--prefetch-depth)
max_bytes = "4GiB"            # bytes planned ahead per peer: a size or a number of bytes
broadcast_min_consumers = 4   # a file read by this many tasks goes to every peer up front; 0: never

[submit]
fetch_all = false             # bring intermediate outputs back too  (--fetch-all)

[schedule]                    # speculative copies of stragglers (coordinator/copies.py)
speculation_factor = 3        # a task running 3 x its finished siblings' median gets a copy
                              # on an idle peer; 0 (the default): never
speculation_min_s = 60        # ... and running at least this many seconds
speculation_min_siblings = 3  # ... once at least this many siblings have finished

[wfformat]                    # how a WfCommons WfFormat instance (.json) runs
programs = "stand-in"         # stand-in | recorded  (each task's command.program itself)
runtime_scale = 0.001         # seconds of stand-in CPU per recorded second
size_scale = 1.0              # stand-in output bytes per recorded byte
python = "python3"            # the interpreter that runs the stand-in, on the worker's PATH
```
An unknown table or key is an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import os
import shlex
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bonjourgrid.backends.base import load_backend
from bonjourgrid.coordinator.copies import SpeculationSettings
from bonjourgrid.coordinator.journal import ResumePlan, journal_path, plan_resume, workflow_digest
from bonjourgrid.coordinator.peers import LEASE_S, PEER_TIMEOUT_S, Timeouts
from bonjourgrid.coordinator.prefetch import POLICIES, DataOptions, PrefetchSettings
from bonjourgrid.coordinator.progress import Display, choose_display
from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.report import format_summary, write_report
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.coordinator.stage import stage_sources
from bonjourgrid.credentials import CredentialCheck, load_revoked
from bonjourgrid.dag import Workflow, load_workflow
from bonjourgrid.dag.loader import MAX_QUORUM
from bonjourgrid.dag.wfformat import PROGRAMS as WFFORMAT_PROGRAMS
from bonjourgrid.dag.wfformat import WfFormatOptions
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.errors import ConfigError, Interrupted, KeyStoreError
from bonjourgrid.fdlimit import raise_open_file_limit
from bonjourgrid.keys import INSECURE_FINGERPRINT, GridKey, key_dir, load_grid_key
from bonjourgrid.units import parse_size
from bonjourgrid.worker.local import LOOPBACK, LocalGrid

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A signal while tasks run cancels the job as `bgrid cancel` does (tasks stopped, peers
# released, a report): if that has not ended the run by then, the run is cut short.
INTERRUPT_GRACE_S = 0.5


@dataclass(frozen=True)
class SubmitOptions:
    """The settings of one run: `bgrid submit`'s flags, and `bonjourgrid.run`'s arguments."""

    workflow: Path | None = None  # None: a workflow built in memory (`bonjourgrid.run`)
    workers: tuple[int, int] | None = None
    require: str | None = None
    max_cost: float | None = None
    local: int | None = None  # run on N local worker daemons
    insecure: bool = False
    interface: str | None = None
    report: Path | None = None
    json: bool = False
    quiet: bool = False  # no progress: errors and the final summary only
    resume: bool = False  # keep the tasks the journal vouches for
    peer_timeout: float | None = None  # seconds of silence before a peer is lost
    lease: float | None = None  # seconds a peer stays ours without a heartbeat
    prefetch: str | None = None  # --prefetch POLICY; None: the config files say, else lookahead
    prefetch_depth: int | None = None
    fetch_all: bool | None = None  # --fetch-all / --no-fetch-all; None: the config files say
    quorum: int | None = None  # --quorum N: for the tasks that do not say (copies.py)
    backend: str = "native"  # what runs the tasks on the recruited peers (backends/)
    backend_options: dict[str, str] = field(default_factory=dict)  # e.g. {"pool": ADDRESS}
    # `--local`'s workers, already started by the caller (the CLI starts them before it
    # imports the coordinator); None: started here when needed.
    local_grid: LocalGrid | None = None


def parse_workers(text: str) -> tuple[int, int]:
    """`--workers` as (min, max): "3" means 1..3 and "2..5" means 2..5."""
    lo_text, sep, hi_text = text.partition("..")
    try:
        lo, hi = (int(lo_text), int(hi_text)) if sep else (1, int(lo_text))
    except ValueError:
        raise ConfigError(f"--workers {text!r}: write MIN..MAX (e.g. 2..8) or MAX") from None
    if lo < 1 or hi < lo:
        raise ConfigError(f"--workers {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


CONFIG_NAME = "bgrid.toml"  # in the submit directory
_COUNT = ((int,), "a whole number")
# Every setting of bgrid.toml / config.toml: its table, key, the TOML types it takes, in words.
_CONFIG: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "prefetch": {
        "policy": ((str,), "a string: " + ", ".join(POLICIES)),
        "depth": _COUNT,
        "max_bytes": ((int, str), 'a size such as "4GiB", or a number of bytes'),
        "broadcast_min_consumers": _COUNT,
    },
    "submit": {"fetch_all": ((bool,), "true or false")},
    "schedule": {
        "speculation_factor": ((int, float), "a number: 0 (never) or more than 1"),
        "speculation_min_s": ((int, float), "a number of seconds, 0 or more"),
        "speculation_min_siblings": _COUNT,
    },
    "wfformat": {
        "programs": ((str,), "a string: " + " or ".join(WFFORMAT_PROGRAMS)),
        "runtime_scale": ((int, float), "a number, 0 or more"),
        "size_scale": ((int, float), "a number, 0 or more"),
        "python": ((str,), "a Python 3 interpreter: a command on the worker's PATH or a path"),
    },
}


def user_config_path() -> Path:
    """The user's settings for every submit: $XDG_CONFIG_HOME/bonjourgrid/config.toml."""
    return key_dir() / "config.toml"


def read_config(path: Path) -> dict[str, tuple[Any, str]]:
    """The settings in a config file as {"table.key": (value, where)}; {} if there is none."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}; fix it there") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    found: dict[str, tuple[Any, str]] = {}
    for table, entries in data.items():
        known = _CONFIG.get(table)
        if known is None or not isinstance(entries, dict):
            what = f"table [{table}]" if isinstance(entries, dict) else f"key {table!r}"
            raise ConfigError(
                f"{path}: unknown {what}{_hint(table, _CONFIG)}; the settings go in "
                + " and ".join(f"[{name}]" for name in _CONFIG)
            )
        for key, value in entries.items():
            where = f"{path}: [{table}] {key}"
            if key not in known:
                raise ConfigError(f"{path}: unknown key {key!r} in [{table}]{_hint(key, known)}")
            types, wanted = known[key]
            # TOML booleans are not numbers here, whatever Python thinks of bool and int.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ConfigError(f"{where} = {value!r}: expected {wanted}")
            found[f"{table}.{key}"] = (value, where)
    return found


def _hint(word: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def data_options(
    submit_dir: Path,
    *,
    prefetch: str | None = None,
    depth: int | None = None,
    fetch_all: bool | None = None,
    user_config: Path | None = None,
) -> DataOptions:
    """The job's data options: the flags given (not None), then bgrid.toml, then the user's."""
    values = read_config(user_config or user_config_path())
    values.update(read_config(submit_dir / CONFIG_NAME))
    for key, flag, value in (
        ("prefetch.policy", "--prefetch", prefetch),
        ("prefetch.depth", "--prefetch-depth", depth),
        ("submit.fetch_all", "--fetch-all", fetch_all),
    ):
        if value is not None:
            values[key] = (value, flag)

    def count(key: str, default: int) -> int:
        if key not in values:
            return default
        value, where = values[key]
        if isinstance(value, str):  # max_bytes: a size such as "2GiB"
            try:
                value = parse_size(value)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        if value < 0:
            raise ConfigError(f"{_said(where, value)}: give a whole number, 0 or more")
        return int(value)

    defaults = PrefetchSettings()
    policy, where = values.get("prefetch.policy", (defaults.policy, ""))
    if policy not in POLICIES:
        raise ConfigError(f"{_said(where, policy)}: choose one of {', '.join(POLICIES)}")
    settings = PrefetchSettings(
        policy=policy,
        depth=count("prefetch.depth", defaults.depth),
        max_bytes=count("prefetch.max_bytes", defaults.max_bytes),
        broadcast_min_consumers=count(
            "prefetch.broadcast_min_consumers", defaults.broadcast_min_consumers
        ),
    )
    return DataOptions(settings, fetch_all=bool(values.get("submit.fetch_all", (False, ""))[0]))


def schedule_options(submit_dir: Path, *, user_config: Path | None = None) -> SpeculationSettings:
    """When a straggler gets a speculative copy: bgrid.toml's [schedule], then the user's."""
    values = read_config(user_config or user_config_path())
    values.update(read_config(submit_dir / CONFIG_NAME))
    defaults = SpeculationSettings()
    factor, where = values.get("schedule.speculation_factor", (defaults.factor, ""))
    if factor != 0 and factor <= 1:
        raise ConfigError(f"{_said(where, factor)}: give 0 (never) or a factor above 1")
    min_s, where = values.get("schedule.speculation_min_s", (defaults.min_runtime_s, ""))
    if min_s < 0:
        raise ConfigError(f"{_said(where, min_s)}: give a number of seconds, 0 or more")
    siblings, where = values.get("schedule.speculation_min_siblings", (defaults.min_siblings, ""))
    if siblings < 1:
        raise ConfigError(f"{_said(where, siblings)}: give a whole number, 1 or more")
    return SpeculationSettings(float(factor), float(min_s), int(siblings))


def load_submitted(path: Path) -> Workflow:
    """A workflow file as `bgrid submit` reads it: with the settings of its directory's
    bgrid.toml and the user's config (a WfFormat instance's `[wfformat]`).
    ConfigError or DagError (exit 2) when something is wrong."""
    return load_workflow(path, wfformat=wfformat_options(path.resolve().parent))


def wfformat_options(submit_dir: Path, *, user_config: Path | None = None) -> WfFormatOptions:
    """How a WfFormat instance runs: bgrid.toml's [wfformat], then the user's, then defaults."""
    values = read_config(user_config or user_config_path())
    values.update(read_config(submit_dir / CONFIG_NAME))
    said = {key[9:]: value for key, value in values.items() if key.startswith("wfformat.")}
    for key, (value, where) in said.items():
        try:
            WfFormatOptions(**{key: value})  # checked alone, so the message names its file
        except ConfigError as err:
            raise ConfigError(f"{where.rsplit(': [', 1)[0]}: {err}") from None
    return WfFormatOptions(**{key: value for key, (value, _) in said.items()})


def _said(where: str, value: object) -> str:
    """`--flag VALUE` or `FILE: [table] key = VALUE`, for a message."""
    return f"{where} {value}" if where.startswith("--") else f"{where} = {value!r}"


def submit(opts: SubmitOptions) -> int:
    """Run the workflow; print or write the report; the process exit code.

    SIGINT and SIGTERM stop it within a second in every phase, with exit 130 or 143 (128 +
    the signal, as a shell reports it): before tasks run, Interrupted, every reserved peer
    released; once tasks run, the job is cancelled and reported as such, and stderr says
    the `--resume` command that goes on from there.
    """
    assert opts.workflow is not None, "bgrid submit runs a workflow file"
    raise_open_file_limit()  # one descriptor per peer connection and staged file
    with signals_interrupt():
        workflow = load_submitted(opts.workflow)  # exit 2 before any peer is touched
        source = JobSource(workflow, workflow_digest(opts.workflow), opts.workflow)
        display = choose_display(opts.quiet, opts.json)  # a terminal's live panel, or lines
        report = run_job(source, opts, notify=_tell_stderr, display=display)
    if opts.json:
        # Streamed: the text of a 100,000-task report is not built whole in memory first.
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_summary(report))
    if report["status"] != "succeeded" and report.get("signal") in signal.Signals.__members__:
        sig = signal.Signals[report["signal"]]
        print(f"bgrid: to go on from there: {resume_command(opts)}", file=sys.stderr)
        return 128 + int(sig)
    exit_status = report.get("exit_status")  # an abort_on status, or 0/1 by the status
    if isinstance(exit_status, int):
        return exit_status
    return 0 if report["status"] == "succeeded" else 1


def _tell_stderr(notice: str) -> None:
    print(f"bgrid: {notice}", file=sys.stderr)


@dataclass(frozen=True)
class JobSource:
    """A validated workflow and where it came from, as its journal and messages need them."""

    workflow: Workflow
    digest: str  # SHA-256 of the workflow file; of the canonical mapping when built in memory
    file: Path | None = None  # None: built in memory (`bonjourgrid.Workflow`)


def run_job(
    source: JobSource,
    opts: SubmitOptions,
    *,
    notify: Callable[[str], None],
    display: Display | None = None,
) -> dict[str, Any]:
    """Run a validated workflow to its end and return its report (written to `opts.report` too).

    The one implementation behind `bgrid submit` and `bonjourgrid.run`. It prints nothing
    itself: `notify` gets each notice (a local grid chosen for want of a key, what a resume
    keeps), `display` the progress. Raises ConfigError, StageError, RecruitError... before
    tasks run, Interrupted on SIGINT/SIGTERM before they run; once they run, a signal
    cancels the job and the report says so under "signal". The caller handles the signals
    (`signals_interrupt`).
    """
    workflow = source.workflow
    data = data_options(  # ConfigError (exit 2), before any peer is touched
        workflow.root, prefetch=opts.prefetch, depth=opts.prefetch_depth, fetch_all=opts.fetch_all
    )
    speculation = schedule_options(workflow.root)
    if opts.quorum is not None and not 1 <= opts.quorum <= MAX_QUORUM:
        raise ConfigError(f"--quorum {opts.quorum}: give a whole number from 1 to {MAX_QUORUM}")
    timeouts = Timeouts(
        PEER_TIMEOUT_S if opts.peer_timeout is None else opts.peer_timeout,
        LEASE_S if opts.lease is None else opts.lease,
    )
    plan = None
    if opts.resume:
        url_refs = None
        if workflow.urls:  # what the URLs hold now decides whether their readers rerun
            staged = _run_until_signal(
                lambda: stage_sources(workflow, {}), "while checking the URL inputs"
            )
            url_refs = {path: staged[path].ref for path in workflow.urls if path in staged}
        plan = plan_resume(
            workflow, source.file, url_refs, local=_runs_locally(opts), digest=source.digest
        )
    if plan is not None:
        for line in _resume_notice(workflow, plan):
            notify(line)
    job = _Job(source, opts, timeouts, plan, data, display, speculation)
    if plan is not None and len(plan.kept) == len(workflow.tasks):
        # Nothing left to run: no grid, no key, no local workers.
        report = job.run(None, None, None, None)
    else:
        report = _run_on_a_grid(job, notify)
    if opts.report is not None:
        write_report(opts.report, report)
    return report


def resume_command(opts: SubmitOptions) -> str:
    """The `bgrid submit ... --resume` command line that goes on with this job."""
    words = ["bgrid", "submit", str(opts.workflow)]
    for flag, value in (
        ("--local", opts.local),
        ("--workers", f"{opts.workers[0]}..{opts.workers[1]}" if opts.workers else None),
        ("--require", opts.require),
        ("--max-cost", opts.max_cost),
        ("--interface", opts.interface),
        ("--report", opts.report),
    ):
        if value is not None:
            words += [flag, str(value)]
    words += ["--insecure"] if opts.insecure else []
    return shlex.join([*words, "--resume"])


def _runs_locally(opts: SubmitOptions) -> bool:
    """Whether this submit will run on a new local grid (as `_run_on_a_grid` decides)."""
    if opts.local is not None:
        return True
    if opts.insecure:
        return False
    try:
        load_grid_key(need_secret=True)
    except KeyStoreError:
        return not (key_dir() / "grid.key").exists()
    return False


def _run_on_a_grid(job: _Job, notify: Callable[[str], None]) -> dict[str, Any]:
    """Run on the configured grid, or on a local one when asked or when none is configured."""
    opts = job.opts
    local = opts.local
    grid: GridKey | None = None
    if local is None and not opts.insecure:
        try:
            grid = load_grid_key(need_secret=True)
        except KeyStoreError:
            if (key_dir() / "grid.key").exists():
                raise
            local = min(4, os.cpu_count() or 1)
            notify(
                f"no grid key in {key_dir()}: running on a local grid of {local} "
                "workers (`bgrid keys init` creates a grid for the LAN)"
            )
    if local is None:
        return job.run(grid, opts.interface, None, None)
    if local < 1:
        raise ConfigError("--local N needs N >= 1")
    with contextlib.ExitStack() as stack:
        cluster = opts.local_grid
        if cluster is None:
            cluster = stack.enter_context(LocalGrid(local))
        report = job.run(cluster.grid, LOOPBACK, local, (1, local))
        if report["status"] != "succeeded":
            log.debug("local workers said:\n%s", cluster.logs())
    return report


def admission(grid: GridKey) -> Callable[[PeerRecord], str | None]:
    """Who of the grid's peers may be sent anything: enrolled and not revoked."""
    check = CredentialCheck(grid, load_revoked())
    return lambda peer: check.refusal(peer.name, peer.key, peer.cred)


def _resume_notice(workflow: Workflow, plan: ResumePlan) -> list[str]:
    """What a resumed run keeps and why the rest runs again, line by line."""
    where = journal_path(workflow).relative_to(workflow.root)
    lines = [
        f"resuming job {plan.journal.job} from {where}: {len(plan.kept)} of "
        f"{len(workflow.tasks)} task(s) kept"
    ]
    if plan.workflow_changed:
        lines.append(
            "the workflow file changed since then: a task whose command, files or "
            "environment changed runs again, and so does every task after it"
        )
    for name, why in sorted(plan.rerun.items())[:10]:
        lines.append(f"{name} runs again: {why}")
    if len(plan.rerun) > 10:
        lines.append(f"... and {len(plan.rerun) - 10} more recorded tasks run again")
    return lines


@dataclass(frozen=True)
class _Job:
    """One job's settings, as decided before a grid is chosen."""

    source: JobSource
    opts: SubmitOptions
    timeouts: Timeouts
    plan: ResumePlan | None
    data: DataOptions
    display: Display | None
    speculation: SpeculationSettings

    def run(
        self,
        grid: GridKey | None,
        interface: str | None,
        expected: int | None,
        default_workers: tuple[int, int] | None,
    ) -> dict[str, Any]:
        """Run on `grid` (None: --insecure peers, or nothing left to run); the report."""
        opts, workflow, display = self.opts, self.source.workflow, self.display
        backend = load_backend(opts.backend)
        needs = needs_from(
            workflow,
            grid.fingerprint if grid else INSECURE_FINGERPRINT,
            opts.require,
            opts.max_cost,
            opts.workers or default_workers,
            admit=admission(grid) if grid else None,
            middleware=backend.capabilities.middleware,
        )
        coordinator = Coordinator(
            workflow,
            needs,
            grid,
            interface=interface,
            expected_peers=expected,
            timeouts=self.timeouts,
            resume=self.plan,
            workflow_digest=self.source.digest,
            data=self.data,
            speculation=self.speculation,
            quorum=opts.quorum or 1,
            display=display,
            backend=backend,
            backend_options=opts.backend_options,
        )

        stopped_by: list[signal.Signals] = []

        def cancel_running_job(sig: signal.Signals) -> bool:
            if coordinator.phase != "running tasks":
                return False
            stopped_by.append(sig)
            coordinator.cancel(f"cancelled by the user ({sig.name})")
            return True

        def interrupted() -> str:
            if coordinator.phase == "staging inputs":
                return "while staging inputs"
            return f"while {coordinator.phase}: every reserved peer was released"

        if display is not None:
            display.start()
        try:
            report = _run_until_signal(coordinator.run, interrupted, cancel_running_job)
        finally:
            if display is not None:
                display.stop()
        if stopped_by:
            report["signal"] = stopped_by[0].name  # the exit code says it too: 128 + the signal
        return report


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Outside the event loop, SIGINT and SIGTERM raise Interrupted where the code is (SIGTERM
    would otherwise kill the process and leave a local grid's workers behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum))

    previous = {sig: signal.signal(sig, interrupt) for sig in _watched()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watched() -> list[signal.Signals]:
    """The stop signals this process listens to: not one it was started ignoring (`cmd &`
    in a script ignores SIGINT, so that a Ctrl-C meant for the script spares it)."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


def _run_until_signal(
    work: Callable[[], Coroutine[Any, Any, T]],
    detail: str | Callable[[], str],
    gently: Callable[[signal.Signals], bool] = lambda sig: False,
) -> T:
    """`asyncio.run(work())`, which SIGINT or SIGTERM cancel: Interrupted(signal, detail).

    `gently(sig)` may instead ask the work to wind down by itself (True); it is cancelled
    all the same if it has not within INTERRUPT_GRACE_S. Later signals are ignored: a second
    Ctrl-C must not cut short the release of the peers.
    """
    received: list[signal.Signals] = []

    async def main() -> T | None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work())

        def on_signal(sig: signal.Signals) -> None:
            if received:
                return
            received.append(sig)
            if gently(sig):
                loop.call_later(INTERRUPT_GRACE_S, task.cancel)
            else:
                task.cancel()

        for sig in watched:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await task
        except asyncio.CancelledError:
            if not received:
                raise
            return None  # raised below, out of the event loop

    watched = _watched()
    outside = {sig: signal.getsignal(sig) for sig in watched}
    try:
        result = asyncio.run(main())
    finally:
        # The loop leaves the default handlers behind: put back those of `signals_interrupt`.
        if threading.current_thread() is threading.main_thread():
            for sig, handler in outside.items():
                signal.signal(sig, handler)
    if result is None and received:
        raise Interrupted(received[0], detail if isinstance(detail, str) else detail())
    assert result is not None
    return result
