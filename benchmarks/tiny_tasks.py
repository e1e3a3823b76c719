"""Tasks per second through the whole product, for tasks that do nothing.

Writes a workflow of N independent `true` tasks (no inputs, no outputs) in a temp dir and
runs it with `bgrid submit --local 2` (two worker daemons on 127.0.0.1, the same CLI a user
runs). Every task costs the coordinator a dispatch, a `started` and a `task_done` message,
and the scheduler's bookkeeping; the worker's task launcher starts one process
(worker/launcher.py). The figure is N over the report's makespan (first dispatch to last
task done); the submit's wall time (start-up, recruitment, release included) is printed too.

    .venv/bin/python benchmarks/tiny_tasks.py                # 2000 tasks
    .venv/bin/python benchmarks/tiny_tasks.py --tasks 500 --repeats 3 --json tiny.json

Meant for before/after comparisons of the coordinator's per-message path on one quiet
machine: run both sides in turn, several repeats each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bgrid() -> list[str]:
    """The `bgrid` of this interpreter's environment."""
    script = Path(sys.executable).parent / "bgrid"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from bonjourgrid.cli import main; main()"]


def run_once(directory: Path, tasks: int, local: int) -> dict[str, float]:
    workflow = {"name": "tiny", "tasks": {f"t{i:06d}": {"command": "true"} for i in range(tasks)}}
    (directory / "wf.json").write_text(json.dumps(workflow))
    started = time.monotonic()
    done = subprocess.run(
        [*bgrid(), "submit", "wf.json", "--local", str(local), "--json", "--quiet"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    wall_s = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"bgrid submit exited {done.returncode}:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    if report["status"] != "succeeded":
        raise SystemExit(f"the job {report['status']}: {report['reason']}")
    # From the first dispatch to the last task done: recruitment is not the per-task path.
    entries = report["tasks"].values()
    span = max(t["end"] for t in entries) - min(t["start"] for t in entries)
    return {
        "span_s": span,
        "makespan_s": float(report["makespan_s"]),
        "wall_s": wall_s,
        "tasks_per_s": tasks / span,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000, help="tasks per job (default 2000)")
    ap.add_argument("--local", type=int, default=2, help="local workers (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="jobs run in turn (default 1)")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bgrid-tiny-") as tmp:
        for i in range(args.repeats):
            directory = Path(tmp) / f"run-{i}"
            directory.mkdir()
            figures = run_once(directory, args.tasks, args.local)
            runs.append(figures)
            print(
                f"run {i + 1}: {figures['tasks_per_s']:.1f} tasks/s "
                f"({args.tasks} tasks in {figures['span_s']:.2f} s; "
                f"submit wall time {figures['wall_s']:.2f} s)",
                flush=True,
            )
    median = statistics.median(r["tasks_per_s"] for r in runs)
    print(f"tiny tasks: median {median:.1f} tasks/s over {len(runs)} run(s), --local {args.local}")
    if args.json:
        result = {
            "tasks": args.tasks,
            "local": args.local,
            "runs": runs,
            "median_tasks_per_s": median,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
