"""`bgrid submit` as a library call: load, check, pick the grid, run, report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonjourgrid.coordinator.journal import ResumePlan, journal_path, plan_resume, workflow_digest
from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.report import format_summary
from bonjourgrid.coordinator.shell import LEASE_S, PEER_TIMEOUT_S, Coordinator, Timeouts
from bonjourgrid.dag import Workflow, load_workflow
from bonjourgrid.errors import ConfigError, KeyStoreError
from bonjourgrid.keys import INSECURE_FINGERPRINT, GridKey, key_dir, load_grid_key
from bonjourgrid.worker.local import LOOPBACK, LocalGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitOptions:
    workflow: Path
    workers: tuple[int, int] | None = None
    require: str | None = None
    max_cost: float | None = None
    local: int | None = None  # run on N local worker daemons
    insecure: bool = False
    interface: str | None = None
    report: Path | None = None
    json: bool = False
    resume: bool = False  # keep the tasks the journal vouches for
    peer_timeout: float | None = None  # seconds of silence before a peer is lost
    lease: float | None = None  # seconds a peer stays ours without a heartbeat


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


def submit(opts: SubmitOptions) -> int:
    """Run the workflow; print or write the report; the process exit code."""
    workflow = load_workflow(opts.workflow)  # DagError (exit 2) before any peer is touched
    timeouts = Timeouts(
        PEER_TIMEOUT_S if opts.peer_timeout is None else opts.peer_timeout,
        LEASE_S if opts.lease is None else opts.lease,
    )
    plan = plan_resume(workflow, opts.workflow) if opts.resume else None
    if plan is not None:
        _tell_resume(workflow, plan)
    if plan is not None and len(plan.kept) == len(workflow.tasks):
        # Nothing left to run: no grid, no key, no local workers.
        report = _run(opts, workflow, None, None, None, None, timeouts, plan)
    else:
        report = _run_on_a_grid(opts, workflow, timeouts, plan)
    if opts.report is not None:
        opts.report.write_text(json.dumps(report, indent=2) + "\n")
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    return 0 if report["status"] == "succeeded" else 1


def _run_on_a_grid(
    opts: SubmitOptions, workflow: Workflow, timeouts: Timeouts, plan: ResumePlan | None
) -> dict[str, Any]:
    """Run on the configured grid, or on a local one when asked or when none is configured."""
    local = opts.local
    grid: GridKey | None = None
    if local is None and not opts.insecure:
        try:
            grid = load_grid_key(need_secret=True)
        except KeyStoreError:
            if (key_dir() / "grid.key").exists():
                raise
            local = min(4, os.cpu_count() or 1)
            print(
                f"bgrid: no grid key in {key_dir()}: running on a local grid of {local} "
                "workers (`bgrid keys init` creates a grid for the LAN)",
                file=sys.stderr,
            )
    if local is None:
        return _run(opts, workflow, grid, opts.interface, None, None, timeouts, plan)
    if local < 1:
        raise ConfigError("--local N needs N >= 1")
    with LocalGrid(local) as cluster:
        report = _run(opts, workflow, cluster.grid, LOOPBACK, local, (1, local), timeouts, plan)
        if report["status"] != "succeeded":
            log.debug("local workers said:\n%s", cluster.logs())
    return report


def _tell_resume(workflow: Workflow, plan: ResumePlan) -> None:
    """Say on stderr what a resumed run keeps and why the rest runs again."""
    where = journal_path(workflow).relative_to(workflow.root)
    lines = [
        f"bgrid: resuming job {plan.journal.job} from {where}: {len(plan.kept)} of "
        f"{len(workflow.tasks)} task(s) kept"
    ]
    if plan.workflow_changed:
        lines.append(
            "bgrid: the workflow file changed since then: a task whose command, files or "
            "environment changed runs again, and so does every task after it"
        )
    for name, why in sorted(plan.rerun.items())[:10]:
        lines.append(f"bgrid: {name} runs again: {why}")
    if len(plan.rerun) > 10:
        lines.append(f"bgrid: ... and {len(plan.rerun) - 10} more recorded tasks run again")
    print("\n".join(lines), file=sys.stderr)


def _run(
    opts: SubmitOptions,
    workflow: Workflow,
    grid: GridKey | None,
    interface: str | None,
    expected: int | None,
    default_workers: tuple[int, int] | None,
    timeouts: Timeouts,
    plan: ResumePlan | None,
) -> dict[str, Any]:
    needs = needs_from(
        workflow,
        grid.fingerprint if grid else INSECURE_FINGERPRINT,
        opts.require,
        opts.max_cost,
        opts.workers or default_workers,
    )
    coordinator = Coordinator(
        workflow,
        needs,
        grid,
        interface=interface,
        expected_peers=expected,
        timeouts=timeouts,
        resume=plan,
        workflow_digest=workflow_digest(opts.workflow),
    )

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, coordinator.cancel, "cancelled by the user")
        return await coordinator.run()

    return asyncio.run(main())
