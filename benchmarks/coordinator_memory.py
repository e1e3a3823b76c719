"""The coordinator's memory on a large job: peak RSS through a 100,000-task run and its report.

What runs, for real: the workflow file is written and loaded (`load_workflow`: parser,
validation, the networkx graph), the scheduler core is built as the shell builds it
(`task_data`, requirements matcher), every task is dispatched, reported with one output of
its own (a 64-hex digest, as a worker sends), its logs are kept (`LogKeeper.keep` writes
each attempt's stdout and stderr into the submit directory, as the shell does), final
outputs are collected, and the report is built (`build_report`) and written as JSON
(`write_report`) as `bgrid submit --report run.json` does.

What does not run: sockets, workers and processes (the events a worker would cause are fed
to the core directly), the journal, the progress display and the summary print. The
figure is the coordinator's own state per task plus the report, without the event loop's
transient buffers.

Printed: the peak RSS (`ru_maxrss`) after each phase, and the current RSS, in MB.

    .venv/bin/python benchmarks/coordinator_memory.py                  # 100,000 tasks
    .venv/bin/python benchmarks/coordinator_memory.py --tasks 20000 --json mem.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from collections import deque
from pathlib import Path

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.logs import LogKeeper
from bonjourgrid.coordinator.report import ReportInputs, build_report, write_report
from bonjourgrid.coordinator.shell import task_data
from bonjourgrid.dag.loader import load_workflow
from bonjourgrid.requirements import Requirement


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def write_workflow(directory: Path, n_tasks: int, width: int) -> Path:
    """Layers of `width` tasks; each reads the outputs of two tasks of the layer before.
    Written one task at a time, so that writing it does not raise the peak measured."""
    path = directory / "wf.json"
    with path.open("w") as f:
        f.write('{"name": "memory", "tasks": {')
        for i in range(n_tasks):
            layer, pos = divmod(i, width)
            before = (layer - 1) * width
            inputs = (
                []
                if layer == 0
                else sorted({f"out/t{before + pos}.dat", f"out/t{before + (pos + 1) % width}.dat"})
            )
            task = {"command": "true", "inputs": inputs, "outputs": [f"out/t{i}.dat"]}
            f.write(("," if i else "") + f'"t{i}": ' + json.dumps(task))
        f.write("}}")
    return path


def run(n_tasks: int, n_peers: int, width: int, logs: bool) -> dict[str, float]:
    phases: dict[str, float] = {"start_peak_mb": round(peak_mb(), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        workflow = load_workflow(write_workflow(Path(tmp), n_tasks, width))
        sched = core.SchedulerCore(
            (
                (name, list(workflow.graph.predecessors(name)), spec.require or "", spec.retries)
                for name, spec in workflow.tasks.items()
            ),
            matches=lambda text, attrs: Requirement.parse(text).matches(attrs),
            data=task_data(workflow, fetch_all=False),
        )
        keeper = LogKeeper(workflow.root, "memory-000000")
        phases["loaded_peak_mb"] = round(peak_mb(), 1)
        started = time.perf_counter()
        pending: deque[core.Instruction] = deque()
        now = 0.0
        for p in range(n_peers):
            pending.extend(sched.handle(core.PeerJoined(f"peer-{p}", 4, {}), now))
        while pending:
            instruction = pending.popleft()
            now += 0.001
            match instruction:
                case core.Dispatch(task, peer, attempt):
                    path = workflow.tasks[task].outputs[0]
                    digest = hashlib.sha256(path.encode()).hexdigest()
                    if logs:
                        keeper.keep(task, attempt, b"", 0, b"", 0)
                    report = core.TaskReported(
                        peer,
                        task,
                        attempt,
                        0,
                        "",
                        ((path, FileRef(digest, 1000)),),
                        run_s=0.001,
                    )
                    pending.extend(sched.handle(report, now))
                case core.Collect(task, _, attempt, _):
                    pending.extend(sched.handle(core.OutputsCollected(task, attempt), now))
        assert sched.finished is not None and sched.finished.status == "succeeded"
        phases["run_s"] = round(time.perf_counter() - started, 2)
        phases["ran_peak_mb"] = round(peak_mb(), 1)
        phases["ran_now_mb"] = round(current_mb(), 1)
        report = build_report(
            ReportInputs(
                job="memory-000000",
                workflow=workflow,
                finished=sched.finished,
                started_at=time.time(),
                tasks=sched.tasks,
                story=sched.story,
                logs=keeper,
                peers=(),
                bytes={},
                prefetch="lookahead",
                journal=None,
                resume=None,
            )
        )
        phases["report_built_peak_mb"] = round(peak_mb(), 1)
        out = Path(tmp) / "run.json"
        write_report(out, report)
        phases["report_written_peak_mb"] = round(peak_mb(), 1)
        phases["report_mb"] = round(out.stat().st_size / 2**20, 1)
        assert len(json.loads(out.read_text())["tasks"]) == n_tasks
    return {"tasks": n_tasks, "peers": n_peers, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--peers", type=int, default=50, help="simulated peers of 4 cpus")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--no-logs", action="store_true", help="keep no task logs")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    result = run(args.tasks, args.peers, args.width, not args.no_logs)
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
